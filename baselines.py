"""The continual-learning baselines of FCIT (arXiv:2503.12897, Table 1), each a `federated.Strategy` at DISCO's
budget: the same total LoRA rank, rounds, clients and data; only what a method adds to the local loss, to the
LoRA layout or to the server differs.

  ewc      Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017, arXiv:1612.00796, eq. 3):
               L = L_task + (lambda / 2) sum_i F_i (theta_i - theta*_i)^2
           F is the diagonal empirical Fisher of the answer loss at the end of a stage, estimated by the clients of
           the stage's last round on their own data and averaged by the server weighted by sample count; the
           stages' Fishers add up and theta* is the latest stage's final global model (one penalty for all past
           stages: online EWC, Schwarz et al. 2018, with gamma = 1). theta = LoRA factors and projector.
  lwf      Learning without Forgetting (Li & Hoiem, TPAMI 2017, arXiv:1606.09282, sec. 3):
               L = L_task + lambda T^2 KL(softmax(z_old / T) || softmax(z / T)),   T = 2, on answer tokens only
           z_old: the previous stage's global model on the client's current data. Only its trainable state is kept.
  olora    O-LoRA (Wang et al., Findings of EMNLP 2023, arXiv:2310.14152, sec. 3):
               L = L_task + lambda_1 sum_{j < t} ||A_t A_j^T||_1     over every LoRA layer  (lambda_1 = 0.5)
           one LoRA subspace per stage (K = stages, rank = total rank / K); stage t trains subspace t beside the
           frozen subspaces of the earlier stages, switched on; inference sums all subspaces. The L1 norm is the
           official code's (absolute sum of the entries).
  moelora  MoELoRA (Luo et al. 2024, arXiv:2402.12851; the dense variant of CoIN, Chen et al. 2024, arXiv:2403.08350):
               h = W0 x + s sum_e a_e(x) B_e A_e x,     a(x) = softmax(x W_r),  W_r (D_in, E), per token
           E experts at DISCO's subspace rank; every client trains every expert and the router; FedAvg of all.
           No top-k routing and no auxiliary (balance, contrastive) loss.

Where we depart from the originals, on purpose:
  - O-LoRA freezes the old LoRAs by keeping them out of the optimizer; here they are in it (one state layout for
    every method) and a gradient mask on A and B gives them exactly zero gradient, so AdamW (weight decay 0) never
    moves them. As in O-LoRA they stay switched on while the new one trains, and all are summed at inference.
  - EWC's Fisher is estimated when the stage's last round has been aggregated (by that round's clients, at the
    new global weights) and kept in the strategy's state, so a checkpoint taken before `end_stage` keeps it.

    python train.py --setting task-hom --method ewc      (lwf | olora | moelora)
Tests: python -m pytest -q tests/test_baselines.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from federated import Strategy, aggregate, fedavg, load_state, make_batch, trainable_state
from lora import LoRAConfig, LoRALinear, _expand_gate, add_lora, lora_modules
from model import answer_loss

# B batch, T tokens, V vocabulary, D_in / D_out widths, R rank per subspace, K subspaces (E experts), N examples


@dataclass
class BaselineConfig:
    # lambda of EWC's penalty: set so that after one local epoch on a new task the penalty is of the order of the
    # task loss (sum F (theta - theta*)^2 was ~6e-4 on an earlier tiny base; not re-tuned since, see README)
    ewc_lambda: float = 1e3
    fisher_examples: int = 32  # per client of the stage's last round: one backward each (empirical Fisher)
    lwf_lambda: float = 1.0  # weight of LwF's distillation term (Li & Hoiem: 1)
    lwf_temperature: float = 2.0  # T (Li & Hoiem)
    olora_lambda: float = 0.5  # lambda_1 of O-LoRA's orthogonality loss (its official scripts)


def add_losses(*fns):
    """One extra local loss from several (None = absent), e.g. a method's term plus FedProx's proximal term."""
    fns = [f for f in fns if f is not None]
    if len(fns) <= 1:
        return fns[0] if fns else None
    return lambda model, batch, outputs=None: sum(f(model, batch, outputs) for f in fns)


class Baseline(Strategy):
    """A Strategy with the baselines' hyperparameters; everything else is Finetune's until a method overrides it."""

    def __init__(self, model, processor, cfg, *, baselines: BaselineConfig | None = None, **kw):
        super().__init__(model, processor, cfg, **kw)
        self.hp = baselines or BaselineConfig()

    def restored(self, state, prefix):
        """The tensors under `prefix` of a checkpoint (loaded on the CPU), on the model's device; None if none."""
        d = {k[len(prefix):]: v.to(self.model.device) for k, v in state.items() if k.startswith(prefix)}
        return d or None


# ---------------------------------------------------------------------------- EWC
def fisher_diagonal(model, batches, loss_fn=answer_loss) -> tuple[dict[str, Tensor], int]:
    """F_i = mean over batches of (d loss / d theta_i)^2 for every trainable parameter, and the number of batches:
    the diagonal empirical Fisher when each batch is one example."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:  # a parameter the loss does not reach has zero Fisher
                total[n] += g.float().square()
        count += 1
    return {n: t / max(count, 1) for n, t in total.items()}, count


def ewc_penalty(fisher: dict[str, Tensor], anchor: dict[str, Tensor], *, lam: float):
    """(model, batch, outputs) -> (lambda / 2) sum_i F_i (theta_i - theta*_i)^2 over the parameters in `fisher`."""
    def loss(model, batch, outputs=None):
        params = dict(model.named_parameters())
        return 0.5 * lam * sum((F_k * (params[k].float() - anchor[k].float()).square()).sum()
                               for k, F_k in fisher.items())
    return loss


class EWC(Baseline):
    name = "ewc"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.jobs, self.rounds_done = None, 0
        self.stage_fisher, self.fisher, self.anchor = None, None, None

    def assign(self, stage, jobs):
        self.jobs = jobs  # the round's clients; those of the stage's last round estimate the Fisher
        return super().assign(stage, jobs)

    def client_fisher(self, examples):
        """One client: the Fisher on (at most fisher_examples of) its own data, one example per backward."""
        batches = (make_batch(self.processor, [e], self.cfg.system, self.model.device, self.model.dtype)
                   for e in examples[:self.hp.fisher_examples])
        return fisher_diagonal(self.model, batches)

    def aggregate(self, global_state, states, weights, subspaces):
        new = super().aggregate(global_state, states, weights, subspaces)
        self.rounds_done += 1
        if self.rounds_done == self.cfg.rounds:
            # the stage's last round: its clients estimate the Fisher at the new global weights, and the server
            # averages them weighted by sample count (a mean over all their examples)
            load_state(self.model, new)
            fishers, counts = zip(*(self.client_fisher(ex) for _, _, ex in self.jobs))
            self.stage_fisher = fedavg(list(fishers), list(counts))
        return new

    def end_stage(self, stage, data):
        # F <- F + F_stage;  theta* <- the stage's final global model (the model holds it now)
        F_t = self.stage_fisher
        if F_t is not None:
            self.fisher = F_t if self.fisher is None else {k: self.fisher[k] + F_t[k] for k in F_t}
        self.anchor = trainable_state(self.model)
        self.rounds_done, self.stage_fisher = 0, None

    def extra_loss(self, stage):
        own = None if self.fisher is None else ewc_penalty(self.fisher, self.anchor, lam=self.hp.ewc_lambda)
        return add_losses(super().extra_loss(stage), own)

    def state(self):
        out = {**super().state(), "ewc.rounds_done": torch.tensor(self.rounds_done)}
        for prefix, d in (("ewc.stage_fisher.", self.stage_fisher), ("ewc.fisher.", self.fisher),
                          ("ewc.anchor.", self.anchor)):
            out.update({prefix + k: v for k, v in (d or {}).items()})
        return out

    def load(self, state):
        super().load(state)
        self.rounds_done = int(state.get("ewc.rounds_done", 0))
        for attr in ("stage_fisher", "fisher", "anchor"):
            setattr(self, attr, self.restored(state, f"ewc.{attr}."))


# ---------------------------------------------------------------------------- LwF
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


class LwF(Baseline):
    name = "lwf"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.teacher = None

    def end_stage(self, stage, data):
        self.teacher = trainable_state(self.model)  # the stage's final global model teaches the next stages

    def extra_loss(self, stage):
        own = None if self.teacher is None else lwf_loss(self.teacher, lam=self.hp.lwf_lambda,
                                                          temperature=self.hp.lwf_temperature)
        return add_losses(super().extra_loss(stage), own)

    def state(self):
        return {**super().state(), **{f"lwf.{k}": v for k, v in (self.teacher or {}).items()}}

    def load(self, state):
        super().load(state)
        self.teacher = self.restored(state, "lwf.")


# ---------------------------------------------------------------------------- O-LoRA
def orthogonality_loss(A: Tensor, slot: int) -> Tensor:
    """sum_{j < slot} ||A_slot A_j^T||_1 for one layer's A (K, R, D_in). The old A_j are constants (detached):
    the loss turns the new subspace away from the old ones, never the reverse."""
    # (R, D_in) x (J, R, D_in) -> (J, R, R)
    return torch.einsum("ri,jsi->jrs", A[slot], A[:slot].detach()).abs().sum()


class OLoRA(Baseline):
    """K = stages subspaces; stage t trains subspace k = min(t, K - 1) with subspaces 0..k-1 on and frozen, so the new
    one learns beside what inference will add to it; inference sums them all."""
    name = "olora"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.hooks = []

    def slot(self, stage):
        return min(stage, self.num_slots() - 1)

    def assign(self, stage, jobs):
        self.freeze_before(self.slot(stage))
        return [self.slot(stage)] * len(jobs)

    def train_gate(self, subspace):
        return (torch.arange(self.num_slots()) <= subspace).float()  # (K,): old and new on, later slots off

    def freeze_before(self, k):
        """Subspaces j < k get exactly zero gradient from now on (a mask on the gradients of A and B)."""
        for h in self.hooks:
            h.remove()
        keep = (torch.arange(self.num_slots()) >= k).float()  # (K,)
        mask = lambda g: g * keep.to(g).view(-1, *[1] * (g.dim() - 1))  # (K, ...) per-subspace rows
        self.hooks = [p.register_hook(mask) for m in lora_modules(self.model).values() for p in (m.A, m.B)]

    def extra_loss(self, stage):
        k, lam = self.slot(stage), self.hp.olora_lambda
        own = None if k == 0 else (
            lambda model, batch, outputs=None: lam * sum(orthogonality_loss(m.A, k) for m in lora_modules(model).values()))
        return add_losses(super().extra_loss(stage), own)


# ---------------------------------------------------------------------------- MoELoRA
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
            a = a * _expand_gate(self.gate, x, 1).to(a)  # (..., E)
        # the parent's math with a per-token gate: rows of A_e scaled by a_e(x)
        A_flat = self.A.reshape(E * R, -1)  # (E*R, D_in)
        B_flat = self.B.permute(1, 0, 2).reshape(self.B.shape[1], E * R)  # (D_out, E*R)
        z = (self.dropout(x.float()) @ A_flat.T) * a.repeat_interleave(R, dim=-1)  # (..., E*R)
        # h = W0 x + b + s * sum_e a_e(x) B_e A_e x
        return self.base(x) + (self.scaling * (z @ B_flat.T)).to(x.dtype)  # (..., D_out)


def add_moelora(model: nn.Module, cfg: LoRAConfig, *, generator: torch.Generator | None = None) -> list[str]:
    """lora.add_lora with MoELoRALinear layers (K = E experts): the same targets, the same draws of A for a seed."""
    return add_lora(model, cfg, generator=generator, layer=MoELoRALinear)


class MoELoRA(Baseline):
    """Every client trains every expert and the router (no train gate); each expert is aggregated over all clients
    (federated.aggregate per slot), the router and projector by FedAvg; no gate at inference (the router decides)."""
    name = "moelora"

    def train_gate(self, subspace):
        return None

    def aggregate(self, global_state, states, weights, subspaces):
        new, K = global_state, self.num_slots()
        for k in range(K):
            new = aggregate(new, states, weights, [k] * len(states), mode=self.mode)
        return self.server_step(global_state, new, range(K))


METHODS = {"ewc": EWC, "lwf": LwF, "olora": OLoRA, "moelora": MoELoRA}
