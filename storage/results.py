"""What a finished run writes: results.json (the accuracy matrix, Last, Avg, forgetting, the resolved config, what the
method reports and what the numbers were measured on), accuracy.png and, for a gated method, activation.png, each
written atomically (storage/checkpoint.py), and the matrix and the paper's two numbers printed; `draw_matrix`, the
heatmap both pictures are (and scripts/sweep.py's table of Last).

    res = write_results(out, cfg, setting, history, report, wall, log, inputs=inputs)   # train.main, at the end
Tests: python -m pytest -q tests/test_train.py tests/test_metrics.py
"""
import dataclasses
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
        atomic(os.path.join(out, "activation.png"), lambda tmp: draw_matrix(
            tmp, np.array([report["gates"][t] for t in rows]), rows,
            [f"subspace {k}" for k in range(len(report["gates"][rows[0]]))],
            title=f"mean gate per task ({cfg.setting}, {cfg.disco.activation})", vmax=1.0, fmt="{:.2f}"), intact=intact)
        written.append("activation.png")
    write_json(os.path.join(out, "results.json"), res, intact=intact)
    atomic(os.path.join(out, "accuracy.png"), lambda tmp: draw_matrix(
        tmp, metrics.accuracy_matrix(history["acc"], setting.tasks),
        [f"stage {t + 1}" for t in range(len(history["acc"]))],
        setting.tasks, title=f"{cfg.method} on {cfg.setting}, beta {cfg.beta}, seed {cfg.seed}"), intact=intact)
    print_matrix(history["acc"], setting.tasks, log)
    log(f"Last {summary['last']:.2f}  Avg {summary['avg']:.2f}  mean forgetting {summary['mean_forgetting']:.2f}"
        + (f"  subspaces {history['subspaces']}" if history.get("subspaces") else ""))
    written += ["config.json", "partition.json"] + ([CHECKPOINT] if cfg.method not in ("zeroshot", "mtl") else [])
    log(f"wrote {out}/: {', '.join(written)} ({wall:.0f}s)")
    return res


# ---------------------------------------------------------------------------- heatmaps drawn with pillow
CELL_W, CELL_H, PAD = 80, 28, 8  # pixels; 80 px fits "super-CLEVR" at 13 px, longer labels wrap or are cut
NAN_COLOR = (224, 224, 224)  # light gray: not evaluated
LOW, HIGH = np.array([255, 255, 255]), np.array([8, 69, 148])  # white -> blue


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)  # scalable font, pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # older pillow: the fixed bitmap font


def _fit(text: str, font, width: int) -> str:
    # cut a label to `width` pixels, marking the cut with a trailing "."
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + ".") > width:
        text = text[:-1]
    return text + "."


def _lines(text: str, font, width: int) -> list[str]:
    # one line if it fits; else two, split after the last "-" / space that lets the first part fit; else cut
    if font.getlength(text) <= width:
        return [text]
    for i in range(len(text) - 1, 0, -1):
        if text[i] in "- " and font.getlength(text[:i + 1].rstrip()) <= width:
            return [text[:i + 1].rstrip(), _fit(text[i + 1:].lstrip(), font, width)]
    return [_fit(text, font, width)]


def draw_matrix(path, values: np.ndarray, row_labels: list[str], col_labels: list[str], *, title: str,
                vmax: float = 100.0, fmt: str = "{:.1f}") -> None:
    """Write a heatmap PNG: one cell per value (white -> blue by value / vmax), the value printed in the cell,
    light gray for nan; row labels left, column labels on top (two lines or cut to fit), the title above."""
    values = np.asarray(values, dtype=float)  # (R, C)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"draw_matrix: values {values.shape} but {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    font, title_font = _font(13), _font(16)
    line_h = font.getbbox("Ag")[3] + 3
    rows = [_fit(s, font, 200) for s in row_labels]
    cols = [_lines(s, font, CELL_W - 2) for s in col_labels]
    left = PAD + max([int(font.getlength(s)) for s in rows] + [0]) + PAD
    title_h = title_font.getbbox(title or "A")[3] + 2 * PAD
    top = title_h + max([len(c) for c in cols] + [1]) * line_h + PAD
    width = max(left + CELL_W * len(cols) + PAD, int(title_font.getlength(title)) + 2 * PAD)
    height = top + CELL_H * len(rows) + PAD
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((PAD, PAD), title, fill="black", font=title_font)
    for c, lines in enumerate(cols):
        for i, line in enumerate(lines):
            x = left + c * CELL_W + (CELL_W - 2 - font.getlength(line)) / 2
            draw.text((x, top - PAD - (len(lines) - i) * line_h), line, fill="black", font=font)
    for r, label in enumerate(rows):
        y = top + r * CELL_H + (CELL_H - line_h) / 2
        draw.text((left - PAD - font.getlength(label), y), label, fill="black", font=font)
        for c in range(len(cols)):
            v = values[r, c]
            x0, y0 = left + c * CELL_W, top + r * CELL_H
            box = (x0, y0, x0 + CELL_W - 2, y0 + CELL_H - 2)  # a 2 px white grid between cells
            if np.isnan(v):
                draw.rectangle(box, fill=NAN_COLOR)
                continue
            frac = min(max(v / vmax, 0.0), 1.0) if vmax > 0 else 0.0
            draw.rectangle(box, fill=tuple(int(x) for x in np.round(LOW + frac * (HIGH - LOW))))
            text = fmt.format(v)
            draw.text((box[0] + (CELL_W - 2 - font.getlength(text)) / 2, y), text,
                      fill="white" if frac > 0.55 else "black", font=font)
    img.save(path)
