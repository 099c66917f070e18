"""EWC, Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017, arXiv:1612.00796, eq. 3), as an FCIT baseline:

    L = L_task + (lambda / 2) sum_i F_i (theta_i - theta*_i)^2

F is the diagonal empirical Fisher of the answer loss at the end of a stage, estimated by the clients of the stage's
last round on their own data and averaged by the server weighted by sample count; the stages' Fishers add up and
theta* is the latest stage's final global model (one penalty for all past stages: online EWC, Schwarz et al. 2018,
with gamma = 1). theta = LoRA factors and projector.

Where we depart from the original, on purpose: the Fisher is estimated when the stage's last round has been
aggregated (by that round's clients, at the new global weights; with a server optimizer, at the clients' aggregate
before the server's step) and kept in the strategy's state, so a checkpoint taken before `end_stage` keeps it.

The anchor and the Fisher are per coordinate of the LoRA factors A and B, so EWC runs with `--aggregate ab` (its
default; train.py refuses svd): svd re-factors the aggregated update B A every round into new factors (the same
product, other coordinates), and the penalty would then pull towards factors that no longer exist. `--verbose`
prints the penalty at each client's first local step (the round's global weights) beside that step's task loss.

    python train.py --setting task-hom --method ewc --verbose
Tests: python -m pytest -q tests/test_baselines.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fcit import fedavg
from federated import Finetune, add_losses, client_state, load_client_state, strip_prefix


@dataclass
class EWCConfig:
    # lambda of EWC's penalty: set so that after one local epoch on a new task the penalty is of the order of the
    # task loss (sum F (theta - theta*)^2 was ~6e-4 on an earlier tiny base); not re-tuned since: on benchmark v11
    # under ab it is 0.01-0.24 at the start of a round against a task loss of 0.7-4.5 (task-hom, seed 0, README)
    lam: float = 1e3
    fisher_examples: int = 32  # per client of the stage's last round: one backward each (empirical Fisher)


def fisher_diagonal(model, batches, loss_fn=lambda model, batch: model(**batch).loss) -> tuple[dict[str, Tensor], int]:
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


class EWC(Finetune):
    name = "ewc"
    factor_state = "its anchor and Fisher"  # per coordinate of A and B: needs --aggregate ab (config/run.py)

    def __init__(self, model, harness, cfg, *, hp: EWCConfig | None = None, **kw):
        super().__init__(model, harness, cfg, hp=hp or EWCConfig(), **kw)
        self.jobs, self.rounds_done = None, 0
        self.stage_fisher, self.fisher, self.anchor = None, None, None

    def assign(self, stage, round, jobs):
        self.jobs = jobs  # the round's clients; those of the stage's last round estimate the Fisher
        return super().assign(stage, round, jobs)

    def client_fisher(self, examples):
        """One client: the Fisher on (at most fisher_examples of) its own data, one example per backward."""
        return fisher_diagonal(self.model, (self.harness.make_batch([e]) for e in examples[:self.hp.fisher_examples]))

    def aggregate(self, global_state, states, weights, subspaces):
        new = super().aggregate(global_state, states, weights, subspaces)
        self.rounds_done += 1
        if self.rounds_done == self.cfg.rounds:
            # the stage's last round: its clients estimate the Fisher at the new global weights, and the server
            # averages them weighted by sample count (a mean over all their examples)
            load_client_state(self.model, new)
            fishers, counts = zip(*(self.client_fisher(ex) for _, _, ex in self.jobs))
            self.stage_fisher = fedavg(list(fishers), list(counts))
        return new

    def end_stage(self, stage, data):
        # F <- F + F_stage;  theta* <- the stage's final global model (the model holds it now)
        F_t = self.stage_fisher
        if F_t is not None:
            self.fisher = F_t if self.fisher is None else {k: self.fisher[k] + F_t[k] for k in F_t}
        self.anchor = client_state(self.model)
        self.rounds_done, self.stage_fisher = 0, None

    def extra_loss(self, stage):
        own = None if self.fisher is None else self.with_first_step_detail(
            ewc_penalty(self.fisher, self.anchor, lam=self.hp.lam))
        return add_losses(super().extra_loss(stage), own)

    def with_first_step_detail(self, penalty):
        """The penalty, its value at the client's first local step sent to `detail` (--verbose) with that step's
        task loss: at the round's global weights, before the client moves, how large EWC's pull is against the task.
        The loop asks for the extra loss once per client, so each client says it once."""
        first = True

        def loss(model, batch, outputs=None):
            nonlocal first
            value = penalty(model, batch, outputs)
            if first:
                first = False
                task = "" if outputs is None else f" (task loss {outputs.loss.item():.3f})"
                self.detail(f"  EWC penalty at the first local step {value.item():.4g}{task}")
            return value
        return loss

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
            # tensors restored from a checkpoint arrive on the CPU: follow the model
            d = {k: v.to(self.model.device) for k, v in strip_prefix(state, f"ewc.{attr}.").items()}
            setattr(self, attr, d or None)
