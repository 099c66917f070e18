"""Ask a trained run a question: its final model answers about an image, gated the way the method gates.

    python -m scripts.ask runs/task-hom_disco_b1_s0 --image cat.png --question "what object is depicted ?"

A finished run's folder is the trained model: checkpoint.safetensors holds every LoRA subspace, the projector and
the method's state (DISCO's global identity tokens), config.json the run's configuration, results.json the base's
folder and the sha256 of its weights (checked here, so a changed base is named instead of answering wrongly). The
question goes through the method's own gate (DISCO: SSA over its subspaces), and the gate is printed beside the
answer. Tests: python -m pytest -q tests/test_ask.py
"""
import argparse
import dataclasses
import json
import os

import torch

import train
from data import Example
from embedded.base import weights_sha256
from federated import load_client_state, strip_prefix
from storage.checkpoint import CHECKPOINT, checkpoint_meta


def run_config(d) -> train.RunConfig:
    """The RunConfig a config.json was written from (its nested configs rebuilt as their dataclasses)."""
    fields = {f.name: f for f in dataclasses.fields(train.RunConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"config.json: unknown field {unknown[0]!r} (written by another version of train.py?)")
    nested = {k: type(f.default_factory())(**d[k]) for k, f in fields.items()
              if f.default_factory is not dataclasses.MISSING and k in d}
    return train.RunConfig(**{**d, **nested})


def load_run(run_dir, log=lambda *a: None):
    """(model, processor, strategy, cfg) of a finished run: the base with the run's final LoRA subspaces and
    projector, and the method's strategy holding its final state (DISCO's token cache)."""
    for name in ("config.json", "results.json", CHECKPOINT):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"{run_dir}: no {name}; a finished run of train.py holds config.json, "
                                    f"results.json and {CHECKPOINT}")
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = run_config(json.load(f))
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    base = cfg.model or res["base"]
    if weights_sha256(base) != res["base_sha256"]:
        raise ValueError(f"{base}: its weights are not the ones {run_dir} was trained on (sha256 "
                         f"{res['base_sha256']} in results.json)")
    meta = checkpoint_meta(run_dir)
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(run_dir, CHECKPOINT))
    model, processor = train.build_model(base, cfg)
    load_client_state(model, strip_prefix(tensors, "global."))
    harness = train.make_harness(model, processor, {}, cfg, log)
    strategy = train.make_strategy(cfg, model, harness, log, detail=None)
    strategy.load(tensors)
    log(f"{run_dir}: {cfg.method} on {cfg.setting}, after stage {meta['stage']}")
    return model, processor, strategy, cfg


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a finished run's folder (train.py --out)")
    ap.add_argument("--image", required=True, help="an image file")
    ap.add_argument("--question", required=True)
    a = ap.parse_args(argv)
    if not os.path.isfile(a.image):
        raise SystemExit(f"--image {a.image}: no such file")
    model, processor, strategy, cfg = load_run(a.run, log)
    example = Example("ask", os.path.abspath(a.image), "<image>\n" + a.question, "")
    gate = strategy.eval_gate([example])                               # (1, K), or None: every subspace on
    with torch.no_grad():
        (text,) = train.answerer(model, processor, cfg)([example], gate)
    log(f"answer: {text}")
    if gate is not None:
        log("gate over subspaces: " + " ".join(f"{g:.2f}" for g in gate[0].tolist()))
    return text, None if gate is None else gate[0].tolist()


if __name__ == "__main__":
    main()
