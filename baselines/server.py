"""Server optimizers of federated learning: what the server does with the clients' aggregate (FedOpt).

Adaptive Federated Optimization (Reddi et al., ICLR 2021, arXiv:2003.00295, Algorithm 2) treats the change that
aggregation proposes as a pseudo-gradient and takes an optimizer step along it:

    Delta = x_agg - x                                            (aggregated minus previous global)
    fedavg      x <- x + Delta                                   (= x_agg: McMahan et al. 2017)
    fedavgm     m <- b1 m + Delta,  x <- x + eta m                     (Hsu et al. 2019, arXiv:1909.06335)
    fedadagrad  m <- b1 m + (1 - b1) Delta,  v <- v + Delta^2
    fedadam     m <- b1 m + (1 - b1) Delta,  v <- b2 v + (1 - b2) Delta^2
    fedyogi     m <- b1 m + (1 - b1) Delta,  v <- v - (1 - b2) Delta^2 sign(v - Delta^2)
                and then, for these three,   x <- x + eta m / (sqrt(v) + tau)
    fedprox     the server is fedavg; each client adds (mu / 2) ||w - w_global||^2 to its loss (Li et al., MLSys 2020,
                arXiv:1812.06127, eq. 2)

As in Algorithm 2: m starts at 0 and v at tau^2 (the paper asks v_-1 >= tau^2), no bias correction, b1 0.9,
b2 0.99, tau 1e-3. The server learning rate eta was tuned per task in the paper; our defaults are eta 1 for
fedavgm (Hsu et al.'s setting; the steady-state step is then Delta / (1 - b1)) and eta 1e-2 for the adaptive
three (m / sqrt(v) is about +-1 in early rounds, so an element moves about eta per round, about as far as a
client's AdamW at lr 2e-3 moves it in a local epoch of a few steps); --server-lr overrides both.

Subspaces (DISCO): every rule is elementwise, so it applies to every tensor of the state; but a subspace that no
client trained this round must not move, or old momentum would drift a task's subspace after its clients are
gone. `subspace_mask` says where the server may step; outside it x, m and v are kept exactly as they were (a lazy,
sparse-Adam-like update). Momentum on LoRA factors needs factors that stay comparable across rounds, that is
`--aggregate ab`; with `svd` the factors are re-factored every round (config/run.py's resolve refuses that combination).

`ServerOptimizer(strategy, cfg)` puts a server on top of any strategy (Finetune, DISCO, a baseline): it changes
the aggregate, adds FedProx's local term, and keeps the moments in the checkpoint; everything else is the wrapped
strategy's. Plain FedAvg is no wrapper at all (train.py wraps only for --server other than fedavg).

    python train.py --setting task-hom --server fedadam --aggregate ab
Tests: python -m pytest -q tests/test_server.py
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from federated import add_losses, client_state, strip_prefix
from lora import split_factor

# K subspaces, R rank, I d_in, O d_out

SERVERS = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
STATEFUL = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")  # keep moments over factor deltas: need --aggregate ab


@dataclass
class ServerConfig:
    name: str = "fedavg"  # one of SERVERS
    lr: float | None = None  # eta; None = 1e-2 for fedadagrad / fedadam / fedyogi, 1 otherwise (see above)
    beta1: float = 0.9  # b1 (Reddi et al.)
    beta2: float = 0.99  # b2 (Reddi et al.)
    tau: float = 1e-3  # adaptivity tau (Reddi et al.); also v's initial value tau^2
    mu: float = 0.01  # FedProx proximal weight

    def __post_init__(self):
        if self.name not in SERVERS:
            raise ValueError(f"--server {self.name!r} is unknown; choose one of {', '.join(SERVERS)}")
        if self.name not in STATEFUL and self.lr not in (None, 1.0):
            raise ValueError(f"--server-lr is eta of {', '.join(STATEFUL)}; --server {self.name} takes the aggregate "
                             f"as it is (eta 1)")
        if self.lr is None:
            self.lr = 1e-2 if self.name in ("fedadagrad", "fedadam", "fedyogi") else 1.0
        for name, x, ok in (("--server-lr", self.lr, 0 < self.lr < math.inf), ("--mu", self.mu, 0 <= self.mu < math.inf),
                            ("tau", self.tau, 0 < self.tau < math.inf), ("beta1", self.beta1, 0 <= self.beta1 < 1),
                            ("beta2", self.beta2, 0 <= self.beta2 < 1)):
            if not ok:                                                # nan fails every comparison
                raise ValueError(f"server.ServerConfig: {name} is out of range, got {x} (--server-lr and tau must be "
                                 f"finite and > 0, --mu finite and >= 0, the betas in [0, 1))")


# ---------------------------------------------------------------------------- one step of one tensor
def moments(name: str, delta: Tensor, m: Tensor, v: Tensor, cfg: ServerConfig) -> tuple[Tensor, Tensor, Tensor]:
    """New (m, v) and the step added to x, for one tensor: the rules of Reddi et al., Algorithm 2."""
    b1, b2, eta, tau = cfg.beta1, cfg.beta2, cfg.lr, cfg.tau
    if name == "fedavgm":
        # m <- b1 m + Delta,  x <- x + eta m
        m = b1 * m + delta
        return m, v, eta * m
    # m <- b1 m + (1 - b1) Delta
    m = b1 * m + (1 - b1) * delta
    d2 = delta.square()
    if name == "fedadagrad":
        # v <- v + Delta^2
        v = v + d2
    elif name == "fedadam":
        # v <- b2 v + (1 - b2) Delta^2
        v = b2 * v + (1 - b2) * d2
    elif name == "fedyogi":
        # v <- v - (1 - b2) Delta^2 sign(v - Delta^2): v grows at most additively, unlike Adam's decay
        v = v - (1 - b2) * d2 * torch.sign(v - d2)
    else:
        raise ValueError(f"server.moments: {name!r} keeps no moments; use one of {STATEFUL}")
    # x <- x + eta m / (sqrt(v) + tau)
    return m, v, eta * m / (v.sqrt() + tau)


# ---------------------------------------------------------------------------- one step of the whole state
def subspace_mask(state: dict[str, Tensor], subspaces) -> dict[str, Tensor]:
    """Where the server may step this round: the LoRA subspaces in `subspaces` (a (K, 1, 1) boolean over A (K, R, I)
    and B (K, O, R), the LoRA factors as lora.split_factor tells them); tensors absent from the mask (the
    projector, a router) are stepped entirely."""
    mask = {}
    for key, x in state.items():
        if split_factor(key):
            m = torch.zeros(x.shape[0], 1, 1, dtype=torch.bool, device=x.device)  # (K, 1, 1)
            m[sorted(subspaces)] = True
            mask[key] = m
    return mask


def step(x: dict[str, Tensor], aggregated: dict[str, Tensor], state: dict[str, Tensor], mask: dict[str, Tensor],
         cfg: ServerConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The new global state and the new moments {"m.<key>", "v.<key>"} (the inputs are not mutated).
    Outside `mask` x, m and v stay exactly as they were."""
    if cfg.name not in STATEFUL:
        return aggregated, state  # fedavg, fedprox: x + (x_agg - x) is x_agg, returned as is (no rounding)
    new_x, new_state = {}, dict(state)
    for key, x_k in x.items():
        x32 = x_k.float()
        delta = aggregated[key].to(x32) - x32  # the pseudo-gradient
        # moments restored from a checkpoint arrive on the CPU: follow x
        m = state.get(f"m.{key}", torch.zeros_like(x32)).to(x32)
        v = state.get(f"v.{key}", torch.full_like(x32, cfg.tau ** 2)).to(x32)  # v_-1 = tau^2 (Algorithm 2)
        m_new, v_new, dx = moments(cfg.name, delta, m, v, cfg)
        keep = mask.get(key, torch.ones((), dtype=torch.bool, device=x32.device))  # broadcasts over x
        new_x[key] = torch.where(keep, x32 + dx, x32).to(x_k.dtype)
        new_state[f"m.{key}"] = torch.where(keep, m_new, m)
        if cfg.name != "fedavgm":  # momentum alone keeps no second moment
            new_state[f"v.{key}"] = torch.where(keep, v_new, v)
    return new_x, new_state


# ---------------------------------------------------------------------------- FedProx, the client side
def proximal_loss(anchor: dict[str, Tensor], *, mu: float):
    """(model, batch) -> (mu / 2) ||w - w_global||^2 over the parameters in `anchor` (the global state the client
    started from): FedProx's local term, which keeps a client from drifting far from the global model."""
    def loss(model, batch, outputs=None):
        params = dict(model.named_parameters())
        return 0.5 * mu * sum((params[k].float() - w.float()).square().sum() for k, w in anchor.items())
    return loss


# ---------------------------------------------------------------------------- the wrapper strategy
class ServerOptimizer:
    """`strategy` with the server optimizer `cfg` on top. Only aggregate, extra_loss, state and load differ; every
    other attribute is the wrapped strategy's (its subspaces, gates, report)."""

    def __init__(self, strategy, cfg: ServerConfig):
        self.strategy, self.cfg, self.moments = strategy, cfg, {}

    def __getattr__(self, name):
        return getattr(self.strategy, name)

    def aggregate(self, global_state, states, weights, subspaces):
        new = self.strategy.aggregate(global_state, states, weights, subspaces)
        mask = subspace_mask(global_state, self.strategy.trained_subspaces(subspaces))
        new, self.moments = step(global_state, new, self.moments, mask, self.cfg)
        return new

    def extra_loss(self, stage):
        # the loop asks right after loading the global state into the model: the anchor is w_global
        own = proximal_loss(client_state(self.strategy.model), mu=self.cfg.mu) if self.cfg.name == "fedprox" else None
        return add_losses(own, self.strategy.extra_loss(stage))

    def state(self):
        return {**self.strategy.state(), **{f"server.{k}": v for k, v in self.moments.items()}}

    def load(self, state):
        self.strategy.load(state)
        self.moments = strip_prefix(state, "server.")
