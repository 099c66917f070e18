"""Tests for lora.py: oracle checks against plain torch loops and the invariants DISCO relies on.
Run: python -m pytest -q tests/test_lora.py"""
import pytest
import torch
import torch.nn as nn

from federated import client_state, load_client_state
from lora import (LoRAConfig, LoRALinear, add_lora, dropped, expand_gate, gated, lora_modules, merge_lora,
                  split_factor)

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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_hot_gate_is_bitwise_the_one_subspace_lora_and_zero_elsewhere(dropout):
    """Under `gated` a one-hot gate computes subspace k alone: the output and the gradients of (A_k, B_k) equal,
    bit for bit, those of a one-subspace LoRA holding (A_k, B_k) at the same scaling and dropout draws; every
    other subspace gets a gradient of exactly zero, as under the full gate (so AdamW leaves it as it was).
    k = 0 keeps (A_k, B_k) at the start of their storage, aligned as the reference's own tensors are, so a BLAS that
    picks its kernel by alignment picks the same one; the next test checks k = 1 against the stacked path."""
    layer, k = make_layer(dropout=dropout), 0
    ref = LoRALinear(layer.base, num_subspaces=1, rank=R, alpha=1.0, dropout=dropout)
    ref.scaling = layer.scaling
    with torch.no_grad():
        ref.A.copy_(layer.A[k:k + 1]), ref.B.copy_(layer.B[k:k + 1])
    x = torch.randn(B, T, D_IN, requires_grad=True)
    outs = []
    for m, gate in ((layer, torch.nn.functional.one_hot(torch.tensor(k), K).float()), (ref, None)):
        torch.manual_seed(7)                                          # the same dropout draws in both
        with gated(m, gate):                                          # ref: no gate, the stacked path of K = 1
            assert m.active == ((k, 1.0) if m is layer else None)
            out = m.train()(x)
        out.pow(2).sum().backward()
        outs.append((out, x.grad.clone()))
        x.grad = None
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(layer.A.grad[k], ref.A.grad[0]) and torch.equal(layer.B.grad[k], ref.B.grad[0])
    others = [j for j in range(K) if j != k]
    assert layer.A.grad[k].abs().sum() > 0 and torch.all(layer.A.grad[others] == 0)
    assert torch.all(layer.B.grad[others] == 0)


def test_one_hot_fast_path_agrees_with_the_stacked_computation():
    """The one-subspace path and the stacked K * R path are the same function; their float sums differ in order
    (a GEMM of R columns against one of K * R), so they agree to rounding, not bit for bit."""
    layer, x = make_layer(), torch.randn(B, T, D_IN)
    gate = torch.tensor([0.0, 0.7, 0.0])
    with gated(layer, gate):
        assert layer.active == (1, pytest.approx(0.7))
        fast = layer(x)
        layer.active = None                                           # the stacked path under the same gate
        torch.testing.assert_close(fast, layer(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, oracle(layer, x, gate), atol=1e-5, rtol=1e-5)
    for gate in (torch.tensor([0.5, 0.5, 0.0]), torch.zeros(K), torch.rand(B, K), None):
        with gated(layer, gate):
            assert layer.active is None                               # several, none or per-row: the stacked path


def test_lora_dropout_zeroes_each_input_independently_with_probability_p():
    """lora.dropped draws the dropped positions as geometric gaps; their law must be nn.Dropout's: each of n
    elements dropped independently with probability p (count, spread over the range, pairs of neighbours)."""
    n, p = 400_000, 0.05
    torch.manual_seed(0)
    pos = dropped(n, p)
    assert pos.dtype == torch.long and torch.all(pos[1:] > pos[:-1]) and 0 <= pos[0] and pos[-1] < n
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(len(pos) - n * p) < 5 * sd
    tenth = torch.bincount(pos * 10 // n, minlength=10)               # uniform over the range, the end included
    assert torch.all((tenth - n * p / 10).abs() < 5 * sd / 10 ** 0.5)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pos] = True
    pairs = int((mask[1:] & mask[:-1]).sum())                         # independence: P(both) = p^2
    assert abs(pairs - (n - 1) * p * p) < 5 * ((n - 1) * p * p) ** 0.5
    assert len(dropped(1, 0.5)) in (0, 1) and len(dropped(10, 0.999)) > 0


def test_lora_dropout_keeps_the_mean_and_is_off_in_eval():
    """Dropped inputs are zeroed and the kept ones count 1 / (1 - p) (folded into the scaling): the mean over
    draws of the training output is the eval output; eval mode draws nothing."""
    layer, x = make_layer(dropout=0.25), torch.randn(B, T, D_IN)
    with torch.no_grad():
        eval_out = layer.eval()(x)
        state = torch.get_rng_state()
        assert torch.equal(layer(x), eval_out) and torch.equal(torch.get_rng_state(), state)
        layer.train()
        mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, eval_out, atol=0.05, rtol=0.02)
    assert not torch.equal(layer(x), layer(x))
    with pytest.raises(ValueError, match="dropout must be in"):
        make_layer(dropout=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_layer_drops_at_rate_p_and_its_one_hot_path_agrees_with_the_stacked_one():
    """On a GPU the dropout is one uniform draw per element (no host loop): the share dropped is p, and a bf16 base
    with a one-hot gate gives the stacked path's output to bf16 rounding, factors and their gradients float32."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to("cuda", torch.bfloat16)
    layer = LoRALinear(base, num_subspaces=K, rank=R, alpha=8.0, dropout=0.05,
                       generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(256, 40, 64, device="cuda")
    kept, keep = layer.train().drop(x)
    n = x.numel()
    assert keep == 0.95 and abs(int((kept == 0).sum()) - 0.05 * n) < 5 * (n * 0.05 * 0.95) ** 0.5
    layer.eval()
    xb = x.to(torch.bfloat16)
    with gated(layer, torch.tensor([0.0, 0.7, 0.0], device="cuda")):
        assert layer.active is not None
        fast = layer(xb)
        fast.float().pow(2).sum().backward()
        layer.active = None
        torch.testing.assert_close(layer(xb), fast, atol=0.02, rtol=0.02)
    assert fast.dtype == torch.bfloat16 and layer.A.grad.dtype == torch.float32
    assert layer.A.grad[1].abs().sum() > 0 and torch.all(layer.A.grad[[0, 2]] == 0)


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
    x = torch.randn(B, T, D_IN, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.A.dtype == torch.float32 and layer.B.dtype == torch.float32
    # the update is computed in float32 from the float32 factors and rounded once: W0 x (bf16) + round(s B A x)
    delta = layer.scaling * sum(x.float() @ layer.A[k].T @ layer.B[k].T for k in range(K))     # (B, T, D_out)
    torch.testing.assert_close(out, layer.base(x) + delta.to(torch.bfloat16), atol=2e-2, rtol=1e-2)


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


def lora_llama(*, seed=0, num_subspaces=2, rank=4):
    """A tiny Llama frozen as train.build_model freezes it, then wrapped: only the LoRA factors train."""
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, LoRAConfig(num_subspaces=num_subspaces, rank=rank), generator=torch.Generator().manual_seed(seed))
    return model


def test_client_state_round_trip():
    src, dst = lora_llama(seed=0), lora_llama(seed=1)
    for m in lora_modules(src).values():
        nn.init.normal_(m.B)
    state = client_state(src)
    assert set(state) == {f"{n}.{p}" for n in lora_modules(src) for p in "AB"}
    params = {n: p for n, p in dst.named_parameters()}
    load_client_state(dst, state)
    assert all(torch.equal(v, client_state(dst)[k]) for k, v in state.items())
    # in place: the model keeps its parameter objects, so an optimizer built on them still holds them
    assert all(p is params[n] for n, p in dst.named_parameters())


def test_client_state_is_a_copy_not_a_view():
    model = lora_llama()
    state = client_state(model)
    key = "model.layers.0.mlp.up_proj.B"
    with torch.no_grad():
        model.get_parameter(key).add_(1.0)
    assert torch.equal(state[key], torch.zeros_like(state[key]))  # B = 0 at init, and the copy stayed so


def test_load_client_state_errors_name_the_key():
    model = lora_llama()
    state = client_state(model)
    key = "model.layers.0.mlp.up_proj.A"
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.nonexistent\.A'.*no such parameter"):
        load_client_state(model, {**state, "model.layers.0.mlp.nonexistent.A": state[key]})
    with pytest.raises(ValueError, match=rf"'{key}' of shape \(3, 4, 16\).*\(2, 4, 16\)"):
        load_client_state(model, {**state, key: torch.zeros(3, 4, 16)})


def test_a_refused_client_state_leaves_the_model_as_it_was():
    model = lora_llama()
    before = client_state(model)
    key = "model.layers.1.mlp.down_proj.B"                     # the last factor: every other one comes before it
    ones = {k: torch.ones_like(v) for k, v in before.items()}
    with pytest.raises(ValueError, match=key):
        load_client_state(model, {**ones, key: torch.zeros(1)})
    assert all(torch.equal(v, before[k]) for k, v in client_state(model).items())


def test_load_client_state_refuses_a_state_without_one_of_the_models_parameters():
    model = lora_llama()
    state = client_state(model)
    key = "model.layers.0.mlp.up_proj.A"
    with pytest.raises(ValueError, match=key):
        load_client_state(model, {k: v for k, v in state.items() if k != key})


@pytest.mark.parametrize("key, expected", [
    ("model.layers.0.mlp.up_proj.A", ("model.layers.0.mlp.up_proj", "A")),
    ("model.language_model.layers.3.mlp.down_proj.B", ("model.language_model.layers.3.mlp.down_proj", "B")),
    ("model.multi_modal_projector.linear_1.weight", None),        # the projector
    ("model.layers.0.mlp.up_proj.router", None),                  # MoELoRA's router
    ("model.layers.0.mlp.up_proj.base.weight", None),             # the wrapped W0
    ("model.layers.0.mlp.up_proj.Adapter", None),                 # a leaf that only starts like a factor
    ("A", None),                                                  # a factor belongs to a module
])
def test_split_factor_on_factor_and_other_keys(key, expected):
    assert split_factor(key) == expected


def test_split_factor_names_exactly_the_factors_of_a_wrapped_model():
    model = lora_llama()
    layers = lora_modules(model)
    found = {k: split_factor(k) for k in model.state_dict() if split_factor(k)}
    assert found == {f"{n}.{p}": (n, p) for n in layers for p in "AB"}
    assert all(model.get_parameter(k) is getattr(layers[n], p) for k, (n, p) in found.items())


def test_expand_gate_repeats_each_subspace_weight_over_its_rank():
    gate = torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.0, 3.0]])      # (B, K)
    x = torch.randn(2, T, D_IN)
    assert expand_gate(gate, x, R).tolist() == [[[0.5, 0.5, 2.0, 2.0, 0.0, 0.0]], [[1.0, 1.0, 0.0, 0.0, 3.0, 3.0]]]
    assert expand_gate(gate[0], x, R).tolist() == [0.5, 0.5, 2.0, 2.0, 0.0, 0.0]


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
