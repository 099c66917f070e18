"""LoRA with K subspaces, written by hand: the adapter that DISCO (arXiv:2503.12897) trains and routes.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight W0 and learns a low-rank update:

    h = W0 x + s * B A x,                 A (r, D_in), B (D_out, r), s = alpha / r

DISCO keeps one LoRA "subspace" per task family and mixes them per example with a gate (its Subspace Selective
Activation, fcit.py), so one layer holds K pairs of factors:

    h = W0 x + s * sum_k gate_k * B_k A_k x,    A_k ~ N(0, 0.01^2),  B_k = 0,  s = alpha / (K * r)

Everything is wrapped, nothing patched: `add_lora` replaces the FFN projections (gate_proj, up_proj,
down_proj) of a transformers model by `LoRALinear` modules that hold the original `nn.Linear` as `.base`.

    cfg = LoRAConfig(num_subspaces=4)
    names = add_lora(model, cfg, generator=torch.Generator().manual_seed(0))
    with gated(model, gate):              # gate (K,) or (B, K); None = all subspaces on
        logits = model(input_ids).logits
    split_factor("model.layers.0.mlp.up_proj.A")   # ("model.layers.0.mlp.up_proj", "A"): a factor (K, R, D_in)
    merge_lora(model, gate)               # plain nn.Linear with W = W0 + s * sum_k gate_k B_k A_k

The factors are ordinary parameters named "<module>.A" (K, R, D_in) and "<module>.B" (K, D_out, R), so
`model.state_dict()` holds them and `split_factor` is the one place that tells them from other tensors.

Tests: python -m pytest -q tests/test_lora.py
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

# B batch, T tokens, D_in / D_out widths, R rank (per subspace), K subspaces


@dataclass
class LoRAConfig:
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # FFN projections of every LLaMA layer (paper)
    num_subspaces: int = 1  # K: LoRA subspaces per layer (DISCO grows/fills these per task)
    rank: int = 8  # R, per subspace; the layer costs as much as one LoRA of rank K * R
    alpha: float = 16.0  # scaling s = alpha / (K * R), so adding subspaces does not scale up the update
    dropout: float = 0.05  # on the LoRA branch input only, as in loralib
    init_std: float = 0.01  # A ~ N(0, init_std^2) (paper); B = 0


# ----------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """Wraps an existing nn.Linear (kept as self.base, frozen: requires_grad False)."""

    def __init__(self, base: nn.Linear, *, num_subspaces: int, rank: int, alpha: float, dropout: float = 0.0,
                 init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        if num_subspaces < 1 or rank < 1:
            raise ValueError(f"lora.py: num_subspaces and rank must be >= 1, got {num_subspaces} and {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)  # only the factors train; W0 stays the pretrained weight
        K, R = num_subspaces, rank
        D_out, D_in = base.weight.shape
        self.num_subspaces, self.rank = K, R
        self.scaling = alpha / (K * R)
        # Factors are float32 whatever the base dtype: bf16 has 8 mantissa bits, too few for small
        # updates to A and B to register. Drawn on CPU so a seed gives the same factors on any device.
        A = torch.randn(K, R, D_in, generator=generator, dtype=torch.float32) * init_std  # (K, R, D_in)
        self.A = nn.Parameter(A.to(base.weight.device))
        # B = 0: the adapted model equals the base model at step 0 (test_lora_identity_at_init)
        self.B = nn.Parameter(torch.zeros(K, D_out, R, dtype=torch.float32, device=base.weight.device))  # (K, D_out, R)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Set only by `gated` (the gate must reach FFNs inside a transformers forward we do not own);
        # forward reads it, never writes it. None means every subspace is on with weight 1.
        self.gate: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"num_subspaces={self.num_subspaces}, rank={self.rank}, scaling={self.scaling:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., D_in) -> (..., D_out)
        K, R = self.num_subspaces, self.rank
        # One matmul pair over all K subspaces: stacking the A_k (and the B_k) turns the sum over k into a
        # single rank-K*R LoRA, so no Python loop and the same cost as a plain LoRA of rank K * R.
        A_flat = self.A.reshape(K * R, -1)  # (K*R, D_in)
        B_flat = self.B.permute(1, 0, 2).reshape(self.B.shape[1], K * R)  # (D_out, K*R)
        # z = A x, in float32 so a bf16 base does not round the update away
        z = self.dropout(x.float()) @ A_flat.T  # (..., K*R)
        if self.gate is not None:
            z = z * expand_gate(self.gate, x, R).to(z)  # (..., K*R)
        # h = W0 x + b + s * sum_k gate_k B_k A_k x
        return self.base(x) + (self.scaling * (z @ B_flat.T)).to(x.dtype)  # (..., D_out)


def expand_gate(gate: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """gate (K,) or (B, K) -> broadcastable to z (..., K*R). Gating on the rank dimension multiplies
    every row of A_k by gate_k, which is the same as scaling B_k A_k x by gate_k."""
    if gate.dim() == 1:
        return gate.repeat_interleave(rank)  # (K*R,)
    if gate.dim() == 2 and x.dim() >= 2 and gate.shape[0] == x.shape[0]:
        g = gate.repeat_interleave(rank, dim=-1)  # (B, K*R)
        return g.reshape(g.shape[0], *([1] * (x.dim() - 2)), g.shape[1])  # (B, 1.., K*R)
    raise ValueError(f"lora.py: gate of shape {tuple(gate.shape)} does not fit input {tuple(x.shape)}; "
                     f"pass (K,) for all rows or (B, K) with B = x.shape[0]")


# ----------------------------------------------------------------------------------------------------
# Wrapping a model


def add_lora(model: nn.Module, cfg: LoRAConfig, *, generator: torch.Generator | None = None,
             layer: type = LoRALinear) -> list[str]:
    """Replace every nn.Linear child whose attribute name is in cfg.targets by a LoRALinear (or a subclass given as
    `layer`) around it. Returns the wrapped module names in named_modules order. Freezes only the wrapped weights."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets]
    if not found:
        raise ValueError(f"lora.py: no nn.Linear named one of {cfg.targets} in {type(model).__name__}; "
                         f"set LoRAConfig.targets to attribute names that exist in the model")
    # Collected first, replaced after: swapping children while walking named_modules would visit the new ones.
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer(linear, num_subspaces=cfg.num_subspaces, rank=cfg.rank, alpha=cfg.alpha,
                                     dropout=cfg.dropout, init_std=cfg.init_std, generator=generator))
    return [name for name, _ in found]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear, in named_modules order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


FACTORS = ("A", "B")


def split_factor(key: str) -> tuple[str, str] | None:
    """(module name, "A" | "B") when a parameter name is a LoRA factor of a LoRALinear, else None (a projector
    weight, a router): the one function that tells LoRA factors from the other tensors of a state dict."""
    module, _, leaf = key.rpartition(".")
    return (module, leaf) if module and leaf in FACTORS else None


@contextlib.contextmanager
def gated(model: nn.Module, gate: torch.Tensor | None):
    """Bind `gate` ((K,) or (B, K)) on every LoRALinear for the duration of the block, then restore the
    previous gates, also on exception. This is how a gate reaches FFNs inside a transformers forward."""
    modules = list(lora_modules(model).values())
    previous = [m.gate for m in modules]
    try:
        for m in modules:
            m.gate = gate
        yield model
    finally:
        for m, g in zip(modules, previous):
            m.gate = g


# ----------------------------------------------------------------------------------------------------
# Merging


@torch.no_grad()
def merge_lora(model: nn.Module, gate: torch.Tensor | None = None) -> None:
    """Replace every LoRALinear by a plain nn.Linear with W = W0 + s * sum_k gate_k B_k A_k.
    One gate (K,) for the whole model (a merged weight cannot vary per example); None = all ones."""
    for name, m in lora_modules(model).items():
        K = m.num_subspaces
        g = torch.ones(K) if gate is None else gate.detach().float().cpu()  # (K,)
        if g.shape != (K,):
            raise ValueError(f"lora.py: merge_lora needs a gate of shape ({K},), got {tuple(g.shape)}; "
                             f"per-example gates (B, K) cannot be merged into one weight")
        g = g.to(m.A.device)
        # delta = s * sum_k g_k B_k A_k                                   (K, D_out, R) x (K, R, D_in)
        delta = m.scaling * torch.einsum("k,kor,kri->oi", g, m.B.float(), m.A.float())  # (D_out, D_in)
        base = m.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        # add in float32, round once to the base dtype
        merged.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        for p_new, p_old in zip(merged.parameters(), base.parameters()):
            p_new.requires_grad_(p_old.requires_grad)  # stays frozen like W0 was
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, merged)
