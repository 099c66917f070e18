"""How a run's config is decided: RunConfig (every field a flag sets, and its default), the presets, the command
line, and the checks that name a bad flag before any work. Dataclass defaults, then the preset, then the flags given.

    cfg = resolve(parse_args(["--setting", "cap-het", "--preset", "paper"]))    # train.main's first step
    cfg.fed.batch_size, lora_layout(cfg)                                        # 64, (4, 8): the paper's settings
Presets: default (the embedded benchmark on a CPU), tiny (seconds, for tests), paper (the paper's hyperparameters).
Methods: STRATEGIES below (DISCO and Finetune in federated.py, the baselines in baselines/).
Tests: python -m pytest tests/test_train.py tests/test_inputs.py
"""
import argparse
import dataclasses
import json
import math

import torch

import fcit
from baselines import METHODS as BASELINES
from baselines.ewc import EWCConfig
from baselines.lwf import LwFConfig
from baselines.olora import OLoRAConfig
from baselines.server import SERVERS, STATEFUL, ServerConfig
from data import get_setting
from embedded.base import BaseConfig
from federated import Disco, FedConfig, Finetune
from model import VICUNA_SYSTEM, require_folder
from parallel.world import MODES

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
RUN_FLAGS = ("setting", "method", "beta", "seed", "device", "data", "model", "text_encoder", "train_limit",
             "test_limit", "lora_dropout", "parallel", "gradient_checkpointing")
FED_FLAGS = {"rounds": "rounds", "clients": "num_clients", "clients_per_round": "clients_per_round", "lr": "lr",
             "local_epochs": "local_epochs", "batch_size": "batch_size", "micro_batch": "micro_batch",
             "aggregate": "aggregate", "eval_batch": "eval_batch"}
DISCO_FLAGS = {"threshold": "threshold", "activation": "activation", "identity": "identity", "open": "open"}
SERVER_FLAGS = {"server": "name", "server_lr": "lr", "mu": "mu"}


def parse_args(argv=None):
    R, F, D, S = RunConfig, FedConfig, fcit.DiscoConfig, ServerConfig
    ap = argparse.ArgumentParser(prog="train.py", formatter_class=argparse.RawTextHelpFormatter,
                                 description="One FCIT experiment end to end: data -> base model -> LoRA -> federated "
                                             "continual training -> results")
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
    ap.add_argument("--activation", choices=list(fcit.ACTIVATIONS),
                    help=f"DISCO gate at inference (default {D.activation})")
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


def lora_layout(cfg: RunConfig):
    """(K subspaces, rank of each): the method's answer at the run's total rank."""
    return STRATEGIES[cfg.method][0].lora_layout(rank=cfg.rank, subspace_rank=cfg.subspace_rank,
                                                 num_stages=get_setting(cfg.setting).num_stages)
