"""O-LoRA (Wang et al., Findings of EMNLP 2023, arXiv:2310.14152, sec. 3), as an FCIT baseline:

    L = L_task + lambda_1 sum_{j < t} ||A_t A_j^T||_1     over every LoRA layer  (lambda_1 = 0.5)

One LoRA subspace per stage (K = stages, rank = total rank / K); stage t trains its stage subspace beside the
frozen subspaces of the earlier stages, switched on; inference sums all subspaces. The L1 norm is the official
code's (absolute sum of the entries).

Where we depart from the original, on purpose: O-LoRA freezes the old LoRAs by keeping them out of the optimizer;
here they are in it (one state layout for every method) and a gradient mask on A and B gives them exactly zero
gradient, so AdamW (weight decay 0) never moves them.

    python train.py --setting task-hom --method olora
Tests: python -m pytest -q tests/test_baselines.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from federated import Finetune, add_losses
from lora import lora_modules

# K subspaces, R rank per subspace, D_in width, J earlier subspaces


@dataclass
class OLoRAConfig:
    lam: float = 0.5  # lambda_1 of O-LoRA's orthogonality loss (its official scripts)


def orthogonality_loss(A: Tensor, k: int) -> Tensor:
    """sum_{j < k} ||A_k A_j^T||_1 for one layer's A (K, R, D_in). The old A_j are constants (detached):
    the loss turns the new subspace away from the old ones, never the reverse."""
    # (R, D_in) x (J, R, D_in) -> (J, R, R)
    return torch.einsum("ri,jsi->jrs", A[k], A[:k].detach()).abs().sum()


class OLoRA(Finetune):
    """K = stages subspaces; stage t trains subspace k = min(t, K - 1) with subspaces 0..k-1 on and frozen, so the new
    one learns beside what inference will add to it; inference sums them all."""
    name = "olora"

    @staticmethod
    def lora_layout(*, rank, subspace_rank, num_stages):
        if rank % num_stages:
            raise ValueError(f"olora: rank {rank} is not a multiple of the {num_stages} stages")
        return num_stages, rank // num_stages

    def __init__(self, model, harness, cfg, *, hp: OLoRAConfig | None = None, **kw):
        super().__init__(model, harness, cfg, hp=hp or OLoRAConfig(), **kw)
        self.hooks = []

    def stage_subspace(self, stage):
        return min(stage, self.num_subspaces() - 1)

    def assign(self, stage, round, jobs):
        self.freeze_before(self.stage_subspace(stage))
        return [self.stage_subspace(stage)] * len(jobs)

    def train_gate(self, subspace):
        return (torch.arange(self.num_subspaces()) <= subspace).float()  # (K,): old and new on, later ones off

    def freeze_before(self, k):
        """Subspaces j < k get exactly zero gradient from now on (a mask on the gradients of A and B)."""
        for h in self.hooks:
            h.remove()
        keep = (torch.arange(self.num_subspaces()) >= k).float()  # (K,)
        mask = lambda g: g * keep.to(g).view(-1, *[1] * (g.dim() - 1))  # (K, ...) per-subspace rows
        self.hooks = [p.register_hook(mask) for m in lora_modules(self.model).values() for p in (m.A, m.B)]

    def extra_loss(self, stage):
        k, lam = self.stage_subspace(stage), self.hp.lam
        own = None if k == 0 else (
            lambda model, batch, outputs=None: lam * sum(orthogonality_loss(m.A, k) for m in lora_modules(model).values()))
        return add_losses(super().extra_loss(stage), own)
