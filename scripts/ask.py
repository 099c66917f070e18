"""Ask a trained run a question: its final model answers about an image, gated the way the method gates.

    python -m scripts.ask runs/task-hom_disco_b1_s0 --image cat.png --question "what object is depicted ?"
    python -m scripts.ask runs/task-hom_disco_b1_s0 --gates      # where a gated method forgets: each task's test
                                                                 # score under its SSA gate, the one-hot argmax
                                                                 # gate, and its own subspaces only

A finished run's folder is the trained model: checkpoint.safetensors holds every LoRA subspace, the projector and
the method's state (DISCO's global identity tokens), config.json the run's configuration, results.json the base's
folder and the sha256 of its weights (checked here, so a changed base is named instead of answering wrongly). The
question goes through the method's own gate (DISCO: SSA over its subspaces), and the gate is printed beside the
answer. --gates separates the two causes of a gated method's forgetting: a gate that leaks mass to other tasks'
subspaces (own-subspace score above the softmax score) and what every task shares, the projector (own-subspace
score below the score the task had when it was learned). Tests: python -m pytest -q tests/test_ask.py
"""
import argparse
import dataclasses
import json
import os

import numpy as np
import torch

import metrics
import train
from data import Example, rules
from embedded.base import weights_sha256
from federated import load_client_state, strip_prefix
from storage.checkpoint import CHECKPOINT, read_checkpoint


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
    tensors, meta = read_checkpoint(run_dir, {})                      # one read: tensors and progress
    model, processor = train.build_model(base, cfg)
    load_client_state(model, strip_prefix(tensors, "global."))
    harness = train.make_harness(model, processor, {}, cfg, log)
    strategy = train.make_strategy(cfg, model, harness, log, detail=None)
    strategy.load(tensors)
    log(f"{run_dir}: {cfg.method} on {cfg.setting}, after stage {meta['stage']}")
    return model, processor, strategy, cfg


def gate_scores(run_dir, log=print):
    """{task: {"softmax": s, "argmax": s, "own": s, "learned": s}}: each seen task's test score after the last
    stage under the method's gate, the one-hot gate on its argmax, and a gate spread evenly over the subspaces the
    task's own clients trained (results.json's routes); learned = its score after the stage that taught it."""
    model, processor, strategy, cfg = load_run(run_dir, log)
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    if "routes" not in res:
        raise ValueError(f"{run_dir}: --gates needs a gated method's run (results.json has no routes)")
    root, _ = train.prepare(cfg, lambda *a: None)
    setting, data, _ = train.load_data(cfg, root)
    lengths = metrics.answer_lengths(data, processor.tokenizer, cfg.fed.max_new_tokens)   # as the run evaluated
    scoring, answer = rules(root, metrics.RULES), train.answerer(model, processor, cfg, lengths)
    out = {}
    for t, task in enumerate(setting.tasks):
        K, own = train.lora_layout(cfg)[0], res["routes"][task]
        scores = {"softmax": [], "argmax": [], "own": []}
        for dataset, examples in data[task].test.items():
            soft = strategy.eval_gate(examples)                                              # (N, K)
            gates = {"softmax": soft, "argmax": torch.nn.functional.one_hot(soft.argmax(-1), K).float(),
                     "own": torch.zeros_like(soft).index_fill_(1, torch.tensor(own), 1.0 / len(own))}
            for name, g in gates.items():
                rows = {id(e): i for i, e in enumerate(examples)}
                s, _, _ = metrics.evaluate_dataset(answer, lambda chunk, g=g, rows=rows: g[[rows[id(e)] for e in chunk]],
                                                   scoring.get(dataset, "exact"), examples, batch=cfg.fed.eval_batch)
                scores[name].append(s)
        out[task] = {k: round(float(np.mean(v)), 2) for k, v in scores.items()}
        out[task]["learned"] = res["acc"][t][task] if cfg.setting.endswith("hom") else None
        log(f"{task:>12}: softmax {out[task]['softmax']:5.1f}  argmax {out[task]['argmax']:5.1f}  own subspaces "
            f"{own} {out[task]['own']:5.1f}" + (f"  (learned: {out[task]['learned']:.1f})" if out[task]["learned"]
                                                is not None else ""))
    return out


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a finished run's folder (train.py --out)")
    ap.add_argument("--image", help="an image file")
    ap.add_argument("--question")
    ap.add_argument("--gates", action="store_true", help="each task's test score under three gates (see above)")
    a = ap.parse_args(argv)
    if a.gates:
        return gate_scores(a.run, log)
    if not (a.image and a.question):
        raise SystemExit("give --image and --question (or --gates)")
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
