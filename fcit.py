"""DISCO, the method of Federated Continual Instruction Tuning (Guo et al., ICCV 2025, arXiv:2503.12897): its two
parts, Dynamic Knowledge Organization and Subspace Selective Activation, as a pure,
model-agnostic core. Tensors in, tensors out; no model, no optimizer, no files. The last section, `DiscoStrategy`,
is what DISCO decides in federated.py's loop (layout, routing, gate, report), written with these functions.

Concepts (the names are the paper's and are used the same way in every file):
  identity token   a client's mean feature of its training instructions (frozen text encoder)
  global tokens    the server's cache g_1..g_K, one per subspace, with sample counts n_1..n_K
  subspace         one slice B_k A_k of every LoRA layer:  h = W0 x + s * sum_k a_k B_k A_k x
  DKO              Dynamic Knowledge Organization (training): a client whose token is close to g_k trains and is
                   aggregated in subspace k; a client close to none opens a new subspace
                       s_k = cos(t_c, g_k);   max_k s_k >= tau  ->  k* = argmax_k s_k,
                       g_k* <- (n_k* g_k* + n_c t_c) / (n_k* + n_c),   n_k* <- n_k* + n_c      (tau = 0.9)
                   when it may open (--open): in every round (the paper's text) or only in a stage's first round
                   (the official code; later rounds join argmax_k s_k whatever s_k)
  SSA              Subspace Selective Activation (inference): each question gates the subspaces by itself
                       a_k = exp(s_k / eps) / sum_j exp(s_j / eps),   s_k = cos(f(question), g_k)   (eps = 0.05)

Aggregation inside a subspace: the official code averages A and B separately (`ab`), which is not the average of
the updates; `svd` (our default) re-factors the exact update sum_i p_i B_i A_i to rank r (notes 2.4).

Where we depart from the official code (notes 2.2, "code quirks we do not copy"):
  - routing is per client, once, on the server, before the client trains; not per batch inside the client;
  - the running mean is the count-weighted mean above (the official one has an operator-precedence bug that
    freezes a recurring task's token);
  - the cache is float32 tokens and int64 counts that grow as needed up to K_max, not 8 fixed bf16 slots (bf16
    counts stop at 256);
  - because clients are routed before they train, two new tasks in one round simply open two subspaces and
    nothing trained is thrown away;
  - no routing state is parked on layers: the gate is bound on the LoRA layers only for the duration of one
    forward by `lora.gated` (a context manager that restores the previous gate), and forward only reads it.

Tests: python -m pytest -q tests/test_fcit.py tests/test_federated.py (aggregation, DiscoStrategy)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# N examples, C clients, D feature width, K subspaces, R rank, I d_in, O d_out

ACTIVATIONS = ("softmax", "argmax", "cosine", "concat")
AGGREGATIONS = ("svd", "ab")
IDENTITIES = ("text", "image", "both")
OPENINGS = ("every-round", "first-round")


@dataclass
class DiscoConfig:
    threshold: float = 0.9  # tau: cosine at or above which a client joins an existing subspace (DKO)
    temperature: float = 0.05  # eps of the SSA softmax
    activation: str = "softmax"  # softmax | argmax | cosine | concat  (the paper's ablation, notes 2.3)
    identity: str = "text"  # what identity tokens encode: text (paper) | image | both (the paper's ablation)
    # when DKO may open a subspace: every-round (the paper's text: tau applies to every client) | first-round (the
    # official code: only a stage's first round opens; later rounds join the nearest subspace). Measured over seeds
    # 0-2 on the embedded benchmark (RESULTS.md): first-round equal at 5 of 6 (setting, seed), 9 points higher
    # Last at task-hom seed 2, where every-round gave one task a spurious second subspace and filled the cap
    open: str = "first-round"
    # K_max, the most subspaces DKO may open, is not a field: it is the number of subspaces the LoRA layers hold,
    # rank / subspace_rank (DiscoStrategy.lora_layout)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"fcit.DiscoConfig: activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.identity not in IDENTITIES:
            raise ValueError(f"fcit.DiscoConfig: identity {self.identity!r} is not one of {IDENTITIES}")
        if self.open not in OPENINGS:
            raise ValueError(f"--open {self.open!r} is unknown; choose one of {', '.join(OPENINGS)}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"fcit.DiscoConfig: temperature must be a positive number, got {self.temperature}")
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"--threshold is a cosine: it must be in [-1, 1], got {self.threshold}")


# ---- Identity tokens

def identity_token(features: Tensor) -> Tensor:
    """A client's identity token: the mean of its instructions' features, (N, D) -> (D,) float32."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"fcit.identity_token: expected features of shape (N>0, D), got {tuple(features.shape)}")
    # accumulate in float64: encoder features may arrive in bf16, and N may be tens of thousands
    return features.to(torch.float64).mean(dim=0).float()  # (D,)


@dataclass
class TokenCache:
    """The server's global identity tokens g_1..g_K and sample counts n_1..n_K; row k is subspace k."""
    tokens: Tensor  # (K, D) float32: statistics, never bf16 parameters
    counts: Tensor  # (K,) int64: the weights of the running mean

    @classmethod
    def empty(cls, dim: int) -> "TokenCache":
        return cls(torch.zeros(0, dim, dtype=torch.float32), torch.zeros(0, dtype=torch.int64))

    def __len__(self) -> int:
        return self.tokens.shape[0]


def cosine_similarity(queries: Tensor, tokens: Tensor) -> Tensor:
    """s_bk = cos(q_b, g_k): (B, D), (K, D) -> (B, K); (B, 0) when no subspace is open yet."""
    if queries.ndim != 2 or tokens.ndim != 2 or queries.shape[1] != tokens.shape[1]:
        raise ValueError(f"fcit.cosine_similarity: expected (B, D) and (K, D), got "
                         f"{tuple(queries.shape)} and {tuple(tokens.shape)}")
    dtype = torch.promote_types(torch.promote_types(queries.dtype, tokens.dtype), torch.float32)
    q = F.normalize(queries.to(dtype), dim=-1)  # (B, D)
    g = F.normalize(tokens.to(queries.device, dtype), dim=-1)  # (K, D)
    return q @ g.T  # (B, K)


# ---- Dynamic Knowledge Organization

def may_open(rule: str, round: int) -> bool:
    """Whether DKO may open a subspace in this round (0-based, within its stage) under --open `rule`."""
    if rule not in OPENINGS:
        raise ValueError(f"fcit.may_open: unknown rule {rule!r}; use one of {OPENINGS}")
    # every-round: tau decides in every round (paper);  first-round: only round 0 of a stage opens (official code)
    return rule == "every-round" or round == 0


def route_clients(tokens: Tensor, counts: Tensor | Sequence[int], cache: TokenCache, *, threshold: float,
                  max_subspaces: int, client_ids: Sequence | None = None, open_new: bool = True
                  ) -> tuple[list[int], TokenCache, list[str]]:
    """DKO for the clients of one round, in order, before they train.

    Returns the subspace of each client, the new cache (the inputs are not mutated) and one log line per client.
    A client sees the subspaces opened by the clients before it, so two clients of a new task share one new
    subspace. `client_ids` only names the clients in the log (default 0..C-1). open_new=False (a later round under
    --open first-round, see may_open) sends every client to its nearest subspace whatever its cosine; with no
    subspace open yet there is nothing to join, and the client opens one all the same.
    """
    counts = torch.as_tensor(counts, dtype=torch.int64)  # (C,)
    if tokens.ndim != 2 or counts.shape != (tokens.shape[0],):
        raise ValueError(f"fcit.route_clients: expected tokens (C, D) and counts (C,), got "
                         f"{tuple(tokens.shape)} and {tuple(counts.shape)}")
    if bool((counts <= 0).any()):
        raise ValueError("fcit.route_clients: every client needs a positive sample count (it weights the mean)")
    if max_subspaces < 1:
        raise ValueError(f"fcit.route_clients: max_subspaces must be >= 1, got {max_subspaces}")
    names = list(range(tokens.shape[0])) if client_ids is None else list(client_ids)
    # the running mean is computed in float64 and stored in float32; the clone leaves the caller's cache intact
    g = cache.tokens.to(torch.float64).clone()  # (K, D)
    n = cache.counts.to(g.device).clone()  # (K,)
    assignment, log = [], []
    for c, (t_c, n_c) in enumerate(zip(tokens.to(g.device, torch.float64), counts.to(g.device))):
        s = cosine_similarity(t_c[None], g)[0]  # (K,)
        best = float(s.max()) if len(s) else -math.inf
        k = int(s.argmax()) if len(s) else -1
        if len(s) and best >= threshold:
            log.append(f"client {names[c]}: joined subspace {k} (cos {best:.2f} >= {threshold:.2f})")
        elif len(s) and not open_new:
            # k* = argmax_k s_k without tau: only a stage's first round opens (--open first-round, official code)
            log.append(f"client {names[c]}: joined the nearest subspace {k} (cos {best:.2f} < {threshold:.2f}; "
                       f"only a stage's first round opens subspaces)")
        elif len(g) < max_subspaces:
            # s_k < tau for every k: open subspace K+1, empty; the running mean below makes g_new = t_c, n_new = n_c
            k = len(g)
            g = torch.cat([g, torch.zeros_like(t_c)[None]])  # (K+1, D)
            n = torch.cat([n, torch.zeros_like(n_c)[None]])  # (K+1,)
            reason = f"best cos {best:.2f} < {threshold:.2f}" if len(s) else "no subspace yet"
            log.append(f"client {names[c]}: opened subspace {k} ({reason})")
        else:
            # the cache is full: a new task must share the nearest subspace; say so, it is a forgetting risk
            log.append(f"client {names[c]}: joined subspace {k} although cos {best:.2f} < {threshold:.2f}, "
                       f"because the cap of {max_subspaces} subspaces is reached")
        # g_k <- (n_k g_k + n_c t_c) / (n_k + n_c),  n_k <- n_k + n_c
        g[k] = (n[k] * g[k] + n_c * t_c) / (n[k] + n_c)
        n[k] += n_c
        assignment.append(k)
    return assignment, TokenCache(g.float(), n), log


# ---- Aggregation inside a subspace

def _normalized_weights(As: list[Tensor], Bs: list[Tensor], weights: Tensor, fn: str) -> Tensor:
    if len(As) == 0 or len(As) != len(Bs) or len(As) != len(weights):
        raise ValueError(f"fcit.{fn}: need as many A, B and weights (at least one), got "
                         f"{len(As)}, {len(Bs)}, {len(weights)}")
    for i, (A, B) in enumerate(zip(As, Bs)):
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[1] != As[0].shape[1] \
                or B.shape[0] != Bs[0].shape[0]:
            raise ValueError(f"fcit.{fn}: client {i} has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                             f"expected A (r, I) and B (O, r) with I, O shared by all clients")
    w = torch.as_tensor(weights, dtype=torch.float64)  # (n,)
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"fcit.{fn}: weights must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()  # p_i


def ab_aggregate(As: list[Tensor], Bs: list[Tensor], weights: Tensor) -> tuple[Tensor, Tensor]:
    """FedAvg of the factors, as the official code: A = sum p_i A_i (r, I), B = sum p_i B_i (O, r)."""
    # This is not the average of the updates: (sum p_i B_i)(sum p_i A_i) = sum_ij p_i p_j B_i A_j, which holds
    # the cross terms B_i A_j of different clients and shrinks each client's own term by p_i:
    # sum p_i B_i A_i != (sum p_i B_i)(sum p_i A_i). Kept to match the paper's numbers.
    p = _normalized_weights(As, Bs, weights, "ab_aggregate")
    if len({A.shape[0] for A in As}) > 1:
        raise ValueError(f"fcit.ab_aggregate: averaging factors needs one rank, got {[A.shape[0] for A in As]}; "
                         f"use mode 'svd' for clients of different ranks")
    A = sum(p_i * A_i.to(torch.float64) for p_i, A_i in zip(p, As))  # (r, I)
    B = sum(p_i * B_i.to(torch.float64) for p_i, B_i in zip(p, Bs))  # (O, r)
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def svd_aggregate(As: list[Tensor], Bs: list[Tensor], weights: Tensor, *, rank: int) -> tuple[Tensor, Tensor, float]:
    """The exact update dW = sum_i p_i B_i A_i, re-factored to its best rank-`rank` approximation (Eckart-Young),
    without forming the dense (O, I) matrix. Returns A (rank, I), B (O, rank) in the input dtype, and the
    dropped energy: the share of ||dW||_F^2 that the truncation loses (0.0 when dW = 0)."""
    if rank < 1:
        raise ValueError(f"fcit.svd_aggregate: rank must be >= 1, got {rank}")
    p = _normalized_weights(As, Bs, weights, "svd_aggregate")
    # float64 inside: the product is then exact to ~1e-12, whatever the adapters are stored in
    sqrt_p = p.sqrt()
    # A_s = [sqrt(p_1) A_1; ...; sqrt(p_n) A_n],  B_s = [sqrt(p_1) B_1, ..., sqrt(p_n) B_n],  so B_s A_s = dW
    A_s = torch.cat([w * A.to(torch.float64) for w, A in zip(sqrt_p, As)], dim=0)  # (S, I), S = sum r_i
    B_s = torch.cat([w * B.to(torch.float64) for w, B in zip(sqrt_p, Bs)], dim=1)  # (O, S)
    # B_s = Q_B R_B,  A_s^T = Q_A R_A   ->   dW = Q_B (R_B R_A^T) Q_A^T, and Q_B, Q_A have orthonormal columns,
    # so the SVD of the small core M gives the SVD of dW
    Q_B, R_B = torch.linalg.qr(B_s)  # (O, m), (m, S)
    Q_A, R_A = torch.linalg.qr(A_s.T)  # (I, q), (q, S)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)  # (m, j), (j,), (j, q)
    r = min(rank, S.shape[0])
    # B = Q_B U_r S_r^{1/2},  A = S_r^{1/2} V_r^T Q_A^T: the singular values are split evenly between the factors
    # so that neither one dominates the next round's gradients
    root = S[:r].sqrt()  # (r,)
    B = (Q_B @ U[:, :r]) * root  # (O, r)
    A = root[:, None] * (Vh[:r] @ Q_A.T)  # (r, I)
    # the stacked rank may be below `rank`: pad with zero directions so every round returns the same shapes
    B = F.pad(B, (0, rank - r))  # (O, rank)
    A = F.pad(A, (0, 0, 0, rank - r))  # (rank, I)
    energy = S.square()  # (j,)
    total = float(energy.sum())
    dropped = float(energy[r:].sum()) / total if total > 0 else 0.0
    return A.to(As[0].dtype), B.to(Bs[0].dtype), dropped


def aggregate_subspace(As: list[Tensor], Bs: list[Tensor], weights: Tensor, *, rank: int,
                       mode: str) -> tuple[Tensor, Tensor, float]:
    """Aggregate the updates routed to one subspace: (A (rank, I), B (O, rank), dropped energy)."""
    if mode == "svd":
        return svd_aggregate(As, Bs, weights, rank=rank)
    if mode == "ab":
        A, B = ab_aggregate(As, Bs, weights)
        return A, B, 0.0
    raise ValueError(f"fcit.aggregate_subspace: unknown mode {mode!r}; use one of {AGGREGATIONS}")


def fedavg(states: list[dict], weights) -> dict:
    """sum_i p_i theta_i with p = n_i / sum n (FedAvg weighted by sample count), tensor by tensor."""
    p = torch.as_tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    return {k: sum(pi * s[k].double() for pi, s in zip(p, states)).to(states[0][k].dtype) for k in states[0]}


def aggregate(global_state: dict, states: list[dict], weights, subspaces: list[int], *,
              factors: dict[str, tuple[str, str]], mode: str) -> tuple[dict, float]:
    """(the new global state, the mean update energy svd dropped). LoRA factors (factors: {layer: (key of A
    (K, R, I), key of B (K, O, R))}): per subspace, only the clients routed to it (DKO), with aggregate_subspace;
    subspaces no client trained this round keep their global value, and different subspaces never mix. Every
    other tensor (the projector): FedAvg over all clients."""
    keys = {k for ab in factors.values() for k in ab}
    other = [k for k in global_state if k not in keys]
    new = dict(global_state)
    if other:
        new.update(fedavg([{k: s[k] for k in other} for s in states], weights))
    dropped = []
    routed = {k: [i for i, s in enumerate(subspaces) if s == k] for k in sorted(set(subspaces))}
    for a_key, b_key in factors.values():
        A, B = new[a_key].clone(), new[b_key].clone()                                  # (K, R, I), (K, O, R)
        for k, idx in routed.items():
            A[k], B[k], e = aggregate_subspace([states[i][a_key][k] for i in idx], [states[i][b_key][k] for i in idx],
                                               torch.tensor([float(weights[i]) for i in idx]), rank=A.shape[1],
                                               mode=mode)
            dropped.append(e)
        new[a_key], new[b_key] = A, B
    return new, sum(dropped) / len(dropped) if dropped else 0.0


# ---- Subspace Selective Activation

def activation_weights(queries: Tensor, tokens: Tensor, *, temperature: float, mode: str = "softmax") -> Tensor:
    """The SSA gate of each question over the K open subspaces: (B, D), (K, D) -> (B, K) float32."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"fcit.activation_weights: unknown mode {mode!r}; use one of {ACTIVATIONS}")
    if temperature <= 0:
        raise ValueError(f"fcit.activation_weights: temperature must be > 0, got {temperature}")
    s = cosine_similarity(queries, tokens).float()  # (B, K)
    if s.shape[1] == 0:
        return s  # (B, 0): no subspace is open, the model is the base model
    if mode == "softmax":
        # a_k = exp(s_k / eps) / sum_j exp(s_j / eps)                          (paper, eps = 0.05)
        return torch.softmax(s / temperature, dim=-1)  # (B, K)
    if mode == "argmax":
        # a_k = 1 if k = argmax_j s_j else 0
        return F.one_hot(s.argmax(dim=-1), s.shape[1]).float()  # (B, K)
    if mode == "cosine":
        # a_k = max(s_k, 0) / sum_j max(s_j, 0); uniform when no subspace is similar at all
        pos = s.clamp_min(0)  # (B, K)
        total = pos.sum(dim=-1, keepdim=True)  # (B, 1)
        return torch.where(total > 0, pos / total.clamp_min(1e-12), torch.full_like(pos, 1 / s.shape[1]))
    # concat: a_k = 1, the subspaces simply added up
    return torch.ones_like(s)  # (B, K)


def pad_gate(gate: Tensor, num_subspaces: int) -> Tensor:
    """(B, K_open) -> (B, K): the subspaces not opened yet get weight 0, so the layers keep all K_max subspaces."""
    if gate.shape[-1] > num_subspaces:
        raise ValueError(f"fcit.pad_gate: the gate has {gate.shape[-1]} subspaces, the layers only {num_subspaces}")
    return F.pad(gate, (0, num_subspaces - gate.shape[-1]))  # (B, K)


# ---- DISCO as a strategy of the federated loop

class DiscoStrategy:
    """DISCO's answers to the strategy protocol of federated.py's loop, mixed into its plain strategy there
    (`class Disco(fcit.DiscoStrategy, Finetune)`): the LoRA layout (K_max subspaces), DKO routing each client to a
    subspace by its identity token before it trains (route_clients), SSA gating the subspaces per test question
    (activation_weights), and what DISCO reports and checkpoints. Aggregation inside each subspace is Finetune's
    (aggregate above).
    From its host it reads self.harness.encode_text / encode_images (the frozen encoders of identity tokens),
    self.hp (DiscoConfig), self.log, self.detail and self.num_subspaces()."""
    name = "disco"

    @staticmethod
    def lora_layout(*, rank, subspace_rank, num_stages):
        # K_max = rank / subspace_rank subspaces (paper: 8 of rank 8 task-related, 4 of rank 8 capability-related);
        # DKO opens them as tasks arrive and shares the nearest one when all are open
        if rank % subspace_rank:
            raise ValueError(f"rank {rank} is not a multiple of subspace_rank {subspace_rank}")
        return rank // subspace_rank, subspace_rank

    def __init__(self, model, harness, cfg, *, hp: DiscoConfig | None = None, log=print, detail=None):
        super().__init__(model, harness, cfg, hp=hp or DiscoConfig(), log=log, detail=detail)   # the host's
        self.cache = None                                             # TokenCache, created at the first round

    def features(self, examples):
        """Frozen features of examples: the instruction through the text encoder (the paper's identity), the image
        through the frozen vision tower for the ablation (--identity image | both; each part L2-normalized before
        they are concatenated)."""
        parts = []
        if self.hp.identity in ("text", "both"):
            parts.append(self.harness.encode_text([e.question for e in examples]))
        if self.hp.identity in ("image", "both"):
            parts.append(self.harness.encode_images(examples))
        return torch.cat([F.normalize(p, dim=-1) for p in parts], -1)                            # (N, D)

    def assign(self, stage, round, jobs):
        tokens = torch.stack([identity_token(self.features(ex)) for _, _, ex in jobs])          # (C, D)
        counts = [len(ex) for _, _, ex in jobs]
        if self.cache is None:
            self.cache = TokenCache.empty(tokens.shape[1])
        subspaces, self.cache, lines = route_clients(tokens, counts, self.cache, threshold=self.hp.threshold,
                                                     max_subspaces=self.num_subspaces(),
                                                     client_ids=[c for c, _, _ in jobs],
                                                     open_new=may_open(self.hp.open, round))
        for line, (_, task, _) in zip(lines, jobs):
            # a client that had to join although no subspace matched is a forgetting risk: always said
            (self.log if "cap of" in line else self.detail)(f"  DKO {line} [{task}]")
        return subspaces

    def eval_gate(self, examples):
        if self.cache is None or len(self.cache) == 0:
            return torch.zeros(len(examples), self.num_subspaces())
        a = activation_weights(self.features(examples), self.cache.tokens, temperature=self.hp.temperature,
                               mode=self.hp.activation)                                         # (B, K_open)
        return pad_gate(a, self.num_subspaces())                                                # (B, K)

    def open_subspaces(self):
        return 0 if self.cache is None else len(self.cache)

    def report(self, history):
        final = history["gates"][-1] if history["gates"] else {}     # task -> mean gate over subspaces
        if not final:
            return {}
        routes = history["routes"]                                    # task -> the subspaces its clients trained
        # own_gate: the gate mass a task's test questions put on the subspace(s) its own clients trained
        own = {t: round(sum(final[t][k] for k in routes.get(t, [])), 4) for t in final}
        return {"gates": final, "routes": routes, "own_gate": own}

    def state(self):
        return {} if self.cache is None else {"disco.tokens": self.cache.tokens, "disco.counts": self.cache.counts}

    def load(self, state):
        if "disco.tokens" in state:
            self.cache = TokenCache(state["disco.tokens"].float(), state["disco.counts"].long())
