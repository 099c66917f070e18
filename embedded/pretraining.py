"""The tiny base's pretraining data: what LLaVA's alignment stage is to LLaVA-1.5, for the embedded benchmark.

Like LLaVA's alignment data, the mixture says what is in an image, in every image style of the benchmark
(`benchmark.render`), but holds none of the 12 datasets' instructions or answer forms (no yes/no, option letters,
boxes, captions, arithmetic), so zero-shot stays low and instruction tuning has something to build on. `corpus` is
every text the benchmark can produce: the tiny tokenizer's vocabulary (embedded/base.py) is built from it.

    python -c "from embedded import pretraining; print(pretraining.pretraining_mixture(3, seed=0))"

Tests: python -m pytest -q tests/test_embedded.py (the mixture holds no task instruction)
"""
from dataclasses import replace

import numpy as np

from embedded.benchmark import (BACKGROUNDS, BOX, COLORS, DATASETS, GENRES, INK, NAMES, RESEMBLES, SHAPES, SPAN,
                                STYLES, Scene, describe, look, pick, placed, render)
from embedded.draw import GLYPHS, GRID

BASE_VERSION = 8  # bump when the pretraining mixture or the vocabulary changes: the base cache folder is keyed by it


# ---------------------------------------------------------------------------- the mixture
def random_scene(rng):
    """Any object of any kind on any background (the pretraining distribution)."""
    bg = pick(rng, list(BACKGROUNDS))
    kind = pick(rng, ["shape", "shape", "shape", "dots", "dots", "glyph", "bar", "line"])
    frame = pick(rng, ["none", "none", "axes", "table"]) if kind in ("shape", "dots", "glyph") else "axes"
    color = pick(rng, list(INK)) if kind == "glyph" else pick(rng, [c for c in [*COLORS, *INK] if c != bg])
    return Scene(bg, kind, color, shape=pick(rng, SHAPES), style=pick(rng, STYLES), count=int(rng.integers(1, 7)),
                 char=pick(rng, list(GLYPHS)), height=int(rng.integers(1, 9)), rising=bool(rng.integers(2)),
                 frame=frame, **placed(rng, ("small", "big", "huge")))


DESCRIBE = ["describe the image .", "what is in this image ?", "what do you see ?", "tell me about this picture .",
            "explain what this image contains .", "what can be seen here ?", "look at the image and describe it .",
            "please describe what is shown ."]


def pretraining_example(rng, words):
    """One generic (image, question, answer): a description (60%), the object's name (15%), the background (10%),
    or copying words of the vocabulary (15%). Copying is the 'knows language' part: a LLaVA's LM has read every word
    and can write every word, but LoRA freezes the embeddings and the output layer, so a word the base never saw
    would stay random there. Measured: with copying, LoRA learned OCR-VQA's genre words in one epoch (100%); without
    it, 14%. Naming the object lets LoRA learn ImageNet-R's shape classes (85% in one epoch vs 35%)."""
    s = random_scene(rng)
    if s.kind == "bar":                                               # bars stand in any of the 4 columns
        s = replace(s, col=int(rng.integers(GRID)))
    img = render(replace(s, offset=int(rng.integers(4, 9))), look(rng, "train"))
    u = rng.random()
    if u < 0.15:
        text = " ".join(pick(rng, words) for _ in range(int(rng.integers(1, 5))))
        return img, f"repeat after me : {text}", text
    if u < 0.25:
        return img, pick(rng, ["what is the background color ?", "name the color of the background ."]), s.background
    if u < 0.4:                                                       # the object's name alone (shapes need it)
        noun = {"shape": s.shape, "dots": "dots", "glyph": "letter" if s.char.isalpha() else "digit"}.get(s.kind, s.kind)
        return img, pick(rng, ["name the object .", "what is this thing called ?"]), noun
    return img, pick(rng, DESCRIBE), describe(s)


def pretraining_mixture(n, seed):
    """n generic (image, question, answer) triples, deterministic for a seed."""
    words = sorted({w for t in corpus_words(seed) for w in t.split()})
    rng = np.random.default_rng([seed, 1000])
    return [pretraining_example(rng, words) for _ in range(n)]


# ---------------------------------------------------------------------------- the vocabulary
VOCAB_EXTRA = ([str(i) for i in range(100)] + BOX + list(GLYPHS) + list(GENRES.values()) + NAMES
               + list(RESEMBLES.values()) + list(BACKGROUNDS) + list(INK) + SHAPES + STYLES + list(SPAN)
               + ["yes", "no", "up", "down", "digit", "letter", "dot", "dots", "bar", "line"])


def corpus_words(seed, per_dataset=300):
    """Every text the 12 datasets and the descriptions can produce (the benchmark's language)."""
    rng = np.random.default_rng([seed, 2000])
    texts = [" ".join(VOCAB_EXTRA), " ".join(DESCRIBE)]
    for name in DATASETS:
        for _ in range(per_dataset):
            _, q, a, refs = DATASETS[name](rng)
            texts += [q, a] + (refs or [])
    return texts + [describe(random_scene(rng)) for _ in range(2000)]


def corpus(seed):
    """Every text the benchmark can produce, pretraining included: the tokenizer's vocabulary is built from it."""
    return corpus_words(seed) + ["repeat after me :"]
