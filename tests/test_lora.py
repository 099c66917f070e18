"""Tests for lora.py: oracle checks against plain torch loops and the invariants DISCO relies on.
Run: python -m pytest -q tests/test_lora.py"""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import LoRAConfig, LoRALinear, add_lora, gated, load_lora_state, lora_modules, lora_state, merge_lora  # noqa: E402

# B batch, T tokens, D_in / D_out widths, R rank, K subspaces
B, T, D_IN, D_OUT, R, K = 3, 4, 6, 5, 2, 3


def make_layer(*, seed=0, nonzero_B=True, dtype=torch.float32, dropout=0.0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(dtype)
    layer = LoRALinear(base, num_subspaces=K, rank=R, alpha=8.0, dropout=dropout, generator=g)
    if nonzero_B:
        with torch.no_grad():
            layer.B.copy_(torch.randn(K, D_OUT, R, generator=g))
    return layer


def oracle(layer, x, gate):
    """h = W0 x + b + s * sum_k g_k B_k A_k x, one subspace and one row at a time."""
    base = x @ layer.base.weight.T + layer.base.bias  # (B, T, D_out)
    out = base.clone()
    for i in range(x.shape[0]):
        for k in range(K):
            g = 1.0 if gate is None else (gate[k] if gate.dim() == 1 else gate[i, k])
            out[i] += layer.scaling * g * (x[i] @ layer.A[k].T @ layer.B[k].T)
    return out


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------------------------------
# LoRALinear


@pytest.mark.parametrize("gate_kind", ["none", "shared", "per_row"])
def test_lora_matches_oracle(gate_kind):
    layer = make_layer()
    x = torch.randn(B, T, D_IN)
    gate = {"none": None, "shared": torch.rand(K), "per_row": torch.rand(B, K)}[gate_kind]
    layer.gate = gate
    torch.testing.assert_close(layer(x), oracle(layer, x, gate), atol=1e-5, rtol=1e-5)


def test_lora_per_row_gate_on_2d_input():
    layer = make_layer()
    x, gate = torch.randn(B, D_IN), torch.rand(B, K)
    layer.gate = gate
    torch.testing.assert_close(layer(x), oracle(layer, x[:, None], gate)[:, 0], atol=1e-5, rtol=1e-5)


def test_lora_identity_at_init():
    layer = make_layer(nonzero_B=False)
    x = torch.randn(B, T, D_IN)
    assert torch.equal(layer(x), layer.base(x))


def test_one_hot_gate_only_touches_its_subspace():
    layer = make_layer()
    k = 1
    layer.gate = torch.nn.functional.one_hot(torch.tensor(k), K).float()
    layer(torch.randn(B, T, D_IN)).pow(2).sum().backward()
    others = [j for j in range(K) if j != k]
    assert layer.A.grad[k].abs().sum() > 0 and layer.B.grad[k].abs().sum() > 0
    assert torch.all(layer.A.grad[others] == 0) and torch.all(layer.B.grad[others] == 0)
    assert all(p.grad is None and not p.requires_grad for p in layer.base.parameters())


def test_per_row_gate_is_row_local():
    layer = make_layer()
    x = torch.randn(B, T, D_IN)
    gate = torch.rand(B, K)
    layer.gate = gate
    out1 = layer(x)
    gate2 = gate.clone()
    gate2[1:] = torch.rand(B - 1, K)  # change every row's gate except row 0
    layer.gate = gate2
    out2 = layer(x)
    assert torch.equal(out1[0], out2[0])
    assert not torch.allclose(out1[1:], out2[1:])


def test_bad_gate_shape_raises():
    layer = make_layer()
    layer.gate = torch.rand(B + 1, K)
    with pytest.raises(ValueError, match="gate of shape"):
        layer(torch.randn(B, T, D_IN))


def test_bf16_base_keeps_dtype_and_float32_factors():
    layer = make_layer(dtype=torch.bfloat16)
    out = layer(torch.randn(B, T, D_IN, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert layer.A.dtype == torch.float32 and layer.B.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# Model wrapping, state, gating, merging


def test_add_lora_wraps_ffn_and_keeps_logits_at_init():
    model = tiny_llama()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    names = add_lora(model, LoRAConfig(num_subspaces=2, rank=4), generator=torch.Generator().manual_seed(0))
    expected = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert names == expected and list(lora_modules(model)) == expected
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)


def test_add_lora_without_match_raises():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(tiny_llama(), LoRAConfig(targets=("nonexistent",)))


def test_lora_state_round_trip():
    cfg = LoRAConfig(num_subspaces=2, rank=4)
    src, dst = tiny_llama(), tiny_llama()
    add_lora(src, cfg, generator=torch.Generator().manual_seed(0))
    add_lora(dst, cfg, generator=torch.Generator().manual_seed(1))
    for m in lora_modules(src).values():
        nn.init.normal_(m.B)
    state = lora_state(src)
    assert set(state) == {f"{n}.{p}" for n in lora_modules(src) for p in "AB"}
    load_lora_state(dst, state)
    assert all(torch.equal(v, lora_state(dst)[k]) for k, v in state.items())


def test_load_lora_state_errors():
    model = tiny_llama()
    add_lora(model, LoRAConfig(num_subspaces=2, rank=4))
    state = lora_state(model)
    key = "model.layers.0.mlp.up_proj.A"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(KeyError, match=key):
        load_lora_state(model, missing)
    wrong = dict(state, **{key: torch.zeros(3, 4, 16)})
    with pytest.raises(ValueError, match=key):
        load_lora_state(model, wrong)


def test_gated_restores_previous_gate():
    model = tiny_llama()
    add_lora(model, LoRAConfig(num_subspaces=2, rank=4))
    outer = torch.tensor([1.0, 0.0])
    with gated(model, outer):
        with gated(model, torch.tensor([0.0, 1.0])):
            pass
        assert all(m.gate is outer for m in lora_modules(model).values())
        with pytest.raises(RuntimeError):
            with gated(model, torch.tensor([0.5, 0.5])):
                raise RuntimeError("boom")
        assert all(m.gate is outer for m in lora_modules(model).values())
    assert all(m.gate is None for m in lora_modules(model).values())


def test_merge_lora_matches_gated_model():
    model = tiny_llama()
    add_lora(model, LoRAConfig(num_subspaces=3, rank=2, dropout=0.0), generator=torch.Generator().manual_seed(0))
    for m in lora_modules(model).values():
        nn.init.normal_(m.B, std=0.1)
    ids = torch.randint(0, 50, (2, 7))
    gate = torch.tensor([0.2, 0.0, 0.8])
    with torch.no_grad(), gated(model, gate):
        expected = model(ids).logits
    merge_lora(model, gate)
    assert not lora_modules(model)
    assert all(type(model.model.layers[i].mlp.up_proj) is nn.Linear for i in range(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
