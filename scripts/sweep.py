"""The comparison of FCIT (arXiv:2503.12897, Table 1) in one command: every method on every setting at the same
budget (train.py's defaults: the same total LoRA rank, rounds, clients and data), then the table.

    python -m scripts.sweep                                   # 8 methods x 4 settings, beta 1.0, seed 0
    python -m scripts.sweep --betas 0.5 1.0 5.0 --seeds 0 1 2 # the paper's three betas, mean +- std over seeds
    python -m scripts.sweep --table-only                      # rebuild runs/table.md and table.png from finished runs
    python -m scripts.sweep --methods finetune disco -- --rounds 5   # flags after -- go to every train.py run

Each run writes runs/<setting>_<method>_b<beta>_s<seed>/ (train.py's default folder). A run whose results.json
exists is skipped, so a sweep that was interrupted resumes where it stopped; a run interrupted mid-stage resumes
from its own checkpoint. A run that fails is reported and the sweep goes on. The table is runs/table.md (Last / Avg,
mean +- std over seeds, the paper's layout) and runs/table.png (Last as a heatmap), one section per beta.
Tests: python -m pytest -q tests/test_sweep.py
"""
import argparse
import json
import os
import sys
import traceback

import numpy as np

import train
from config.run import STRATEGIES
from storage.results import draw_matrix

METHODS = ["zeroshot", "mtl", "finetune", "ewc", "lwf", "olora", "moelora", "disco"]  # the paper's row order
SETTINGS = ["task-hom", "task-het", "cap-hom", "cap-het"]
# fcit-paper-notes.md, 3: task-related, beta 1.0, LLaVA-1.5-7B; (Last, Avg), None where the paper gives none
PAPER = {("zeroshot", "task-hom"): (29.08, None), ("mtl", "task-hom"): (66.60, None),
         ("finetune", "task-hom"): (47.20, 68.79), ("finetune", "task-het"): (57.96, 54.22),
         ("ewc", "task-hom"): (47.92, 69.22), ("olora", "task-hom"): (49.87, 70.26),
         ("olora", "task-het"): (59.74, 55.20), ("moelora", "task-hom"): (49.02, 70.65),
         ("moelora", "task-het"): (59.14, 54.69), ("disco", "task-hom"): (56.22, 73.03),
         ("disco", "task-het"): (63.25, 61.99)}


def run_dir(root, setting, method, beta, seed):
    return os.path.join(root, f"{setting}_{method}_b{beta:g}_s{seed}")


def read_results(path):
    """results.json of a finished run, or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e}); delete the file to rerun that run") from None


# ---------------------------------------------------------------------------- running
def sweep(*, root, methods, settings, betas, seeds, extra, log=print):
    """Run every missing (beta, seed, setting, method); returns the runs that failed."""
    failed, grid = [], [(b, s, st, m) for b in betas for s in seeds for st in settings for m in methods]
    for i, (beta, seed, setting, method) in enumerate(grid):
        out = run_dir(root, setting, method, beta, seed)
        if read_results(os.path.join(out, "results.json")) is not None:
            log(f"[{i + 1}/{len(grid)}] {out}: done already, skipped")
            continue
        log(f"[{i + 1}/{len(grid)}] {out}: running")
        argv = ["--setting", setting, "--method", method, "--beta", str(beta), "--seed", str(seed), "--out", out]
        try:
            train.main(argv + extra, log=lambda *a: None)
        except Exception:                                  # one broken run must not cost the others
            failed.append(out)
            log(f"{out}: FAILED\n{traceback.format_exc()}")
    return failed


# ---------------------------------------------------------------------------- the table
def collect(root, *, methods, settings, beta, seeds):
    """{(method, setting): [results.json of each seed found]}."""
    found = {}
    for m in methods:
        for st in settings:
            runs = [read_results(os.path.join(run_dir(root, st, m, beta, s), "results.json")) for s in seeds]
            found[(m, st)] = [r for r in runs if r is not None]
    return found


def cell(values):
    """'mean' for one seed, 'mean +- std (n seeds)' for several (population std), '-' for none: a table of a
    sweep still running mixes cells of one seed and of three, and says which is which."""
    if not values:
        return "-"
    return f"{np.mean(values):.2f}" + (f" +- {np.std(values):.2f} ({len(values)})" if len(values) > 1 else "")


def table_markdown(found, *, methods, settings, beta, seeds):
    """The paper's layout: one row per method, Last and Avg per setting, mean +- std over the seeds found."""
    head = "| method | " + " | ".join(f"{s} Last | {s} Avg" for s in settings) + " |"
    lines = [f"### beta = {beta:g}, seeds {', '.join(map(str, seeds))}", "", head,
             "|---|" + "---|---|" * len(settings)]
    for m in methods:
        row = []
        for st in settings:
            runs = found[(m, st)]
            row += [cell([r["last"] for r in runs]), cell([r["avg"] for r in runs])]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def paper_markdown(methods):
    lines = ["Paper (task-related, beta 1.0, LLaVA-1.5-7B; fcit-paper-notes.md, 3):", "",
             "| method | task-hom Last | task-hom Avg | task-het Last | task-het Avg |", "|---|---|---|---|---|"]
    for m in methods:
        vals = [PAPER.get((m, s), (None, None)) for s in ("task-hom", "task-het")]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for pair in vals for v in pair) + " |")
    return "\n".join(lines)


def write_table(root, *, methods, settings, betas, seeds, log=print):
    """runs/table.md and runs/table.png (one block per beta) from whatever runs are finished."""
    sections, images = [], []
    for beta in betas:
        found = collect(root, methods=methods, settings=settings, beta=beta, seeds=seeds)
        sections.append(table_markdown(found, methods=methods, settings=settings, beta=beta, seeds=seeds))
        last = np.array([[np.mean([r["last"] for r in found[(m, st)]]) if found[(m, st)] else np.nan
                          for st in settings] for m in methods])                              # (methods, settings)
        png = os.path.join(root, "table.png" if len(betas) == 1 else f"table_b{beta:g}.png")
        draw_matrix(png, last, methods, settings, title=f"Last (%), beta {beta:g}, mean over seeds")
        images.append(png)
    text = "\n\n".join(sections + [paper_markdown(methods)]) + "\n"
    path = os.path.join(root, "table.md")
    with open(path, "w") as f:
        f.write(text)
    log(text)
    log(f"wrote {path}, {', '.join(images)}")
    return path


def main(argv=None, log=print):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--betas", nargs="+", type=float, default=[1.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--root", default="runs", help="folder of the runs and the table")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    a = ap.parse_args(argv)
    for m in a.methods:
        if m not in STRATEGIES:
            raise ValueError(f"--methods: {m!r} is unknown; choose from {', '.join(STRATEGIES)}")
    for s in a.settings:
        train.get_setting(s)                                       # raises with the choices
    os.makedirs(a.root, exist_ok=True)
    failed = [] if a.table_only else sweep(root=a.root, methods=a.methods, settings=a.settings, betas=a.betas,
                                           seeds=a.seeds, extra=extra, log=log)
    write_table(a.root, methods=a.methods, settings=a.settings, betas=a.betas, seeds=a.seeds, log=log)
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix and run the same command again")
    return failed


if __name__ == "__main__":
    try:
        sys.exit(1 if main() else 0)
    except ValueError as e:
        sys.exit(f"error: {e}")
