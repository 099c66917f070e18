"""Run one FCIT experiment end to end: data -> base model -> LoRA -> federated continual training -> results.

    python train.py --setting task-hom                       # DISCO on the embedded benchmark (minutes, CPU)
    python train.py --setting task-het --method finetune --beta 0.5 --seed 1
    python train.py --data ROOT --model LLAVA --text-encoder CLIP --preset paper --device cuda   # the real benchmark
    torchrun --standalone --nproc-per-node 2 train.py --setting task-hom   # a round's clients over 2 processes
    torchrun --nproc-per-node 5 train.py ... --device cuda --parallel balanced   # every batch over 5 GPUs

The path a reader follows: `resolve` turns flags into one RunConfig (every default is a dataclass field), `prepare`
finds the data and the base (the embedded benchmark and the tiny base, made once into the cache, unless --data and
--model are given), `build_model` wraps the base's FFN with the method's LoRA layout, `make_harness` hands the
model-specific pieces to the loop, and federated.run_continual trains stage after stage. It writes OUT/results.json
(accuracy matrix, Last, Avg, forgetting, the resolved config, and what the method reports), OUT/accuracy.png,
OUT/partition.json, OUT/config.json, OUT/checkpoint.* and, for DISCO, OUT/activation.png. The checkpoint after
every round lets an interrupted run continue where it stopped (run the same command again; --fresh ignores it).
Methods: zeroshot (the base model), mtl (centralized multi-task upper bound), finetune and disco (federated.py), and
the baselines ewc, lwf, olora, moelora (baselines/). Servers (--server, baselines/server.py): fedavg, fedprox,
fedavgm, fedadagrad, fedadam, fedyogi. --aggregate is the method's choice unless given: ab for ewc and the last four
servers, which keep state in the coordinates of the LoRA factors (svd re-factors them every round), svd otherwise.
Under torchrun (parallel/world.py) every process runs main; rank 0 alone logs and writes.
Tests: python -m pytest tests/test_train.py tests/test_parallel.py
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch
from transformers.utils import logging as hf_logging

import fcit
import metrics
from baselines import METHODS as BASELINES
from baselines.ewc import EWCConfig
from baselines.lwf import LwFConfig
from baselines.olora import OLoRAConfig
from baselines.server import SERVERS, STATEFUL, ServerConfig, ServerOptimizer
from data import (METRIC, check_images, get_setting, load_release, partition_lists, partition_setting, read_image,
                  release_setting, rules, save_partition)
from embedded import benchmark, pretraining
from embedded.base import BaseConfig, pretrain_base, shipped, weights_sha256
from federated import (Disco, Diverged, FedConfig, Finetune, Harness, Progress, Solo, is_projector, local_train,
                       run_continual, strip_prefix)
from lora import LoRAConfig, add_lora, gated, split_factor
from model import (VICUNA_SYSTEM, checkpoint_activations, clip_text_features, collate, expand_to_square, generate,
                   image_features, instruction_features, load_model, load_text_encoder, require_folder, to_device)
from parallel.world import MODES, join
from storage.checkpoint import CHECKPOINT, Checkpoint, fingerprint, read_checkpoint, where, write_json
from storage.results import write_results

# --method -> (strategy class, its hyperparameter dataclass or None); zeroshot and mtl are Finetune's model
STRATEGIES = {"disco": (Disco, fcit.DiscoConfig), "finetune": (Finetune, None), "mtl": (Finetune, None),
              "zeroshot": (Finetune, None), **BASELINES}
METHODS = list(STRATEGIES)


@dataclasses.dataclass
class RunConfig:
    """Everything a run depends on; saved beside the results."""
    setting: str = "task-hom"       # task-hom | task-het | cap-hom | cap-het
    method: str = "disco"
    beta: float = 1.0               # Dirichlet concentration of the client partition (paper: 0.5, 1.0, 5.0)
    seed: int = 0
    preset: str = "default"
    device: str = "cpu"
    rank: int = 64                  # total LoRA rank (paper: 64 task-related, 32 capability-related)
    subspace_rank: int = 8          # DISCO: rank of one subspace, so K_max = rank / subspace_rank; MoELoRA's experts
    alpha: float = 128.0            # s = alpha / rank = 2 (paper)
    lora_dropout: float = 0.05      # on the LoRA branch's input (paper, official code)
    parallel: str = "exact"         # under torchrun: exact (one client a process, bitwise one process) | balanced
    train_examples: int = 4000      # per dataset (embedded benchmark): ~80 per client, 10 local steps
    test_examples: int = 200
    pretrain_examples: int = BaseConfig.pretrain_examples
    base_layers: int = BaseConfig.layers  # language-model layers of the embedded base (the shipped one has 4)
    mtl_epochs: int = 1
    system: str = BaseConfig.system  # the vicuna_v1 system line the base was trained with (VICUNA_SYSTEM for LLaVA)
    data: str | None = None         # --data: the official FCIT release folder (default: the embedded benchmark)
    model: str | None = None        # --model: a llava, qwen2_5_vl or internvl folder (default: the tiny base)
    text_encoder: str | None = None # --text-encoder: a CLIP text encoder folder for DISCO's identity tokens
    train_limit: int | None = None  # first N training records per dataset (a smoke test of the real data)
    test_limit: int | None = None   # first N test records per dataset
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: memory for time (official: on)
    fed: FedConfig = dataclasses.field(default_factory=FedConfig)
    disco: fcit.DiscoConfig = dataclasses.field(default_factory=fcit.DiscoConfig)
    ewc: EWCConfig = dataclasses.field(default_factory=EWCConfig)
    lwf: LwFConfig = dataclasses.field(default_factory=LwFConfig)
    olora: OLoRAConfig = dataclasses.field(default_factory=OLoRAConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)


PRESETS = {
    "default": {},
    # seconds, for tests: a micro base (one layer, 2 pretraining steps), a few examples, one round, two clients,
    # EWC's Fisher on 4 examples a client
    "tiny": dict(train_examples=40, test_examples=6, pretrain_examples=64, base_layers=1, rank=16, subspace_rank=2,
                 ewc=dict(fisher_examples=4),
                 fed=dict(num_clients=6, clients_per_round=2, rounds=1, min_size=2, eval_batch=8, max_new_tokens=12)),
    # the paper's hyperparameters (fcit-paper-notes.md 1.3, 1.5, 4; the official code): global batch 128 (64 in
    # the capability settings), answers up to 128 tokens, the projector at the LoRA rate (the official trainer
    # never uses --mm_projector_lr). How a batch is computed changes no number and is chosen for speed on an H200
    # (README, scripts.bench_gpu): micro-batches of 4 without checkpointing, 1.4-1.5x the official recipe's rate
    "paper": dict(gradient_checkpointing=False,
                  fed=dict(num_clients=50, clients_per_round=5, rounds=10, local_epochs=1, lr=2e-4, projector_lr=2e-4,
                           warmup=0.03, batch_size=128, micro_batch=4, max_new_tokens=128, eval_batch=64)),
}

# flag -> field, by the config that owns it; a flag left out (None) keeps the preset's or the dataclass's value
RUN_FLAGS = ("setting", "method", "beta", "seed", "device", "data", "model", "text_encoder", "train_limit", "test_limit",
             "lora_dropout", "parallel", "gradient_checkpointing")
FED_FLAGS = {"rounds": "rounds", "clients": "num_clients", "clients_per_round": "clients_per_round", "lr": "lr",
             "local_epochs": "local_epochs", "batch_size": "batch_size", "micro_batch": "micro_batch",
             "aggregate": "aggregate", "eval_batch": "eval_batch"}
DISCO_FLAGS = {"threshold": "threshold", "activation": "activation", "identity": "identity", "open": "open"}
SERVER_FLAGS = {"server": "name", "server_lr": "lr", "mu": "mu"}


def cache_dir():
    return os.environ.get("FCIT_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "fcit"))


def parse_args(argv=None):
    R, F, D, S = RunConfig, FedConfig, fcit.DiscoConfig, ServerConfig
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setting", help=f"task-hom | task-het | cap-hom | cap-het (default {R.setting})")
    ap.add_argument("--method", help=f"{' | '.join(METHODS)} (default {R.method})")
    ap.add_argument("--beta", type=float, help=f"Dirichlet concentration of the client partition (default {R.beta})")
    ap.add_argument("--seed", type=int, help=f"default {R.seed}")
    ap.add_argument("--out", help="output folder (default runs/<setting>_<method>_b<beta>_s<seed>)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help=f"default {R.device}")
    ap.add_argument("--preset", choices=list(PRESETS), help=f"default {R.preset}")
    ap.add_argument("--rounds", type=int, help=f"rounds per stage (default {F.rounds})")
    ap.add_argument("--clients", type=int, help=f"number of clients (default {F.num_clients})")
    ap.add_argument("--clients-per-round", type=int, help=f"default {F.clients_per_round}")
    ap.add_argument("--lr", type=float, help=f"peak LoRA learning rate (default {F.lr})")
    ap.add_argument("--local-epochs", type=int, help=f"default {F.local_epochs}")
    ap.add_argument("--batch-size", type=int, help=f"local batch, examples per optimizer step (default {F.batch_size})")
    ap.add_argument("--micro-batch", type=int, help="examples per forward pass; gradients accumulate to --batch-size")
    ap.add_argument("--eval-batch", type=int, help=f"test questions answered together (default {F.eval_batch})")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    help=f"recompute activations in the backward pass: a half to a third of the memory for "
                         f"1.5-1.7x the time of a 7B step (default {R.gradient_checkpointing}; off in --preset paper)")
    ap.add_argument("--aggregate", choices=list(fcit.AGGREGATIONS),
                    help="LoRA aggregation inside a subspace (default: the method's choice, ab for ewc and "
                         + ", ".join(STATEFUL) + ", svd otherwise)")
    ap.add_argument("--activation", choices=list(fcit.ACTIVATIONS), help=f"DISCO gate at inference (default {D.activation})")
    ap.add_argument("--threshold", type=float, help=f"DISCO DKO cosine threshold tau (default {D.threshold})")
    ap.add_argument("--identity", choices=list(fcit.IDENTITIES), help=f"DISCO identity tokens (default {D.identity})")
    ap.add_argument("--open", choices=list(fcit.OPENINGS),
                    help=f"when DISCO's DKO may open a subspace: in every round (the paper's text) or only in a "
                         f"stage's first round (the official code) (default {D.open})")
    ap.add_argument("--server", choices=list(SERVERS), help=f"server optimizer (default {S.name}); "
                    + ", ".join(STATEFUL) + " need --aggregate ab (their default)")
    ap.add_argument("--server-lr", type=float, help="server learning rate eta (default 1 for fedavgm, 1e-2 adaptive)")
    ap.add_argument("--mu", type=float, help=f"FedProx proximal weight (default {S.mu})")
    ap.add_argument("--data", help="the official FCIT release folder (instructions/, datasets/, partitioned_data/)")
    ap.add_argument("--model", help="a checkpoint folder as save_pretrained writes it: llava (e.g. "
                    "llava-1.5-7b-hf), qwen2_5_vl (Qwen2.5-VL-3B-Instruct) or internvl (InternVL3-2B-hf)")
    ap.add_argument("--text-encoder", help="a CLIP text encoder folder (clip-vit-large-patch14-336) for DISCO")
    ap.add_argument("--lora-dropout", type=float, help=f"dropout on the LoRA branch's input (default {R.lora_dropout})")
    ap.add_argument("--parallel", choices=list(MODES), help=f"under torchrun: exact (a round's clients spread over the "
                    f"processes; bitwise the one-process numbers) or balanced (every batch split over them: rounds no "
                    f"longer wait for the largest client; equal within rounding) (default {R.parallel})")
    ap.add_argument("--train-limit", type=int, help="first N training records per dataset")
    ap.add_argument("--test-limit", type=int, help="first N test records per dataset")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    ap.add_argument("--verbose", action="store_true", help="print every client's routing and loss")
    ap.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own, OMP_NUM_THREADS or "
                    "the cores). Float sums, and so the figures, depend on it; the checkpoint's fingerprint records "
                    "it. On cores other processes share, 1 can be several times faster than 2")
    return ap.parse_args(argv)


def given(args, flags):
    """{field: value} of the flags that were given (not None), for flags = {flag: field} or (field, ...)."""
    pairs = flags.items() if isinstance(flags, dict) else ((f, f) for f in flags)
    return {field: getattr(args, flag) for flag, field in pairs if getattr(args, flag) is not None}


def resolve(args) -> RunConfig:
    """Dataclass defaults, then the preset, then the flags given: the one place a run's config is decided. Bad
    flags fail here, before any work."""
    name = RunConfig.preset if args.preset is None else args.preset
    preset = json.loads(json.dumps(PRESETS[name]))
    # a nested config (fed, disco, server, a method's): the preset's fields, then its flags
    nested = {k: preset.pop(k) for k in list(preset) if isinstance(preset[k], dict)}
    fed = nested.pop("fed", {})
    cfg = RunConfig(**{**preset, **given(args, RUN_FLAGS), "preset": name})
    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r} is unknown; choose one of {', '.join(METHODS)}")
    setting = get_setting(cfg.setting)
    if setting.name.startswith("cap") and "rank" not in preset:
        cfg.rank, cfg.alpha = 32, 64.0                                   # paper: 4 subspaces of rank 8
    if setting.name.startswith("cap") and cfg.preset == "paper":
        fed["batch_size"] = 64                                           # paper: 16 per GPU x 4 GPUs
    flags = {"server": given(args, SERVER_FLAGS), "disco": given(args, DISCO_FLAGS)}
    for k in nested.keys() | flags.keys():
        setattr(cfg, k, type(getattr(cfg, k))(**{**nested.get(k, {}), **flags.get(k, {})}))
    # --aggregate left out: the method's choice, ab where its state or the server's is in factor coordinates
    cfg.fed = FedConfig(**{"aggregate": "svd" if factor_state(cfg) is None else "ab", **fed, **given(args, FED_FLAGS)})
    cfg.system = VICUNA_SYSTEM if cfg.model else BaseConfig.system     # the prompt the base was trained with
    validate(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; run with --device cpu")
    if cfg.fed.clients_per_round > cfg.fed.num_clients:
        raise ValueError(f"--clients-per-round {cfg.fed.clients_per_round} exceeds --clients {cfg.fed.num_clients}")
    lora_layout(cfg)                                                     # a rank the method cannot split fails now
    return cfg


def factor_state(cfg: RunConfig) -> tuple[str, str] | None:
    """(flag, what) when the method or the server keeps state across rounds in the coordinates of the LoRA factors
    (EWC's anchor and Fisher, a stateful server's moments), else None. `--aggregate svd` re-factors the factors
    every round: the same update B A in new factors, so such state would refer to factors that no longer exist.
    The one place this is decided: resolve makes ab the default where it is not None, validate refuses svd."""
    what = STRATEGIES[cfg.method][0].factor_state
    if what:
        return f"--method {cfg.method}", what
    if cfg.server.name in STATEFUL:
        return f"--server {cfg.server.name}", "moments of the factors' change"
    return None


def validate(cfg: RunConfig):
    """Every number of the run in its range, and the model folders complete, before any work; the flag or the
    folder is named. argparse checks only the type: `--lr nan` and `--rounds 0` parse."""
    f, s = cfg.fed, cfg.server
    local_lrs = {"--lr": f.lr, f"projector_lr (--preset {cfg.preset})": f.projector_lr}
    positive = {"--beta": cfg.beta, **local_lrs, "--server-lr": s.lr}
    at_least_one = {"--rounds": f.rounds, "--clients": f.num_clients, "--clients-per-round": f.clients_per_round,
                    "--local-epochs": f.local_epochs, "--batch-size": f.batch_size, "--eval-batch": f.eval_batch,
                    "--train-limit": cfg.train_limit,
                    "--test-limit": cfg.test_limit}                   # the limits only when given (None = all)
    for flag, x in positive.items():
        if not 0 < x < math.inf:                                      # nan fails every comparison
            raise ValueError(f"{flag} must be a finite number > 0, got {x}")
    for flag, x in local_lrs.items():
        # AdamW moves every weight by about lr a step: above 1 the first step swamps the weights, RMSNorm then
        # zeroes the hidden states and every loss and update stays finite (--lr 1e9 ended with exit 0, Last 0.00)
        if x > 1:
            raise ValueError(f"{flag} must be <= 1 (AdamW moves each weight by about lr per step; the paper's "
                             f"LoRA lr is 2e-4), got {x}")
    for flag, x in at_least_one.items():
        if x is not None and x < 1:
            raise ValueError(f"{flag} must be >= 1, got {x}")
    if f.micro_batch < 0:
        raise ValueError(f"--micro-batch must be >= 0 (0: the whole batch in one pass), got {f.micro_batch}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= s.mu < math.inf:
        raise ValueError(f"--mu must be a finite number >= 0, got {s.mu}")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be >= 0 (numpy's generators take no negative seed), got {cfg.seed}")
    state = factor_state(cfg)
    if state and f.aggregate != "ab":
        raise ValueError(f"{state[0]} keeps {state[1]} across rounds in the coordinates of the LoRA factors, which "
                         f"--aggregate {f.aggregate} re-factors every round, so that state would no longer match the "
                         f"factors; leave --aggregate out (ab is its default) or pass --aggregate ab")
    # the folders' files, not their weights: a missing tokenizer of --text-encoder (loaded at the first DKO
    # routing) would otherwise stop the run after its first round
    if cfg.model:
        require_folder(cfg.model, "model checkpoint", processor=True)
    if cfg.text_encoder:
        require_folder(cfg.text_encoder, "CLIP text encoder")


# ---------------------------------------------------------------------------- data and base model
def prepare(cfg: RunConfig, log):
    """(data root, base model folder): --data / --model as given, else the embedded benchmark and the pretrained
    tiny base (the repository's, embedded/tiny-llava; another recipe's is pretrained once into the cache).
    The embedded benchmark is generated once into the cache and reused."""
    root, base = cfg.data, cfg.model
    if root is None:
        root = os.path.join(cache_dir(), f"data-v{benchmark.VERSION}-seed0-{cfg.train_examples}x{cfg.test_examples}")
        if not os.path.exists(os.path.join(root, "COMPLETE")):
            log(f"generating the embedded benchmark into {root} ...")
            benchmark.write_release(root, seed=0, sizes=benchmark.Sizes(cfg.train_examples, cfg.test_examples))
    if base is None:
        recipe = BaseConfig(pretrain_examples=cfg.pretrain_examples, layers=cfg.base_layers)
        base = shipped(recipe) or os.path.join(cache_dir(), f"base-v{pretraining.BASE_VERSION}-seed0-"
                                                            f"{cfg.pretrain_examples}x{cfg.base_layers}")
        if not os.path.isdir(base):
            log(f"pretraining the tiny base model into {base} (once) ...")
            pretrain_base(base, recipe, log=log)
    return root, base


def lora_layout(cfg: RunConfig):
    """(K subspaces, rank of each): the method's answer at the run's total rank."""
    return STRATEGIES[cfg.method][0].lora_layout(rank=cfg.rank, subspace_rank=cfg.subspace_rank,
                                                 num_stages=get_setting(cfg.setting).num_stages)


def adapt(model, cfg: RunConfig, log=lambda *a: None):
    """The one place that decides what trains and travels: the method's LoRA layout on the FFN projections of the
    language model only (`get_decoder()`: a vision tower's own gate/up/down_proj, as Qwen2.5-VL's, stays frozen),
    and the projector (federated.PROJECTORS) when cfg.fed.train_projector; every other weight frozen.
    Returns {part: trainable parameter count}."""
    for p in model.parameters():
        p.requires_grad_(False)
    K, R = lora_layout(cfg)
    names = add_lora(model.get_decoder(), LoRAConfig(num_subspaces=K, rank=R, alpha=cfg.alpha,
                                                     dropout=cfg.lora_dropout),
                     generator=torch.Generator().manual_seed(cfg.seed), layer=STRATEGIES[cfg.method][0].layer)
    for n, p in model.named_parameters():
        if cfg.fed.train_projector and is_projector(n):
            p.requires_grad_(True)
    counts = {"lora": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and split_factor(n)),
              "projector": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_projector(n))}
    counts["other trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(counts.values())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log(f"trainable: LoRA {counts['lora']:,} ({K} x rank {R} on {len(names)} FFN projections of the language "
        f"model), projector {counts['projector']:,}" + (f", other {counts['other trainable']:,}"
                                                         if counts["other trainable"] else "") + f"; frozen {frozen:,}")
    return counts


def build_model(base, cfg: RunConfig, log=lambda *a: None):
    """The base with every weight frozen, the method's LoRA layout on the FFN, the projector trainable."""
    # bf16 weights on a GPU (paper); the LoRA factors stay float32 whatever the base is (lora.py)
    dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
    model, processor = load_model(base, dtype=dtype, device=cfg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    adapt(model, cfg, log)
    model.to(cfg.device)
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    return model.eval(), processor


def images_of(examples, processor):
    """The examples' images as the model sees them: read, then padded to a square (model.expand_to_square)."""
    return [expand_to_square(read_image(e.image), processor) for e in examples]


def answerer(model, processor, cfg: RunConfig, lengths=None):
    """answer(examples, gate) -> greedy answers, with `gate` ((B, K) or None) bound on the LoRA layers; each batch
    generates at most its examples' metrics.answer_lengths (lengths: {id(example): n}), else cfg.fed.max_new_tokens."""
    cap = cfg.fed.max_new_tokens

    def answer(examples, gate):
        n = max(lengths.get(id(e), cap) for e in examples) if lengths else cap
        with gated(model, gate):
            return generate(model, processor, images_of(examples, processor), [e.question for e in examples],
                            system=cfg.system, max_new_tokens=n)
    return answer


def load_data(cfg: RunConfig, root, log=lambda *a: None):
    """(setting, data, the release's client partition or None) of a run: the setting in the stage order of the
    release's Task folders when it ships a partition, and its examples, capped by --train-limit and --test-limit
    with the run's own seeded draw, so that scripts/ask.py scores exactly the test sets the run did."""
    setting = get_setting(cfg.setting)
    ordered = release_setting(root, setting, beta=cfg.beta)
    if ordered.tasks != setting.tasks:
        log(f"stage order from the release's Task folders: {', '.join(ordered.tasks)} (the Het table's task "
            f"indices follow it)")
    data, parts = load_release(root, ordered, beta=cfg.beta, num_clients=cfg.fed.num_clients,
                               rng=np.random.default_rng([cfg.seed, 1]), train_limit=cfg.train_limit,
                               test_limit=cfg.test_limit)
    return ordered, data, parts


def make_harness(model, processor, data, cfg: RunConfig, log, rules=METRIC, world=Solo()) -> Harness:
    """The model-specific pieces of the loop: batches, the evaluation (metrics.evaluate_tasks with the model's
    answers, the test batches spread over the world's processes), and the frozen encoders of identity tokens
    (CLIP's text tower when --text-encoder is given, loaded on first use; else the base's own word embeddings).
    rules: {dataset: metric} (data.rules of the release)."""
    def make_batch(examples):
        batch = collate(processor, images_of(examples, processor), [e.question for e in examples],
                        [e.answer for e in examples], system=cfg.system, later=[e.later for e in examples])
        return to_device(batch, model.device, model.dtype)

    answer = answerer(model, processor, cfg,
                      metrics.answer_lengths(data, processor.tokenizer, cfg.fed.max_new_tokens))

    def evaluate(tasks, strategy):
        B = cfg.fed.eval_batch                                         # the batches in evaluate_tasks' order
        batches = [ex[i:i + B] for task in tasks for ex in data[task].test.values() for i in range(0, len(ex), B)]
        return metrics.evaluate_tasks(world.shard_answers(answer, strategy.eval_gate, batches), strategy.eval_gate,
                                      data, tasks, rules=rules, batch=B, log=log)

    clip = functools.cache(lambda: load_text_encoder(cfg.text_encoder, device=cfg.device))
    encode_text = ((lambda questions: clip_text_features(*clip(), questions)) if cfg.text_encoder else
                   (lambda questions: instruction_features(model, processor, questions)))
    return Harness(make_batch, evaluate, encode_text,
                   encode_images=lambda examples: image_features(model, processor, images_of(examples, processor)))


def make_strategy(cfg: RunConfig, model, harness, log, detail):
    """The method's strategy, with a server optimizer on top when --server asks for one (plain FedAvg has none)."""
    cls, hp_class = STRATEGIES[cfg.method]
    hp = getattr(cfg, cfg.method) if hp_class else None                 # the RunConfig field named after the method
    strategy = cls(model, harness, cfg.fed, hp=hp, log=log, detail=detail)
    return strategy if cfg.server.name == "fedavg" else ServerOptimizer(strategy, cfg.server)


# ---------------------------------------------------------------------------- main
def main(argv=None, log=print):
    hf_logging.disable_progress_bar()                                  # our progress lines, not loading bars
    args = parse_args(argv)
    cfg = resolve(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)                            # before the fingerprint, which records it
    world = join(cfg.device, cfg.parallel) or Solo()                   # torchrun's processes, else this one alone
    if world.rank:
        log = lambda *a: None                                          # noqa: E731 (rank 0 alone logs and writes)
    out = args.out or os.path.join("runs", f"{cfg.setting}_{cfg.method}_b{cfg.beta:g}_s{cfg.seed}")
    cfg_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if world.rank:                                                     # rank 0 fills the cache, then the others read
        world.barrier()
    root, base = prepare(cfg, log)
    if not world.rank:
        world.barrier()
    scoring = rules(root, metrics.RULES)                               # a bad rules.json is named before any work
    # the release's own client partition when it ships one for this beta (results then compare with the paper's),
    # else our seeded Dirichlet partition
    setting, data, parts = load_data(cfg, root, log)
    if parts is None:
        parts = partition_setting(data, cfg.fed.num_clients, beta=cfg.beta, min_size=cfg.fed.min_size,
                                  rng=np.random.default_rng([cfg.seed, 2]))
    else:
        log(f"using the release's client partition for beta {cfg.beta:g} ({root}/partitioned_data)")
    check_images(data)                                                # every bad image named now, not at stage 8
    identity = {"config": cfg_json, "fingerprint": fingerprint(root, base, partition_lists(parts))}
    # a checkpoint of another run is refused here, before anything is written into OUT
    saved = None if args.fresh or cfg.method in ("zeroshot", "mtl") else read_checkpoint(out, identity)
    if saved and saved[1]["stage"] == setting.num_stages and os.path.exists(os.path.join(out, "results.json")):
        log(f"{out}: this run is complete; its results.json is kept as it is (--fresh runs it again)")
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)
    if not world.rank:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "config.json"), cfg_json)
        save_partition(os.path.join(out, "partition.json"), parts)
    model, processor = build_model(base, cfg, log)
    harness = make_harness(model, processor, data, cfg, log, rules=scoring, world=world)
    inputs = {"base": base, "base_sha256": weights_sha256(base), "rules": scoring}
    strategy = make_strategy(cfg, model, harness, log, detail=log if args.verbose else None)
    if cfg.method in ("zeroshot", "mtl"):
        if cfg.method == "mtl":                                       # one client holding every task's data
            everything = [e for td in data.values() for e in td.train]
            _, loss = local_train(model, harness, everything, gate=None, rng=np.random.default_rng([cfg.seed, 3]),
                                  cfg=dataclasses.replace(cfg.fed, local_epochs=cfg.mtl_epochs))
            log(f"mtl: trained on {len(everything)} examples, mean loss {loss:.3f}")
        acc, acc_d, _ = harness.evaluate(setting.tasks, strategy)
        history = {"acc": [acc], "acc_datasets": [acc_d], "gates": [], "subspaces": None}
        return None if world.rank else write_results(out, cfg, setting, history, strategy.report(history), time.time() - t0, log,
                             inputs=inputs)
    progress, meta = None, (saved or ({}, {}))[1]
    if saved:
        strategy.load(saved[0])
        progress = Progress(meta["stage"], meta["round"], strip_prefix(saved[0], "global."), meta["history"])
        log(f"resuming from {out}/{CHECKPOINT}: {where(meta['stage'], meta['round'])} done")
    save = Checkpoint(out, identity, wall_before=meta.get("wall", 0.0),
                      done=(meta["stage"], meta["round"]) if saved else None)
    history = run_continual(model, harness, setting, data, parts, strategy, cfg.fed, seed=cfg.seed, log=log,
                            progress=progress, on_round=None if world.rank else save, world=world)
    return None if world.rank else write_results(out, cfg, setting, history, strategy.report(history), save.wall(), log, inputs=inputs,
                         intact=save.intact)


if __name__ == "__main__":
    try:
        main()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except (ValueError, OSError, Diverged) as e:                     # FileNotFoundError is an OSError
        sys.exit(f"error: {e}")
