"""MoELoRA (Luo et al. 2024, arXiv:2402.12851; the dense variant of CoIN, Chen et al. 2024, arXiv:2403.08350), as an
FCIT baseline:

    h = W0 x + s sum_e a_e(x) B_e A_e x,     a(x) = softmax(x W_r),  W_r (D_in, E), per token

E experts at DISCO's subspace rank; every client trains every expert and the router; FedAvg of all. No top-k routing
and no auxiliary (balance, contrastive) loss.

    python train.py --setting task-hom --method moelora
Tests: python -m pytest -q tests/test_baselines.py
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

import fcit
from federated import Disco, Finetune
from lora import LoRALinear, add_update, expand_gate, factor_keys

# D_in / D_out widths, R rank per expert, E experts


class MoELoRALinear(LoRALinear):
    """LoRALinear whose K subspaces are E experts mixed per token by a learned router W_r (D_in, E)."""

    def __init__(self, base: nn.Linear, *, num_subspaces: int, rank: int, alpha: float, dropout: float = 0.0,
                 init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__(base, num_subspaces=num_subspaces, rank=rank, alpha=alpha, dropout=dropout,
                         init_std=init_std, generator=generator)
        # W_r = 0: every expert has weight 1 / E at step 0 (the experts differ by their random A)
        self.router = nn.Parameter(torch.zeros(base.in_features, num_subspaces, dtype=torch.float32,
                                               device=base.weight.device))  # (D_in, E)

    def router_weights(self, x: Tensor) -> Tensor:  # x (..., D_in) -> (..., E)
        # a(x) = softmax_e(x W_r), in float32 whatever the base dtype
        return torch.softmax(x.float() @ self.router, dim=-1)

    def forward(self, x: Tensor) -> Tensor:  # x (..., D_in) -> (..., D_out)
        E, R = self.num_subspaces, self.rank
        a = self.router_weights(x)  # (..., E)
        if self.gate is not None:  # an outer gate (lora.gated) still switches experts off: zeros = the base model
            a = a * expand_gate(self.gate, x, 1).to(a)  # (..., E)
        # the parent's math with a per-token gate: rows of A_e scaled by a_e(x)
        A_flat = self.A.reshape(E * R, -1)  # (E*R, D_in)
        B_flat = self.B.permute(1, 0, 2).reshape(self.B.shape[1], E * R)  # (D_out, E*R)
        x_kept, keep = self.drop(x.float())
        z = (x_kept @ A_flat.T) * a.repeat_interleave(R, dim=-1)  # (..., E*R)
        # h = W0 x + b + s * sum_e a_e(x) B_e A_e x
        return add_update(self.base(x), z, B_flat, self.scaling / keep)  # (..., D_out)


class MoELoRA(Finetune):
    """Every client trains every expert and the router (no train gate); each expert is aggregated over all clients
    (fcit.aggregate per subspace), the router and projector by FedAvg; no gate at inference (the router decides)."""
    name = "moelora"
    layer = MoELoRALinear
    lora_layout = staticmethod(Disco.lora_layout)  # E experts of DISCO's subspace rank: the same budget as DISCO

    def train_gate(self, subspace):
        return None

    def aggregate(self, global_state, states, weights, subspaces):
        new, factors = global_state, factor_keys(global_state)
        for k in range(self.num_subspaces()):
            new, _ = fcit.aggregate(new, states, weights, [k] * len(states), factors=factors, mode=self.cfg.aggregate)
        return new

    def trained_subspaces(self, subspaces):
        return set(range(self.num_subspaces()))
