"""Run one FCIT experiment end to end: data -> base model -> LoRA -> federated continual training -> results.

    python train.py --setting task-hom                       # DISCO on the embedded benchmark (minutes, CPU)
    python train.py --setting task-het --method finetune --beta 0.5 --seed 1
    python train.py --data ROOT --model LLAVA --text-encoder CLIP --preset paper --device cuda   # the real benchmark

Writes OUT/results.json (accuracy matrix, Last, Avg, forgetting, the resolved config), OUT/accuracy.png,
OUT/partition.json, OUT/config.json and, for DISCO, OUT/activation.png. A checkpoint after every round lets an
interrupted run continue where it stopped (run the same command again; --fresh ignores it).
Methods: zeroshot (the base model), mtl (centralized multi-task upper bound), finetune, disco, and the baselines
ewc, lwf, olora, moelora (baselines.py). Servers (--server, server.py): fedavg, fedprox, fedavgm, fedadagrad, fedadam,
fedyogi; the last four need --aggregate ab.
Tests: python -m pytest tests/test_train.py
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

import fcit
import metrics
import synthetic
from baselines import METHODS as BASELINES, BaselineConfig, add_moelora
from data import get_setting, load_release, partition_setting, save_partition
from federated import Disco, FedConfig, Progress, Strategy, evaluate_tasks, local_train, run_continual
from lora import LoRAConfig, add_lora
from model import VICUNA_SYSTEM, ModelConfig, clip_text_features, load_llava, load_text_encoder, pretrain_base
from server import SERVERS, STATEFUL, ServerConfig

METHODS = ["disco", "finetune", "mtl", "zeroshot", *BASELINES]


@dataclasses.dataclass
class RunConfig:
    """Everything a run depends on; saved beside the results."""
    setting: str = "task-hom"
    method: str = "disco"
    beta: float = 1.0
    seed: int = 0
    preset: str = "default"
    device: str = "cpu"
    rank: int = 64                  # total LoRA rank (paper: 64 task-related, 32 capability-related)
    subspace_rank: int = 8          # DISCO: rank of one subspace; K = rank / subspace_rank slots
    alpha: float = 128.0            # s = alpha / rank = 2 (paper)
    lora_dropout: float = 0.05
    train_examples: int = 4000      # per dataset (embedded benchmark): ~80 per client, 10 local steps
    test_examples: int = 200
    pretrain_examples: int = ModelConfig.pretrain_examples
    mtl_epochs: int = 1
    data: str | None = None         # --data: the official FCIT release folder (default: the embedded benchmark)
    model: str | None = None        # --model: a LLaVA checkpoint folder, llava-hf layout (default: the tiny base)
    text_encoder: str | None = None # --text-encoder: a CLIP text encoder folder for DISCO's identity tokens
    train_limit: int | None = None  # first N training records per dataset (a smoke test of the real data)
    test_limit: int | None = None   # first N test records per dataset
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: memory for time (paper: on)
    fed: FedConfig = dataclasses.field(default_factory=FedConfig)
    disco: fcit.DiscoConfig = dataclasses.field(default_factory=fcit.DiscoConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    baselines: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)


PRESETS = {
    "default": {},
    # seconds, for tests: a micro base, a few examples, one round, two clients
    "tiny": dict(train_examples=40, test_examples=6, pretrain_examples=64, rank=16, subspace_rank=2,
                 fed=dict(num_clients=6, clients_per_round=2, rounds=1, min_size=2, eval_batch=8, max_new_tokens=12)),
    # the paper's hyperparameters (fcit-paper-notes.md 1.3, 1.5; the official scripts): global batch 128 (64 in the
    # capability settings) through micro-batches of 8, projector lr 2e-5, answers up to 128 tokens
    "paper": dict(gradient_checkpointing=True,
                  fed=dict(num_clients=50, clients_per_round=5, rounds=10, local_epochs=1, lr=2e-4, projector_lr=2e-5,
                           warmup=0.03, batch_size=128, micro_batch=8, max_new_tokens=128, eval_batch=16)),
}


def cache_dir():
    return os.environ.get("FCIT_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "fcit"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setting", default="task-hom", help="task-hom | task-het | cap-hom | cap-het")
    ap.add_argument("--method", default="disco", help=" | ".join(METHODS))
    ap.add_argument("--beta", type=float, default=1.0, help="Dirichlet concentration of the client partition")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default runs/<setting>_<method>_b<beta>_s<seed>)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="default", choices=list(PRESETS))
    ap.add_argument("--rounds", type=int, help="rounds per stage")
    ap.add_argument("--clients", type=int, help="number of clients")
    ap.add_argument("--clients-per-round", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--local-epochs", type=int)
    ap.add_argument("--aggregate", choices=["svd", "ab"], help="LoRA aggregation inside a subspace")
    ap.add_argument("--activation", choices=list(fcit.ACTIVATIONS), help="DISCO gate at inference (ablation)")
    ap.add_argument("--threshold", type=float, help="DISCO DKO cosine threshold tau")
    ap.add_argument("--identity", choices=list(fcit.IDENTITIES), help="DISCO identity tokens from text (paper), image or both")
    ap.add_argument("--server", choices=list(SERVERS), help="server optimizer (default fedavg); "
                    + ", ".join(STATEFUL) + " need --aggregate ab")
    ap.add_argument("--server-lr", type=float, help="server learning rate eta (default 1 for fedavgm, 1e-2 adaptive)")
    ap.add_argument("--mu", type=float, help="FedProx proximal weight (default 0.01)")
    ap.add_argument("--batch-size", type=int, help="local batch (examples per optimizer step)")
    ap.add_argument("--micro-batch", type=int, help="examples per forward pass; gradients accumulate to --batch-size")
    ap.add_argument("--data", help="the official FCIT release folder (instructions/, datasets/, partitioned_data/)")
    ap.add_argument("--model", help="a LLaVA checkpoint folder in the llava-hf layout, e.g. llava-1.5-7b-hf")
    ap.add_argument("--text-encoder", help="a CLIP text encoder folder (clip-vit-large-patch14-336) for DISCO")
    ap.add_argument("--train-limit", type=int, help="first N training records per dataset")
    ap.add_argument("--test-limit", type=int, help="first N test records per dataset")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    return ap.parse_args(argv)


def resolve(args) -> RunConfig:
    """Preset, then flags: the one place defaults are decided. Bad flags fail here, before any work."""
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)}")
    setting = get_setting(args.setting)
    if args.beta <= 0:
        raise ValueError(f"--beta must be > 0, got {args.beta}")
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    fed = FedConfig(**preset.pop("fed", {}))
    cfg = RunConfig(setting=args.setting, method=args.method, beta=args.beta, seed=args.seed, preset=args.preset,
                    device=args.device, **preset)
    if setting.name.startswith("cap") and "rank" not in PRESETS[args.preset]:
        cfg.rank, cfg.alpha = 32, 64.0                                   # paper: 4 subspaces of rank 8
    if setting.name.startswith("cap") and args.preset == "paper":
        fed.batch_size = 64                                              # paper: 16 per GPU x 4 GPUs
    for flag, field in (("rounds", "rounds"), ("clients", "num_clients"), ("clients_per_round", "clients_per_round"),
                        ("lr", "lr"), ("local_epochs", "local_epochs"), ("batch_size", "batch_size"),
                        ("micro_batch", "micro_batch")):
        if getattr(args, flag) is not None:
            setattr(fed, field, getattr(args, flag))
    fed.system = VICUNA_SYSTEM if args.model else ModelConfig.system  # the prompt the base was trained with
    for flag in ("data", "model", "text_encoder", "train_limit", "test_limit"):
        setattr(cfg, flag, getattr(args, flag))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; run with --device cpu")
    cfg.fed = fed
    cfg.disco = fcit.DiscoConfig(threshold=args.threshold or 0.9, activation=args.activation or "softmax",
                                 aggregate=args.aggregate or "svd", identity=args.identity or "text",
                                 max_subspaces=cfg.rank // cfg.subspace_rank)
    if fed.clients_per_round > fed.num_clients:
        raise ValueError(f"--clients-per-round {fed.clients_per_round} exceeds --clients {fed.num_clients}")
    if cfg.rank % cfg.subspace_rank:
        raise ValueError(f"rank {cfg.rank} is not a multiple of subspace_rank {cfg.subspace_rank}")
    if cfg.method == "olora" and cfg.rank % setting.num_stages:
        raise ValueError(f"olora: rank {cfg.rank} is not a multiple of the {setting.num_stages} stages")
    cfg.server = ServerConfig(name=args.server or "fedavg", lr=args.server_lr, mu=0.01 if args.mu is None else args.mu)
    if cfg.server.name in STATEFUL and cfg.disco.aggregate != "ab":
        raise ValueError(f"--server {cfg.server.name} keeps moments of the LoRA factors' change across rounds, which "
                         f"needs --aggregate ab: with --aggregate svd (the default) the factors are re-factored every "
                         f"round, so their changes are not comparable; pass --aggregate ab")
    return cfg


# ---------------------------------------------------------------------------- data and base model
def prepare(cfg: RunConfig, log):
    """(data root, base model folder): --data / --model as given, else the embedded benchmark and the pretrained
    tiny base, generated once into the cache and reused."""
    root, base = cfg.data, cfg.model
    if root is None:
        root = os.path.join(cache_dir(), f"data-v{synthetic.VERSION}-seed0-{cfg.train_examples}x{cfg.test_examples}")
        if not os.path.exists(os.path.join(root, "COMPLETE")):
            log(f"generating the embedded benchmark into {root} ...")
            synthetic.write_release(root, seed=0, sizes=synthetic.Sizes(cfg.train_examples, cfg.test_examples))
    if base is None:
        base = os.path.join(cache_dir(), f"base-v{synthetic.BASE_VERSION}-seed0-{cfg.pretrain_examples}")
        if not os.path.isdir(base):
            log(f"pretraining the tiny base model into {base} (once) ...")
            pretrain_base(base, ModelConfig(pretrain_examples=cfg.pretrain_examples), log=log)
    return root, base


def build_model(base, cfg: RunConfig):
    """The base with every weight frozen, LoRA on the FFN (K slots for DISCO, one for the others), projector on."""
    # bf16 weights on a GPU (paper); the LoRA factors stay float32 whatever the base is (lora.py)
    dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
    model, processor = load_llava(base, dtype=dtype, device=cfg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    # the same total rank for every method: DISCO and MoELoRA's experts at subspace_rank, O-LoRA one slot per stage
    K = {"disco": cfg.disco.max_subspaces, "moelora": cfg.disco.max_subspaces,
         "olora": get_setting(cfg.setting).num_stages}.get(cfg.method, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    wrap = add_moelora if cfg.method == "moelora" else add_lora
    wrap(model, LoRAConfig(num_subspaces=K, rank=cfg.rank // K, alpha=cfg.alpha, dropout=cfg.lora_dropout),
         generator=gen)
    model.to(cfg.device)
    if cfg.fed.train_projector:
        for p in model.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.eval(), processor


def make_strategy(cfg: RunConfig, model, processor, log):
    """The method registry: what each --method changes in the federated loop (federated.Strategy)."""
    if cfg.method == "disco":
        encode_text = None                                               # the base's own word embeddings
        if cfg.text_encoder:
            encoder, tokenizer = load_text_encoder(cfg.text_encoder, device=cfg.device)
            encode_text = lambda questions: clip_text_features(encoder, tokenizer, questions)  # noqa: E731
        return Disco(model, processor, cfg.fed, disco=cfg.disco, encode_text=encode_text, server_cfg=cfg.server,
                     log=log)
    if cfg.method in BASELINES:
        return BASELINES[cfg.method](model, processor, cfg.fed, baselines=cfg.baselines,
                                     aggregate_mode=cfg.disco.aggregate, server_cfg=cfg.server, log=log)
    return Strategy(model, processor, cfg.fed, aggregate_mode=cfg.disco.aggregate, server_cfg=cfg.server, log=log)


# ---------------------------------------------------------------------------- outputs
def checkpoint(out, cfg_json):
    """on_round callback: global state + strategy cache (safetensors) and progress (JSON), written atomically."""
    def save(p: Progress, strategy):
        tensors = {f"global.{k}": v.contiguous() for k, v in p.global_state.items()}
        tensors.update({k: v.contiguous() for k, v in strategy.state().items()})
        save_file(tensors, os.path.join(out, "checkpoint.safetensors.tmp"))
        meta = {"config": cfg_json, "stage": p.stage, "round": p.round, "history": p.history}
        write_json(os.path.join(out, "checkpoint.json.tmp"), meta)
        os.replace(os.path.join(out, "checkpoint.safetensors.tmp"), os.path.join(out, "checkpoint.safetensors"))
        os.replace(os.path.join(out, "checkpoint.json.tmp"), os.path.join(out, "checkpoint.json"))
    return save


def restore(out, cfg_json, strategy, log):
    path = os.path.join(out, "checkpoint.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if meta["config"] != cfg_json:
        raise ValueError(f"{path}: a checkpoint of a different configuration; use another --out or --fresh")
    tensors = load_file(os.path.join(out, "checkpoint.safetensors"))
    strategy.load(tensors)
    log(f"resuming from {path}: stage {meta['stage'] + 1}, round {meta['round'] + 1}")
    return Progress(meta["stage"], meta["round"], {k[7:]: v for k, v in tensors.items() if k.startswith("global.")},
                    meta["history"])


def write_json(path, obj):
    with open(path + ".part", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".part", path)


def print_matrix(acc, tasks, log):
    log("accuracy matrix (rows: after stage t; columns: tasks; '-' = not seen yet)")
    log("stage " + " ".join(f"{t[:11]:>11}" for t in tasks))
    for t, row in enumerate(acc):
        log(f"{t + 1:5d} " + " ".join(f"{row[k]:11.1f}" if k in row else f"{'-':>11}" for k in tasks))


def write_results(out, cfg, setting, history, wall, log):
    summary = metrics.summarize(history["acc"])
    res = {"setting": cfg.setting, "method": cfg.method, "beta": cfg.beta, "seed": cfg.seed, "tasks": setting.tasks,
           "acc": history["acc"], "acc_datasets": history["acc_datasets"], **summary,
           "subspaces": history.get("subspaces") or None, "wall_seconds": round(wall, 1), "config": dataclasses.asdict(cfg)}
    if cfg.method == "disco" and history["gates"]:
        final = history["gates"][-1]                                      # task -> mean gate over subspaces
        res["gates"] = final
        res["routes"] = history["routes"]                                # task -> the subspaces its clients trained
        # own_gate: the gate mass a task's test questions put on the subspace(s) its own clients trained
        res["own_gate"] = {t: round(sum(final[t][k] for k in history["routes"].get(t, [])), 4) for t in final}
        rows = [t for t in setting.tasks if t in final]
        metrics.draw_matrix(os.path.join(out, "activation.png"), np.array([final[t] for t in rows]), rows,
                            [f"subspace {k}" for k in range(len(final[rows[0]]))],
                            title=f"mean gate per task ({cfg.setting}, {cfg.disco.activation})", vmax=1.0, fmt="{:.2f}")
    write_json(os.path.join(out, "results.json"), res)
    metrics.draw_matrix(os.path.join(out, "accuracy.png"), metrics.accuracy_matrix(history["acc"], setting.tasks),
                        [f"stage {t + 1}" for t in range(len(history["acc"]))], setting.tasks,
                        title=f"{cfg.method} on {cfg.setting}, beta {cfg.beta}, seed {cfg.seed}")
    print_matrix(history["acc"], setting.tasks, log)
    log(f"Last {summary['last']:.2f}  Avg {summary['avg']:.2f}  mean forgetting {summary['mean_forgetting']:.2f}"
        + (f"  subspaces {history['subspaces']}" if history.get("subspaces") else ""))
    log(f"wrote {out}/results.json, accuracy.png ({wall:.0f}s)")
    return res


# ---------------------------------------------------------------------------- main
def main(argv=None, log=print):
    hf_logging.disable_progress_bar()                                  # our progress lines, not loading bars
    args = parse_args(argv)
    cfg = resolve(args)
    setting = get_setting(cfg.setting)
    out = args.out or os.path.join("runs", f"{cfg.setting}_{cfg.method}_b{cfg.beta:g}_s{cfg.seed}")
    os.makedirs(out, exist_ok=True)
    cfg_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
    write_json(os.path.join(out, "config.json"), cfg_json)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    root, base = prepare(cfg, log)
    # the release's own client partition when it ships one for this beta (results then compare with the paper's),
    # else our seeded Dirichlet partition
    data, parts = load_release(root, setting, beta=cfg.beta, num_clients=cfg.fed.num_clients,
                               rng=np.random.default_rng([cfg.seed, 1]), train_limit=cfg.train_limit,
                               test_limit=cfg.test_limit)
    if parts is None:
        parts = partition_setting(data, cfg.fed.num_clients, beta=cfg.beta, min_size=cfg.fed.min_size,
                                  rng=np.random.default_rng([cfg.seed, 2]))
    else:
        log(f"using the release's client partition for beta {cfg.beta:g} ({root}/partitioned_data)")
    save_partition(os.path.join(out, "partition.json"), parts)
    model, processor = build_model(base, cfg)
    strategy = make_strategy(cfg, model, processor, log)
    if cfg.method in ("zeroshot", "mtl"):
        if cfg.method == "mtl":                                       # one client holding every task's data
            everything = [e for td in data.values() for e in td.train]
            _, loss = local_train(model, processor, everything, gate=None, rng=np.random.default_rng([cfg.seed, 3]),
                                  cfg=dataclasses.replace(cfg.fed, local_epochs=cfg.mtl_epochs))
            log(f"mtl: trained on {len(everything)} examples, mean loss {loss:.3f}")
        acc, acc_d, _ = evaluate_tasks(model, processor, data, setting.tasks, strategy, cfg.fed)
        history = {"acc": [acc], "acc_datasets": [acc_d], "gates": [], "subspaces": None}
    else:
        progress = None if args.fresh else restore(out, cfg_json, strategy, log)
        history = run_continual(model, processor, setting, data, parts, strategy, cfg.fed, seed=cfg.seed, log=log,
                                progress=progress, on_round=checkpoint(out, cfg_json))
    return write_results(out, cfg, setting, history, time.time() - t0, log)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
