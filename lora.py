"""LoRA with K subspaces, written by hand: the adapter that DISCO (arXiv:2503.12897) trains and routes.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight W0 and learns a low-rank update:

    h = W0 x + s * B A x,                 A (r, D_in), B (D_out, r), s = alpha / r

DISCO keeps one LoRA "subspace" per task family and mixes them per example with a gate (its Subspace Selective
Activation, fcit.py), so one layer holds K pairs of factors:

    h = W0 x + s * sum_k gate_k * B_k A_k x,    A_k ~ N(0, 0.01^2),  B_k = 0,  s = alpha / (K * r)

Everything is wrapped, nothing patched: `add_lora` replaces the FFN projections (gate_proj, up_proj,
down_proj) of a transformers model by `LoRALinear` modules that hold the original `nn.Linear` as `.base`.
Training a subspace binds a one-hot gate: the layer then computes that subspace alone (R columns, not K * R), bit
for bit the one-subspace LoRA. Dropout on the branch input keeps nn.Dropout's law, drawn at a cost proportional
to what it drops (`dropped`).

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
import math
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
        if not 0 <= dropout < 1:
            raise ValueError(f"lora.py: dropout must be in [0, 1), got {dropout}")
        self.p = dropout
        # Set only by `gated` (the gate must reach FFNs inside a transformers forward we do not own);
        # forward reads them, never writes them. gate None: every subspace on with weight 1. active (k, g_k):
        # the gate has one nonzero entry, so only subspace k is computed.
        self.gate: torch.Tensor | None = None
        self.active: tuple[int, float] | None = None

    def extra_repr(self) -> str:
        return f"num_subspaces={self.num_subspaces}, rank={self.rank}, scaling={self.scaling:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., D_in) -> (..., D_out)
        if self.active is not None:  # a one-hot gate (training a subspace): the others would add exactly 0
            return self.one_subspace(x, *self.active)
        K, R = self.num_subspaces, self.rank
        # One matmul pair over all K subspaces: stacking the A_k (and the B_k) turns the sum over k into a
        # single rank-K*R LoRA, so no Python loop and the same cost as a plain LoRA of rank K * R.
        A_flat = self.A.reshape(K * R, -1)  # (K*R, D_in)
        B_flat = self.B.permute(1, 0, 2).reshape(self.B.shape[1], K * R)  # (D_out, K*R)
        # z = A x, in float32 so a bf16 base does not round the update away
        x_kept, keep = self.drop(x.float())
        z = x_kept @ A_flat.T  # (..., K*R)
        if self.gate is not None:
            z = z * expand_gate(self.gate, x, R).to(z)  # (..., K*R)
        # h = W0 x + b + s * sum_k gate_k B_k A_k x     (1 / keep: dropout's rescale of the kept inputs)
        return add_update(self.base(x), z, B_flat, self.scaling / keep)  # (..., D_out)

    def one_subspace(self, x: torch.Tensor, k: int, g: float) -> torch.Tensor:  # x (..., D_in) -> (..., D_out)
        """h = W0 x + b + s g_k B_k A_k x: the forward under a gate whose only nonzero entry is g_k. It multiplies
        R columns instead of K * R; the other subspaces get exactly zero gradient, as under the full gate, and
        the result is bitwise that of a one-subspace LoRA holding (A_k, B_k) (test_one_hot_gate_...)."""
        x_kept, keep = self.drop(x.float())
        z = x_kept @ self.A[k].T  # (..., R)
        return add_update(self.base(x), z, self.B[k], self.scaling * g / keep)  # (..., D_out)

    def drop(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """LoRA dropout (loralib, PEFT: nn.Dropout(p) on the branch input): each element of x zeroed independently
        with probability p while training. Returns (x with the dropped elements zeroed, keep = 1 - p); the caller
        divides by keep in the scalar it multiplies anyway, instead of rescaling every kept element."""
        if not self.training or self.p == 0:
            return x, 1.0
        if x.device.type != "cpu":  # draws are cheap on a GPU, and dropped's loop would synchronize it
            return x * (torch.rand_like(x) >= self.p), 1.0 - self.p
        return x.reshape(-1).index_fill(0, dropped(x.numel(), self.p), 0.0).view_as(x), 1.0 - self.p


def add_update(h: torch.Tensor, z: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """h + scale * z B^T: the low-rank update added to the base's output h (..., D_out), z (..., r), B (D_out, r),
    computed in float32 and rounded once to the base's dtype (a bf16 base must not round the update away)."""
    return h + (scale * (z @ B.T)).to(h.dtype)  # (..., D_out)


def dropped(n: int, p: float) -> torch.Tensor:
    """The flat indices, among n, of i.i.d. Bernoulli(p) events, drawn from torch's global generator (seeded per
    client by the loop). On CPU, drawing n Bernoulli variables costs ~5-12 ns each, 60x the multiply they gate; the
    gaps between events are geometric, G = floor(log(1 - U) / log(1 - p)) + 1, so ~p n draws give the same law at
    a cost proportional to what is dropped (4x less than nn.Dropout at p = 0.05, measured at (8, 40, 384))."""
    std = math.sqrt(n * p * (1 - p))
    parts, last = [], -1
    while last < n - 1:  # ~p n + 6 std gaps cover n almost always; draw more when they do not
        u = torch.rand(int(p * n + 6 * std + 16), dtype=torch.float64)
        events = last + torch.cumsum(torch.floor(torch.log1p(-u) / math.log1p(-p)).long() + 1, 0)
        parts.append(events)
        last = int(events[-1])
    events = torch.cat(parts) if len(parts) > 1 else parts[0]
    return events[events < n]


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


def factor_keys(state: dict) -> dict[str, tuple[str, str]]:
    """{LoRA module name: (its A's key, its B's key)} of a state dict, in sorted order (what aggregation reads)."""
    layers = sorted({split_factor(k)[0] for k in state if split_factor(k)})
    return {n: (f"{n}.A", f"{n}.B") for n in layers}


@contextlib.contextmanager
def gated(model: nn.Module, gate: torch.Tensor | None):
    """Bind `gate` ((K,) or (B, K)) on every LoRALinear for the duration of the block, then restore the
    previous gates, also on exception. This is how a gate reaches FFNs inside a transformers forward.
    A (K,) gate with a single nonzero entry (training one subspace) is read once here, so that the layers
    compute only that subspace."""
    modules = list(lora_modules(model).values())
    previous = [(m.gate, m.active) for m in modules]
    active = one_entry(gate)
    try:
        for m in modules:
            m.gate, m.active = gate, active
        yield model
    finally:
        for m, (g, a) in zip(modules, previous):
            m.gate, m.active = g, a


def one_entry(gate: torch.Tensor | None) -> tuple[int, float] | None:
    """(k, gate_k) when a (K,) gate has exactly one nonzero entry, else None."""
    if gate is None or gate.dim() != 1:
        return None
    nonzero = [(k, g) for k, g in enumerate(gate.tolist()) if g != 0]
    return nonzero[0] if len(nonzero) == 1 else None


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
