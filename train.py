"""Run one FCIT experiment end to end: data -> base model -> LoRA -> federated continual training -> results.

    python train.py --setting task-hom                       # DISCO on the embedded benchmark (minutes, CPU)
    python train.py --setting task-het --method finetune --beta 0.5 --seed 1
    python train.py --data ROOT --model LLAVA --text-encoder CLIP --preset paper --device cuda   # the real benchmark
    torchrun --standalone --nproc-per-node 2 train.py --setting task-hom   # a round's clients over 2 processes
    torchrun --nproc-per-node 5 train.py ... --device cuda --parallel balanced   # every batch over 5 GPUs

The path a reader follows: `resolve` (config/run.py) turns flags into one RunConfig (every default is a dataclass
field, the presets beside it), `prepare` finds the data and the base (the embedded benchmark and the tiny base, made
once into the cache, unless --data and --model are given), `build_model` wraps the base's FFN with the method's LoRA
layout, `make_harness` hands the model-specific pieces to the loop, and federated.run_continual trains stage after
stage. It writes OUT/results.json (accuracy matrix, Last, Avg, forgetting, the resolved config, and what the method
reports), OUT/accuracy.png, OUT/partition.json, OUT/config.json, OUT/checkpoint.* and, for DISCO,
OUT/activation.png. The checkpoint after every round lets an interrupted run continue where it stopped (run the same
command again; --fresh ignores it).
Methods: zeroshot (the base model), mtl (centralized multi-task upper bound), finetune and disco (federated.py), and
the baselines ewc, lwf, olora, moelora (baselines/). Servers (--server, baselines/server.py): fedavg, fedprox,
fedavgm, fedadagrad, fedadam, fedyogi. --aggregate is the method's choice unless given: ab for ewc and the last four
servers, which keep state in the coordinates of the LoRA factors (svd re-factors them every round), svd otherwise.
Under torchrun (parallel/world.py) every process runs main; rank 0 alone logs and writes.
Tests: python -m pytest tests/test_train.py tests/test_parallel.py
"""
import dataclasses
import functools
import json
import os
import sys
import time

import numpy as np
import torch
from transformers.utils import logging as hf_logging

import metrics
from baselines.server import ServerOptimizer
from config.run import STRATEGIES, RunConfig, lora_layout, parse_args, resolve
from data import (METRIC, check_images, get_setting, partition_lists, partition_setting, read_image, rules,
                  save_partition)
from embedded import benchmark, pretraining
from embedded.base import BaseConfig, pretrain_base, shipped, weights_sha256
from federated import Diverged, Harness, Progress, Solo, is_projector, local_train, run_continual, strip_prefix
from lora import LoRAConfig, add_lora, gated, split_factor
from model import (checkpoint_activations, clip_text_features, collate, expand_to_square, generate, image_features,
                   instruction_features, load_model, load_text_encoder, to_device)
from parallel.world import join
from release.partitions import load_release, release_setting
from storage.checkpoint import CHECKPOINT, Checkpoint, fingerprint, read_checkpoint, where, write_json
from storage.results import write_results


def cache_dir():
    return os.environ.get("FCIT_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "fcit"))


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
        if world.rank:
            return None
        return write_results(out, cfg, setting, history, strategy.report(history), time.time() - t0, log, inputs=inputs)
    progress, meta = None, (saved or ({}, {}))[1]
    if saved:
        strategy.load(saved[0])
        progress = Progress(meta["stage"], meta["round"], strip_prefix(saved[0], "global."), meta["history"])
        log(f"resuming from {out}/{CHECKPOINT}: {where(meta['stage'], meta['round'])} done")
    save = Checkpoint(out, identity, wall_before=meta.get("wall", 0.0),
                      done=(meta["stage"], meta["round"]) if saved else None)
    history = run_continual(model, harness, setting, data, parts, strategy, cfg.fed, seed=cfg.seed, log=log,
                            progress=progress, on_round=None if world.rank else save, world=world)
    if world.rank:
        return None
    return write_results(out, cfg, setting, history, strategy.report(history), save.wall(), log, inputs=inputs,
                         intact=save.intact)


if __name__ == "__main__":
    try:
        main()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except (ValueError, OSError, Diverged) as e:                     # FileNotFoundError is an OSError
        sys.exit(f"error: {e}")
