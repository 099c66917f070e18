"""The federated continual loop of FCIT: stages -> rounds -> clients, and the two methods it is read with.

Each stage brings new data (continual learning: old data is gone); each round the server samples a few clients
(10% of 50), each trains one local epoch from the global state with a fresh AdamW and a cosine schedule, and the
server aggregates (federated learning). After every stage the global model is evaluated on every task seen so
far. Client states are dicts of tensors in memory; nothing is written per client (fcit-paper-notes.md, 1.3).

What a continual-learning method decides is a strategy: its LoRA layout, which subspace a client trains, an extra
local loss, how updates are aggregated, the gate a test question puts on the subspaces, and what it reports.
`Finetune` (one LoRA, FedAvg) is the plain strategy every other one extends; `Disco` is Finetune with DISCO's
answers (fcit.DiscoStrategy): it routes clients with Dynamic Knowledge Organization and gates test questions with
Subspace Selective Activation; the baselines and the server optimizers are in baselines/. What depends on the model
(building a batch, generating, scoring, the frozen encoders of identity tokens) and the evaluation protocol
(metrics.py) arrive as a `Harness` from train.py: this file imports only fcit and lora.

    python train.py --setting task-hom --method finetune
Tests: python -m pytest tests/test_federated.py
"""
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import fcit
from lora import LoRALinear, factor_keys, gated, lora_modules

# B batch, C clients of a round, K subspaces, R rank, D feature width


@dataclass
class FedConfig:
    num_clients: int = 50
    clients_per_round: int = 5      # 10% per round (paper)
    rounds: int = 10                # per stage (paper)
    local_epochs: int = 1           # paper
    batch_size: int = 8             # local batch: examples per optimizer step
    micro_batch: int = 0            # examples per forward pass; gradients accumulate up to batch_size (0 = all)
    lr: float = 2e-3                # peak lr of LoRA (paper: 2e-4 for 7B; a tiny model needs more)
    projector_lr: float = 2e-4      # peak lr of the projector: lr / 10 here; --preset paper: = lr (official code)
    warmup: float = 0.03            # fraction of local steps (paper)
    min_size: int = 4               # fewest examples a client gets in the Dirichlet partition
    train_projector: bool = True    # the projector is trained and plainly averaged (paper)
    aggregate: str = "svd"          # LoRA inside a subspace: svd (exact update, re-factored) | ab (official code)
    eval_batch: int = 200
    max_new_tokens: int = 24

    def __post_init__(self):
        if self.aggregate not in fcit.AGGREGATIONS:
            raise ValueError(f"--aggregate {self.aggregate!r} is unknown; choose one of {', '.join(fcit.AGGREGATIONS)}")


@dataclass
class Harness:
    """What the loop needs from the model and the data, built by train.py (so this file imports neither)."""
    make_batch: Callable            # examples -> a training batch on the model's device, labels on the answer only
    evaluate: Callable              # (tasks, strategy) -> ({task: score}, {dataset: score}, {task: mean gate}):
                                    #   every test question answered under strategy.eval_gate (metrics.py)
    encode_text: Callable           # questions -> (N, D): the frozen text encoder of identity tokens
    encode_images: Callable | None = None  # examples -> (N, D): the frozen image encoder (identity ablation)


# ---------------------------------------------------------------------------- client state
def client_state(model):
    """What a client sends and the server holds: every parameter that trains (LoRA factors, the projector, a
    router), detached copies keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_client_state(model, state):
    """Copy a client_state dict into the model in place (optimizers keep their references)."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"federated.load_client_state: the state has no '{missing[0]}' ({len(missing)} trainable "
                         f"parameters missing); was it made by a model with the same LoRA layout?")
    for n, v in state.items():
        if n not in params or params[n].shape != v.shape:
            got = "no such parameter" if n not in params else f"the model's is {tuple(params[n].shape)}"
            raise ValueError(f"federated.load_client_state: '{n}' of shape {tuple(v.shape)} does not fit ({got}); "
                             f"was the state made by a model with the same LoRA layout?")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def strip_prefix(state, prefix):
    """The entries of `state` under `prefix`, with the prefix removed (how checkpoints nest their parts)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- clients
def sample_clients(num_clients, k, rng):
    """k distinct client ids, uniformly (the paper samples 10% of 50 each round)."""
    if k > num_clients:
        raise ValueError(f"--clients-per-round {k} exceeds --clients {num_clients}")
    return rng.choice(num_clients, k, replace=False)


def batches_of(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def batches(examples, batch_size, rng):
    """One local epoch: the client's examples in a random order, cut into batches."""
    return batches_of([examples[j] for j in rng.permutation(len(examples))], batch_size)


def answer_tokens(batch):
    """How many tokens the loss averages over: the labels that are not -100, after the one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


def cosine_lr(step, total, warmup):
    """Linear warmup then cosine decay to 0, as a multiplier of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# the projector (vision features -> the language model's inputs) by its name in each family: LLaVA's
# multi_modal_projector, Qwen2.5-VL's visual merger
PROJECTORS = ("multi_modal_projector", "visual.merger")


def is_projector(name):
    return any(p in name for p in PROJECTORS)


def param_groups(model, cfg: FedConfig):
    """AdamW groups: the projector at projector_lr, everything else that trains (LoRA, a router) at lr. The
    projector is shared by every task (no subspaces), so a slow one keeps old tasks' inputs where they were."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    projector = [p for n, p in trainable if is_projector(n)]
    rest = [p for n, p in trainable if not is_projector(n)]
    return [g for g in ({"params": rest, "peak_lr": cfg.lr}, {"params": projector, "peak_lr": cfg.projector_lr})
            if g["params"]]


def local_train(model, harness: Harness, examples, *, gate, cfg: FedConfig, rng, extra_loss=None, world=None):
    """One client's local epochs from the model's current (global) weights; returns (client_state, mean loss).
    world: who computes each batch (parallel/world.py's Balanced splits it over processes); None: this one alone.
    A fresh AdamW each time (paper); weight decay 0 so a subspace the gate switches off stays exactly as it was.
    fused: one kernel for every parameter instead of ~10 ops each (8% of a step of the tiny model on CPU)."""
    params, world = [p for p in model.parameters() if p.requires_grad], world or Solo()
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=0.0, fused=True)
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
                # tokens gives exactly the batch's mean (weight 1.0 when there is one part). The batch's examples
                # are this process's (world.share: all of them at world size 1)
                mine = world.share(chunk)
                parts = [harness.make_batch(p) for p in (batches_of(mine, cfg.micro_batch) if cfg.micro_batch
                                                          else [mine]) if p]
                tokens = [answer_tokens(b) for b in parts]
                batch_tokens = world.total(sum(tokens))          # the whole batch's answer tokens
                for batch, n in zip(parts, tokens):
                    outputs = model(**batch)                     # one forward: the task loss, and the logits an
                    loss = outputs.loss                          # extra term may need (LwF's student)
                    if extra_loss is not None:
                        loss = loss + extra_loss(model, batch, outputs)
                    w = n / batch_tokens
                    (w * loss).backward()
                    total += w * loss.item()
                total = world.reduce(params, total)              # gradients summed over the batch's processes
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(total)
                step += 1
    model.eval()
    return client_state(model), float(np.mean(losses))


def add_losses(*fns):
    """One extra local loss from several (None = absent), e.g. a method's term plus FedProx's proximal term."""
    fns = [f for f in fns if f is not None]
    if len(fns) <= 1:
        return fns[0] if fns else None
    return lambda model, batch, outputs=None: sum(f(model, batch, outputs) for f in fns)


# ---------------------------------------------------------------------------- strategies
class Finetune:
    """Finetune: one LoRA (K = 1) trained by every client and aggregated with FedAvg; no gate at inference.
    Every other method is this class with some of its answers changed."""
    name = "finetune"
    layer = LoRALinear                                                # the LoRA layer class add_lora wraps with
    factor_state = None     # what it keeps in LoRA-factor coordinates across rounds: needs ab (config/run.py)

    @staticmethod
    def lora_layout(*, rank, subspace_rank, num_stages):
        """(K subspaces, rank of each) at the total LoRA rank `rank`: every method gets the same budget."""
        return 1, rank

    def __init__(self, model, harness: Harness, cfg: FedConfig, *, hp=None, log=print, detail=None):
        self.model, self.harness, self.cfg, self.hp = model, harness, cfg, hp
        self.log, self.detail = log, detail or (lambda line: None)   # detail: the --verbose lines

    def num_subspaces(self):
        """K, as the LoRA layers hold it."""
        return next(iter(lora_modules(self.model).values())).num_subspaces

    def assign(self, stage, round, jobs):
        """The subspace each client of the round trains (stage, round 0-based; jobs: (client, task, examples))."""
        return [0] * len(jobs)

    def train_gate(self, subspace):
        return torch.nn.functional.one_hot(torch.tensor(subspace), self.num_subspaces()).float()     # (K,)

    def extra_loss(self, stage):
        """A term added to every local loss, (model, batch, outputs of the task loss's forward) -> scalar, or None.
        The loop asks right after loading the global state into the model."""
        return None

    def aggregate(self, global_state, states, weights, subspaces):
        """The new global state: fcit.aggregate (LoRA per subspace, the rest by FedAvg) in the run's mode."""
        new, dropped = fcit.aggregate(global_state, states, weights, subspaces, factors=factor_keys(global_state),
                                      mode=self.cfg.aggregate)
        if self.cfg.aggregate == "svd":
            self.detail(f"  svd aggregation dropped {100 * dropped:.2f}% of the update energy (mean over layers)")
        return new

    def trained_subspaces(self, subspaces):
        """The subspaces the round's clients changed (where a server optimizer may step)."""
        return set(subspaces)

    def end_stage(self, stage, data):
        pass

    def eval_gate(self, examples):
        return None                                                   # all subspaces on

    def open_subspaces(self):
        """How many subspaces the method has opened so far (DKO's statistic); None where it opens none."""
        return None

    def report(self, history):
        """What the method adds to results.json beyond the accuracy matrix."""
        return {}

    def state(self):
        """What a checkpoint must keep of the method besides the global model: tensors by name."""
        return {}

    def load(self, state):
        pass


class Disco(fcit.DiscoStrategy, Finetune):
    """DISCO: fcit.DiscoStrategy's answers (layout, DKO routing, SSA gate, report) over Finetune's (one aggregation
    per subspace, the loop's protocol)."""


# ---------------------------------------------------------------------------- the loop
class Diverged(RuntimeError):
    """Every client of a round diverged: the run stops, the last checkpoint stays as it was."""


def finite(loss, state):
    """A client's result may be aggregated: its mean loss and every tensor it sends are finite."""
    return math.isfinite(loss) and all(bool(torch.isfinite(v).all()) for v in state.values())


@dataclass
class Progress:
    """Where a run is: the next (stage, round), the global state, and what has been measured. Checkpointed after
    every round, so a crash mid-stage resumes at the round it reached (run train.py's command again)."""
    stage: int = 0
    round: int = 0
    global_state: dict = None
    history: dict = None


class Solo:
    """World size 1: this process trains every client of a round and exchanges nothing. parallel/world.py's World
    spreads the clients over torchrun's processes behind the same calls, with the same numbers; its Balanced
    splits every batch over them instead."""
    rank, size = 0, 1
    stream = ()                                                       # what a client's dropout seed adds

    def mine(self, sizes):
        return list(range(len(sizes)))

    def share(self, chunk):                                           # the examples of a batch this process computes
        return chunk

    def total(self, tokens):                                          # their answer tokens, over every process
        return tokens

    def reduce(self, params, loss):                                   # gradients and loss, summed over them
        return loss

    def gather(self, results, sizes, like):
        return [results[i] for i in range(len(sizes))]

    def shard_answers(self, answer, gate_of, batches):
        return answer                                                 # each batch answered when it is scored

    def barrier(self):
        pass


def round_jobs(setting, data, parts, stage, clients):
    """(client, task, examples) for the i-th client of the round: Hom = the stage's task, Het = the fixed table's."""
    row = setting.client_tasks[stage]
    jobs = []
    for i, c in enumerate(clients):
        task = setting.tasks[row[i % len(row)]]
        jobs.append((int(c), task, [data[task].train[j] for j in parts[task][c]]))
    return jobs


def minutes(seconds):
    return f"{seconds / 60:.1f}m" if seconds >= 90 else f"{seconds:.0f}s"


def eta(spent, rounds_left, questions_left):
    """The time left at the rates measured so far: rounds, and evaluated questions once one evaluation is timed."""
    train = spent["train"] / spent["rounds"] * rounds_left
    if not spent["questions"]:
        return f"ETA {minutes(train)} + evaluation"
    return f"ETA {minutes(train + spent['eval'] / spent['questions'] * questions_left)}"


def run_continual(model, harness, setting, data, parts, strategy, cfg: FedConfig, *, seed, log=print,
                  progress: Progress | None = None, on_round=None, world=Solo()):
    """Train stage after stage, round after round; evaluate on every seen task after each stage.
    Sampling and local shuffles are seeded by (seed, stage, round, i): a resumed run redoes exactly the same, and
    a client trained by another process (world: parallel/world.py) computes exactly the same."""
    p = progress or Progress(0, 0, client_state(model), {"acc": [], "acc_datasets": [], "gates": [],
                                                          "subspaces": [], "routes": {}, "loss": []})
    load_client_state(model, p.global_state)
    T, R = setting.num_stages, cfg.rounds
    questions = {task: sum(len(e) for e in data[task].test.values()) for task in setting.tasks}
    t0, spent = time.time(), {"train": 0.0, "rounds": 0, "eval": 0.0, "questions": 0}
    for t in range(p.stage, T):
        for r in range(p.round if t == p.stage else 0, R):
            t_round = time.time()
            rng = np.random.default_rng([seed, t, r])
            jobs = round_jobs(setting, data, parts, t, sample_clients(cfg.num_clients, cfg.clients_per_round, rng))
            opened_before = strategy.open_subspaces()
            subspaces = strategy.assign(t, r, jobs)
            sizes, results = [len(examples) for _, _, examples in jobs], {}
            for i in world.mine(sizes):                                  # every client, at world size 1
                load_client_state(model, p.global_state)
                torch.manual_seed(int(np.random.default_rng([seed, t, r, i, *world.stream]).integers(2**31)))  # dropout
                results[i] = local_train(model, harness, jobs[i][2], gate=strategy.train_gate(subspaces[i]), cfg=cfg,
                                         rng=np.random.default_rng([seed, t, r, i]), extra_loss=strategy.extra_loss(t),
                                         world=world)
            states, weights, losses, trained = [], [], [], []
            for (client, task, examples), k, (state, loss) in zip(jobs, subspaces,
                                                                  world.gather(results, sizes, p.global_state)):
                if not finite(loss, state):                          # a diverged client must not reach the server
                    log(f"  client {client} [{task}] diverged (loss {loss:.3g} or its update is not finite): "
                        f"dropped from round {r + 1}")
                    continue
                states.append(state), weights.append(len(examples)), losses.append(loss), trained.append(k)
                routes = p.history["routes"].setdefault(task, [])   # which subspaces each task trained
                if k not in routes:
                    routes.append(k)
                strategy.detail(f"  client {client:2d} [{task}, {len(examples)} ex, subspace {k}] loss {loss:.3f}")
            if not states:
                raise Diverged(f"stage {t + 1} round {r + 1}: every client's training diverged (a loss or an update "
                               f"is not finite); nothing was aggregated and the last checkpoint is intact; try a "
                               f"lower --lr")
            p.global_state = strategy.aggregate(p.global_state, states, weights, trained)
            load_client_state(model, p.global_state)
            p.history["loss"].append(round(float(np.average(losses, weights=weights)), 4))
            spent["train"] += time.time() - t_round
            spent["rounds"] += 1
            p.stage, p.round = (t, r + 1)
            if on_round:
                on_round(p, strategy)
            opened = strategy.open_subspaces()                           # DKO's count; None for other methods
            dko = "" if opened is None else (f" | subspaces {sorted(set(trained))} trained, "
                                             f"{opened - opened_before} opened ({opened} open)")
            evals_left = sum(questions[task] for s in range(t, T) for task in setting.seen_tasks(s))
            log(f"stage {t + 1}/{T} round {r + 1}/{R} | loss {p.history['loss'][-1]:.3f}{dko} | "
                f"{minutes(time.time() - t0)} elapsed, {eta(spent, (T - t) * R - (r + 1), evals_left)}")
        strategy.end_stage(t, data)
        seen = setting.seen_tasks(t)
        t_eval = time.time()
        acc, acc_d, gates = harness.evaluate(seen, strategy)
        spent["eval"] += time.time() - t_eval
        spent["questions"] += sum(questions[task] for task in seen)
        p.history["acc"].append(acc), p.history["acc_datasets"].append(acc_d), p.history["gates"].append(gates)
        opened = strategy.open_subspaces()
        if opened is not None:
            p.history["subspaces"].append(opened)
        log(f"after stage {t + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in acc.items())
            + f" | mean {np.mean(list(acc.values())):.1f}")
        p.stage, p.round = t + 1, 0
        if on_round:
            on_round(p, strategy)
    return p.history
