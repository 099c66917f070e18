"""The federated continual loop of FCIT: stages -> rounds -> clients, sequential and in one process.

Each stage brings new data (continual learning, old data is gone); each round the server samples a few clients
(10% of 50), each trains one local epoch from the global state with a fresh AdamW and a cosine schedule, and the
server aggregates (federated learning). After every stage the global model is evaluated on every task seen so
far. Client states are dicts of tensors in memory; nothing is written per client (fcit-paper-notes.md, 1.3).

What a continual-learning method decides is a `Strategy`: which LoRA subspace a client trains, an extra local
loss, how updates are aggregated, and the gate a test question puts on the subspaces. `Strategy` itself is
Finetune (one LoRA, FedAvg); `Disco` adds DKO routing and SSA gating (fcit.py).

    python train.py --setting task-hom --method finetune
Tests: python -m pytest tests/test_federated.py
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import fcit
import metrics
import server
from data import METRIC, read_image
from lora import gated, lora_modules
from model import collate, cosine_lr, generate, image_features, instruction_features, to_device

# B batch, K subspaces, R rank, D feature width


@dataclass
class FedConfig:
    num_clients: int = 50
    clients_per_round: int = 5      # 10% per round (paper)
    rounds: int = 10                # per stage (paper)
    local_epochs: int = 1           # paper
    batch_size: int = 8             # local batch: examples per optimizer step
    micro_batch: int = 0            # examples per forward pass; gradients accumulate up to batch_size (0 = all)
    lr: float = 2e-3                # peak lr of LoRA (paper: 2e-4 for 7B; a tiny model needs more)
    projector_lr: float = 2e-4      # peak lr of the projector: lr / 10, as the official scripts (2e-5 vs 2e-4)
    warmup: float = 0.03            # fraction of local steps (paper)
    min_size: int = 4               # fewest examples a client gets in the Dirichlet partition
    train_projector: bool = True    # the projector is trained and plainly averaged (paper)
    eval_batch: int = 200
    max_new_tokens: int = 24
    system: str = ""                # the model's vicuna_v1 system line (set from the model config)


# ---------------------------------------------------------------------------- clients
def sample_clients(num_clients, k, rng):
    """k distinct client ids, uniformly (the paper samples 10% of 50 each round)."""
    if k > num_clients:
        raise ValueError(f"--clients-per-round {k} exceeds --clients {num_clients}")
    return rng.choice(num_clients, k, replace=False)


def trainable_state(model):
    """The parameters that train and travel (LoRA factors, projector): a dict of detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_state(model, state):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def batches_of(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def batches(examples, batch_size, rng):
    """One local epoch: the client's examples in a random order, cut into batches."""
    return batches_of([examples[j] for j in rng.permutation(len(examples))], batch_size)


def make_batch(processor, examples, system, device=None, dtype=None):
    """A training batch (model.collate) of examples, on `device` when one is given."""
    b = collate(processor, [read_image(e.image) for e in examples], [e.question for e in examples],
                [e.answer for e in examples], system=system)
    return b if device is None else to_device(b, device, dtype)


def answer_tokens(batch):
    """How many tokens the loss averages over: the labels that are not -100, after the one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


def param_groups(model, cfg: FedConfig):
    """AdamW groups: the projector at projector_lr, everything else that trains (LoRA, a router) at lr. The
    projector is shared by every task (no subspaces), so a slow one keeps old tasks' inputs where they were."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    projector = [p for n, p in trainable if "multi_modal_projector" in n]
    rest = [p for n, p in trainable if "multi_modal_projector" not in n]
    return [g for g in ({"params": rest, "peak_lr": cfg.lr}, {"params": projector, "peak_lr": cfg.projector_lr})
            if g["params"]]


def local_train(model, processor, examples, *, gate, cfg: FedConfig, rng, extra_loss=None):
    """One client's local epochs from the model's current (global) weights; returns (state, mean loss).
    A fresh AdamW each time (paper); weight decay 0 so a subspace the gate switches off stays exactly as it was."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=0.0)
    steps = cfg.local_epochs * math.ceil(len(examples) / cfg.batch_size)
    warm, step, losses = max(1, int(cfg.warmup * steps)), 0, []
    model.train()
    with gated(model, gate):
        for _ in range(cfg.local_epochs):
            for chunk in batches(examples, cfg.batch_size, rng):
                for g in opt.param_groups:
                    g["lr"] = g["peak_lr"] * cosine_lr(step, steps, warm)
                total = 0.0
                # gradient accumulation: the paper's global batch (128) through micro-batches that fit the GPU. Each
                # part's loss is a mean over its answer tokens, so weighting it by its share of the batch's answer
                # tokens gives exactly the batch's mean (weight 1.0 when there is one part)
                parts = [make_batch(processor, p, cfg.system) for p in
                         (batches_of(chunk, cfg.micro_batch) if cfg.micro_batch else [chunk])]
                tokens = [answer_tokens(b) for b in parts]
                for batch, n in zip(parts, tokens):
                    batch = to_device(batch, model.device, model.dtype)
                    outputs = model(**batch)                     # one forward: the task loss, and the logits an
                    loss = outputs.loss                          # extra term may need (LwF's student)
                    if extra_loss is not None:
                        loss = loss + extra_loss(model, batch, outputs)
                    w = n / sum(tokens)
                    (w * loss).backward()
                    total += w * loss.item()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(total)
                step += 1
    model.eval()
    return trainable_state(model), float(np.mean(losses))


# ---------------------------------------------------------------------------- server aggregation
def fedavg(states, weights):
    """sum_i p_i theta_i with p = n_i / sum n (FedAvg weighted by sample count)."""
    p = torch.as_tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    return {k: sum(pi * s[k].double() for pi, s in zip(p, states)).to(states[0][k].dtype) for k in states[0]}


def aggregate(global_state, states, weights, subspaces, *, mode, log=None):
    """The new global state. Non-LoRA parameters (projector): FedAvg over all clients. LoRA factors: per subspace,
    only the clients routed to it, with fcit.aggregate_subspace ('svd' exact update or 'ab' factor average);
    subspaces no client trained this round keep their global value (different subspaces never mix)."""
    lora_keys = [k for k in global_state if k.endswith(".A") or k.endswith(".B")]
    other = [k for k in global_state if k not in lora_keys]
    new = dict(global_state)
    if other:
        new.update(fedavg([{k: s[k] for k in other} for s in states], weights))
    dropped = []
    routed = {k_sub: [i for i, s in enumerate(subspaces) if s == k_sub] for k_sub in sorted(set(subspaces))}
    for name in sorted({k[:-2] for k in lora_keys}):
        A, B = new[name + ".A"].clone(), new[name + ".B"].clone()             # (K, R, I), (K, O, R)
        for k_sub, idx in routed.items():
            a, b, e = fcit.aggregate_subspace([states[i][name + ".A"][k_sub] for i in idx],
                                              [states[i][name + ".B"][k_sub] for i in idx],
                                              torch.tensor([float(weights[i]) for i in idx]),
                                              rank=A.shape[1], mode=mode)
            A[k_sub], B[k_sub] = a, b
            dropped.append(e)
        new[name + ".A"], new[name + ".B"] = A, B
    if log and mode == "svd" and dropped:
        log(f"  svd aggregation dropped {100 * float(np.mean(dropped)):.2f}% of the update energy (mean over layers)")
    return new


# ---------------------------------------------------------------------------- strategies
class Strategy:
    """Finetune: one LoRA (K = 1) trained by everyone and aggregated with FedAvg; no gate at inference."""
    name = "finetune"

    def __init__(self, model, processor, cfg: FedConfig, *, aggregate_mode="svd", server_cfg=None, log=print):
        self.model, self.processor, self.cfg, self.mode, self.log = model, processor, cfg, aggregate_mode, log
        self.server_cfg = server_cfg or server.ServerConfig()
        self.server_state = {}                                        # the server optimizer's moments (server.py)

    def num_slots(self):
        return next(iter(lora_modules(self.model).values())).num_subspaces

    def assign(self, stage, jobs):
        """The subspace each client of the round trains (jobs: list of (client, task, examples))."""
        return [0] * len(jobs)

    def train_gate(self, subspace):
        return torch.nn.functional.one_hot(torch.tensor(subspace), self.num_slots()).float()     # (K,)

    def extra_loss(self, stage):
        """A term added to every local loss, (model, batch, outputs of the task loss's forward) -> scalar: here
        FedProx's proximal term. The loop asks right after loading the global state into the model, so the model's
        trainable state is w_global."""
        if self.server_cfg.name == "fedprox":
            return server.proximal_loss(trainable_state(self.model), mu=self.server_cfg.mu)
        return None

    def aggregate(self, global_state, states, weights, subspaces):
        new = aggregate(global_state, states, weights, subspaces, mode=self.mode, log=self.log)
        return self.server_step(global_state, new, set(subspaces))

    def server_step(self, global_state, new, slots):
        """The server optimizer (server.py) on the pseudo-gradient new - global, only in the subspaces `slots` that
        clients trained this round: the others keep their weights and moments exactly."""
        new, self.server_state = server.step(global_state, new, self.server_state,
                                             server.slot_mask(global_state, slots), self.server_cfg)
        return new

    def end_stage(self, stage, data):
        pass

    def eval_gate(self, examples):
        return None                                                   # all subspaces on

    def open_subspaces(self):
        """How many subspaces the method has opened so far (DKO's statistic); None where it opens none."""
        return None

    def state(self):
        return {f"server.{k}": v for k, v in self.server_state.items()}

    def load(self, state):
        self.server_state = {k[len("server."):]: v for k, v in state.items() if k.startswith("server.")}


class Disco(Strategy):
    """DISCO: DKO routes each client to a subspace by its identity token before it trains (fcit.route_clients);
    aggregation stays inside a subspace; SSA gates the subspaces per test question (fcit.activation_weights)."""
    name = "disco"

    def __init__(self, model, processor, cfg, *, disco: fcit.DiscoConfig, encode_text=None, server_cfg=None,
                 log=print):
        super().__init__(model, processor, cfg, aggregate_mode=disco.aggregate, server_cfg=server_cfg, log=log)
        self.disco = disco
        # the frozen text encoder of identity tokens: questions -> (N, D). The embedded default is the base's own
        # word embeddings (model.instruction_features); the real benchmark passes CLIP's (model.clip_text_features)
        self.encode_text = encode_text or (lambda questions: instruction_features(model, processor, questions))
        self.cache = None

    def features(self, examples):
        """Frozen features of examples: the instruction through the text encoder (the paper's identity), the image
        through the frozen vision tower for the ablation (--identity image | both; each part L2-normalized before
        they are concatenated)."""
        parts = []
        if self.disco.identity in ("text", "both"):
            parts.append(self.encode_text([e.question for e in examples]))
        if self.disco.identity in ("image", "both"):
            parts.append(image_features(self.model, self.processor, [read_image(e.image) for e in examples]))
        return torch.cat([torch.nn.functional.normalize(p, dim=-1) for p in parts], -1)          # (N, D)

    def assign(self, stage, jobs):
        tokens = torch.stack([fcit.identity_token(self.features(ex)) for _, _, ex in jobs])   # (C, D)
        counts = [len(ex) for _, _, ex in jobs]
        if self.cache is None:
            self.cache = fcit.TokenCache.empty(tokens.shape[1])
        subspaces, self.cache, lines = fcit.route_clients(tokens, counts, self.cache, threshold=self.disco.threshold,
                                                          max_subspaces=self.disco.max_subspaces,
                                                          client_ids=[c for c, _, _ in jobs])
        for line, (_, task, _) in zip(lines, jobs):
            self.log(f"  DKO {line} [{task}]")
        return subspaces

    def eval_gate(self, examples):
        if self.cache is None or len(self.cache) == 0:
            return torch.zeros(len(examples), self.num_slots())
        a = fcit.activation_weights(self.features(examples), self.cache.tokens, temperature=self.disco.temperature,
                                    mode=self.disco.activation)                                 # (B, K_open)
        return fcit.pad_gate(a, self.num_slots())                                               # (B, K)

    def open_subspaces(self):
        return 0 if self.cache is None else len(self.cache)

    def state(self):
        cache = {} if self.cache is None else {"disco.tokens": self.cache.tokens, "disco.counts": self.cache.counts}
        return {**super().state(), **cache}

    def load(self, state):
        super().load(state)
        if "disco.tokens" in state:
            self.cache = fcit.TokenCache(state["disco.tokens"].float(), state["disco.counts"].long())


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_dataset(model, processor, dataset, examples, strategy, cfg: FedConfig):
    """Score in percent with the dataset's metric, and the mean gate its questions put on each subspace."""
    preds, gates = [], []
    for i in range(0, len(examples), cfg.eval_batch):
        chunk = examples[i:i + cfg.eval_batch]
        gate = strategy.eval_gate(chunk)                                                        # (B, K) or None
        with gated(model, gate):
            preds += generate(model, processor, [read_image(e.image) for e in chunk], [e.question for e in chunk],
                              system=cfg.system, max_new_tokens=cfg.max_new_tokens)
        if gate is not None:
            gates.append(gate)
    answers = [e.references or e.answer for e in examples]
    score = metrics.task_score(METRIC.get(dataset, "exact"), preds, answers)
    mean_gate = torch.cat(gates).mean(0).tolist() if gates else None
    return score, mean_gate, preds


def evaluate_tasks(model, processor, data, tasks, strategy, cfg):
    """{task: score} (a task's score is the mean over its datasets), {dataset: score}, {task: mean gate}."""
    task_scores, dataset_scores, task_gates = {}, {}, {}
    for task in tasks:
        scores, gates = [], []
        for dataset, examples in data[task].test.items():
            s, g, _ = evaluate_dataset(model, processor, dataset, examples, strategy, cfg)
            dataset_scores[dataset] = round(s, 2)
            scores.append(s)
            if g is not None:
                gates.append(g)
        task_scores[task] = round(float(np.mean(scores)), 2)
        if gates:
            task_gates[task] = np.mean(gates, axis=0).round(4).tolist()
    return task_scores, dataset_scores, task_gates


# ---------------------------------------------------------------------------- the loop
@dataclass
class Progress:
    """Where a run is: the next (stage, round), the global state, and what has been measured. Checkpointed after
    every round, so a crash mid-stage resumes at the round it reached (train.py --resume)."""
    stage: int = 0
    round: int = 0
    global_state: dict = None
    history: dict = None


def round_jobs(setting, data, parts, stage, clients):
    """(client, task, examples) per client slot: Hom = the stage's task, Het = the slot's task of the fixed table."""
    row = setting.slots[stage]
    jobs = []
    for slot, c in enumerate(clients):
        task = setting.tasks[row[slot % len(row)]]
        jobs.append((int(c), task, [data[task].train[i] for i in parts[task][c]]))
    return jobs


def run_continual(model, processor, setting, data, parts, strategy, cfg: FedConfig, *, seed, log=print,
                  progress: Progress | None = None, on_round=None):
    """Train stage after stage, round after round; evaluate on every seen task after each stage.
    Sampling and local shuffles are seeded by (seed, stage, round, slot): a resumed run redoes exactly the same."""
    p = progress or Progress(0, 0, trainable_state(model), {"acc": [], "acc_datasets": [], "gates": [],
                                                             "subspaces": [], "routes": {}, "loss": []})
    load_state(model, p.global_state)
    total = setting.num_stages * cfg.rounds
    t0, done0 = time.time(), p.stage * cfg.rounds + p.round
    for t in range(p.stage, setting.num_stages):
        for r in range(p.round if t == p.stage else 0, cfg.rounds):
            rng = np.random.default_rng([seed, t, r])
            jobs = round_jobs(setting, data, parts, t, sample_clients(cfg.num_clients, cfg.clients_per_round, rng))
            subspaces = strategy.assign(t, jobs)
            for (_, task, _), k in zip(jobs, subspaces):                  # which subspaces each task trained
                p.history["routes"].setdefault(task, [])
                if k not in p.history["routes"][task]:
                    p.history["routes"][task].append(k)
            states, weights, losses = [], [], []
            for slot, ((client, task, examples), k) in enumerate(zip(jobs, subspaces)):
                load_state(model, p.global_state)
                torch.manual_seed(int(np.random.default_rng([seed, t, r, slot]).integers(2**31)))  # LoRA dropout
                state, loss = local_train(model, processor, examples, gate=strategy.train_gate(k), cfg=cfg,
                                          rng=np.random.default_rng([seed, t, r, slot]),
                                          extra_loss=strategy.extra_loss(t))
                states.append(state), weights.append(len(examples)), losses.append(loss)
                log(f"stage {t + 1}/{setting.num_stages} round {r + 1}/{cfg.rounds} client {client:2d} "
                    f"[{task}, {len(examples)} ex, subspace {k}] loss {loss:.3f}")
            p.global_state = strategy.aggregate(p.global_state, states, weights, subspaces)
            load_state(model, p.global_state)
            p.history["loss"].append(round(float(np.average(losses, weights=weights)), 4))
            done = t * cfg.rounds + r + 1
            rate = (time.time() - t0) / max(1, done - done0)
            log(f"  round done | elapsed {time.time() - t0:.0f}s | ETA {rate * (total - done):.0f}s (training only)")
            p.stage, p.round = (t, r + 1)
            if on_round:
                on_round(p, strategy)
        strategy.end_stage(t, data)
        seen = setting.seen_tasks(t)
        acc, acc_d, gates = evaluate_tasks(model, processor, data, seen, strategy, cfg)
        p.history["acc"].append(acc), p.history["acc_datasets"].append(acc_d), p.history["gates"].append(gates)
        opened = strategy.open_subspaces()                               # DKO's count; None for other methods
        if opened is not None:
            p.history["subspaces"].append(opened)
        log(f"after stage {t + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in acc.items())
            + f" | mean {np.mean(list(acc.values())):.1f}")
        p.stage, p.round = t + 1, 0
        if on_round:
            on_round(p, strategy)
    return p.history
