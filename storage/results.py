"""What a finished run writes: results.json (the accuracy matrix, Last, Avg, forgetting, the resolved config, what the
method reports and what the numbers were measured on), accuracy.png and, for a gated method, activation.png, each
written atomically (storage/checkpoint.py), and the matrix and the paper's two numbers printed.

    res = write_results(out, cfg, setting, history, report, wall, log, inputs=inputs)   # train.main, at the end
Tests: python -m pytest -q tests/test_train.py
"""
import dataclasses
import os

import numpy as np

import metrics
from storage.checkpoint import CHECKPOINT, atomic, write_json


def print_matrix(acc, tasks, log):
    log("accuracy matrix (rows: after stage t; columns: tasks; '-' = not seen yet)")
    log("stage " + " ".join(f"{t[:11]:>11}" for t in tasks))
    for t, row in enumerate(acc):
        log(f"{t + 1:5d} " + " ".join(f"{row[k]:11.1f}" if k in row else f"{'-':>11}" for k in tasks))


def write_results(out, cfg, setting, history, report, wall, log, *, inputs, intact=""):
    """results.json, accuracy.png and, for a gated method, activation.png, each written atomically. inputs: what the
    numbers were measured on (the base's path and weights' sha256, the scoring rules)."""
    summary = metrics.summarize(history["acc"])
    res = {"setting": cfg.setting, "method": cfg.method, "beta": cfg.beta, "seed": cfg.seed, "tasks": setting.tasks,
           "acc": history["acc"], "acc_datasets": history["acc_datasets"], **summary,
           "subspaces": history.get("subspaces") or None, "wall_seconds": round(wall, 1),
           "config": dataclasses.asdict(cfg), **inputs, **report}
    written = ["results.json", "accuracy.png"]
    if "gates" in report:                                              # a gated method: its gate per task and subspace
        rows = [t for t in setting.tasks if t in report["gates"]]
        atomic(os.path.join(out, "activation.png"), lambda tmp: metrics.draw_matrix(
            tmp, np.array([report["gates"][t] for t in rows]), rows,
            [f"subspace {k}" for k in range(len(report["gates"][rows[0]]))],
            title=f"mean gate per task ({cfg.setting}, {cfg.disco.activation})", vmax=1.0, fmt="{:.2f}"), intact=intact)
        written.append("activation.png")
    write_json(os.path.join(out, "results.json"), res, intact=intact)
    atomic(os.path.join(out, "accuracy.png"), lambda tmp: metrics.draw_matrix(
        tmp, metrics.accuracy_matrix(history["acc"], setting.tasks), [f"stage {t + 1}" for t in range(len(history["acc"]))],
        setting.tasks, title=f"{cfg.method} on {cfg.setting}, beta {cfg.beta}, seed {cfg.seed}"), intact=intact)
    print_matrix(history["acc"], setting.tasks, log)
    log(f"Last {summary['last']:.2f}  Avg {summary['avg']:.2f}  mean forgetting {summary['mean_forgetting']:.2f}"
        + (f"  subspaces {history['subspaces']}" if history.get("subspaces") else ""))
    written += ["config.json", "partition.json"] + ([CHECKPOINT] if cfg.method not in ("zeroshot", "mtl") else [])
    log(f"wrote {out}/: {', '.join(written)} ({wall:.0f}s)")
    return res
