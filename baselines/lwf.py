"""LwF, Learning without Forgetting (Li & Hoiem, TPAMI 2017, arXiv:1606.09282, sec. 3), as an FCIT baseline:

    L = L_task + lambda T^2 KL(softmax(z_old / T) || softmax(z / T)),   T = 2, on answer tokens only

z_old: the previous stage's global model on the client's current data. Only its trainable state is kept; the
teacher is the same model with that state swapped in functionally (torch.func.functional_call), never a copy.

    python train.py --setting task-hom --method lwf
Tests: python -m pytest -q tests/test_baselines.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from federated import Finetune, add_losses, client_state, strip_prefix

# B batch, T tokens, V vocabulary, N answer tokens


@dataclass
class LwFConfig:
    lam: float = 1.0  # weight of LwF's distillation term (Li & Hoiem: 1)
    temperature: float = 2.0  # T (Li & Hoiem)


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float) -> Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), the mean over answer positions.
    logits (B, T, V), labels (B, T) with -100 outside the answer; the logits at t predict the token at t + 1."""
    mask = labels[:, 1:] != -100  # (B, T-1)
    s = student[:, :-1][mask].float() / temperature  # (N, V)
    t = teacher[:, :-1][mask].float() / temperature  # (N, V)
    # KL(p_old || p) = sum_v p_old (log p_old - log p), averaged over the N answer tokens
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return temperature ** 2 * kl  # T^2 keeps the gradient's scale independent of T (Hinton et al. 2015)


def lwf_loss(teacher: dict[str, Tensor], *, lam: float, temperature: float):
    """(model, batch, outputs) -> lambda * distillation of the teacher's answer distribution into the model. The
    student's logits are those of the task loss's forward (`outputs`, passed by local_train; recomputed if absent).
    The teacher is the same model with `teacher` in place of its trainable parameters (torch.func.functional_call),
    so no copy of the model is made and the parameters are never written to (an in-place swap would invalidate the
    autograd graph of the task loss computed just before)."""
    def loss(model, batch, outputs=None):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        training = model.training
        model.eval()  # a deterministic teacher: no LoRA dropout
        with torch.no_grad():
            z_old = torch.func.functional_call(model, teacher, args=(), kwargs=inputs).logits  # (B, T, V)
        model.train(training)
        z = (outputs if outputs is not None else model(**inputs)).logits  # (B, T, V)
        return lam * distillation_loss(z, z_old, batch["labels"], temperature=temperature)
    return loss


class LwF(Finetune):
    name = "lwf"

    def __init__(self, model, harness, cfg, *, hp: LwFConfig | None = None, **kw):
        super().__init__(model, harness, cfg, hp=hp or LwFConfig(), **kw)
        self.teacher = None

    def end_stage(self, stage, data):
        self.teacher = client_state(self.model)  # the stage's final global model teaches the next stages

    def extra_loss(self, stage):
        own = None if self.teacher is None else lwf_loss(self.teacher, lam=self.hp.lam,
                                                          temperature=self.hp.temperature)
        return add_losses(super().extra_loss(stage), own)

    def state(self):
        return {**super().state(), **{f"lwf.{k}": v for k, v in (self.teacher or {}).items()}}

    def load(self, state):
        super().load(state)
        self.teacher = {k: v.to(self.model.device) for k, v in strip_prefix(state, "lwf.").items()} or None
