"""The embedded FCIT benchmark: 12 small instruction datasets drawn with pillow, named after the 12 FCIT datasets.

Each dataset mimics its source's skill, question style, answer form and metric (fcit-paper-notes.md, 1.1). Every
image is a 32x32 `Scene`: ONE object (a shape, a die face of dots, a glyph, a bar or a line) on a background that
gives the dataset its look (black scenes, white plots with axes, beige icons, sky photos, colored book covers).
Why one object: measured on 2 cores, the tiny LLaVA learns what a single object is within ~150 pretraining steps,
but finding one object among several by its position or color ("what is at row 2 column 3", "the red one") stayed
at chance after 1,200 steps. Global and single-object perception is cheap; lookup and counting are not.

What differs between datasets is the instruction text (each has its own paraphrased templates: what DISCO's
identity tokens see), the attribute asked for, and the answer form (a class name, an option letter, a number, yes/no,
a box, a caption). CLEVR-Math and super-CLEVR share their image style on purpose (the paper's case for text
identity tokens). The base model learns to *describe* scenes (`embedded/pretraining.py`, none of the 12 datasets'
instructions or answer forms), so instruction tuning only has to learn each task's question and answer form.

    python -c "from embedded import benchmark; import numpy; print(benchmark.sample('CLEVR-Math', numpy.random.default_rng(0))[1:])"

`write_release(root, seed=, sizes=)` writes the official release layout (instructions/<Dataset>/{train,test}.json,
images under datasets/<Dataset>/). The objects' masks are drawn in embedded/draw.py.
Tests: python -m pytest -q tests/test_embedded.py
"""
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from embedded.draw import CELL, GLYPHS, GRID, SIZE, dots_mask, glyph_mask, line_mask, shape_mask, styled

VERSION = 11  # bump when the generated data changes: the data cache folder is keyed by it

# ---------------------------------------------------------------------------- the visual world
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230),
          "yellow": (225, 200, 30), "purple": (150, 60, 200), "cyan": (40, 190, 200)}
BACKGROUNDS = {"black": (25, 25, 25), "white": (245, 245, 245), "beige": (235, 225, 190), "sky": (120, 170, 220),
               **COLORS}                                            # colored backgrounds: book covers
INK = {"white": (235, 235, 235), "black": (20, 20, 20)}            # glyphs are written, not colored
SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
STYLES = ["solid", "hollow", "striped", "dotted"]                  # ImageNet-R's renditions
SPAN = {"small": 1, "big": 2, "huge": 4}                           # object width in cells
GENRES = {"red": "romance", "green": "travel", "blue": "science", "yellow": "cooking",
          "purple": "fantasy", "cyan": "history"}
MARKERS = ["red", "green", "blue", "purple"]                       # ArxivQA's options, in this order
RESEMBLES = {"green": "leaf", "purple": "grape", "red": "tomato", "yellow": "banana"}  # AOKVQA's, in this order
THINGS = {"circle": "balloon", "square": "box", "triangle": "sail", "cross": "plane", "diamond": "kite"}  # Flickr30k's
NAMES = ["tom", "ann", "bob", "eve"]
BOX = ["0.00", "0.25", "0.50", "0.75", "1.00"]
LETTERS = [c for c in GLYPHS if c.isalpha()]


@dataclass
class Scene:
    """One object on a background. Rendered by `render`, put into words by `describe`."""
    background: str                  # key of BACKGROUNDS
    kind: str                        # shape | dots | glyph | bar | line
    color: str                       # key of COLORS (or of INK for glyphs)
    size: str = "huge"               # small | big | huge: 1, 2 or 4 cells wide (shape, dots, glyph)
    row: int = 0                     # top-left cell of the object
    col: int = 0
    shape: str = "circle"            # kind shape
    style: str = "solid"             # kind shape
    count: int = 1                   # kind dots: 1..6, a die face
    char: str = "a"                  # kind glyph
    height: int = 1                  # kind bar: 1..8 units of 4 px, standing on the bottom edge in column `col`
    rising: bool = True              # kind line: from bottom left to top right
    offset: int = 0                  # kind line: its height above the bottom-left corner, px
    frame: str = "none"              # decoration: none | axes (plots) | table (TabMWP)

    @property
    def box(self):
        """[x1, y1, x2, y2] in cells, the object's bounding box on the 4x4 grid."""
        s = SPAN[self.size]
        return self.col, self.row, self.col + s, self.row + s


def pick(rng, items):
    return items[int(rng.integers(len(items)))]


def placed(rng, sizes=("small", "big")):
    """size, row, col of an object that fits the grid."""
    size = pick(rng, list(sizes))
    room = GRID - SPAN[size] + 1
    return dict(size=size, row=int(rng.integers(room)), col=int(rng.integers(room)))


def object_color(rng, background):
    return pick(rng, [c for c in COLORS if c != background])


# ---------------------------------------------------------------------------- the splits' variation
# Why: with one object on a 4x4 grid, a dataset has a few hundred distinct scenes, so a re-draw of the training
# distribution repeats training images (v9: 98-200 of 200 test records per dataset were copies of a training record).
# Every image is rendered with a `Look`: the object shifted by up to 1 px, and its color and the background shaded.
# Training shades each channel by -8..8; test shades are 10..18 away from the palette, so no test pixel of an object
# or background has a training value: every test image is one the training set never shows, and a score measures
# whether the skill (count, color, shape, box, ...) transfers to a new rendering, not whether an example was seen.
SHADE = {"train": (0, 8), "test": (10, 18)}      # |offset| per channel, inclusive


@dataclass
class Look:
    dx: int = 0                      # the object's shift, px (bars keep standing on the bottom edge: dy = 0)
    dy: int = 0
    shade: tuple = (0, 0, 0)         # added to the object's RGB
    tint: tuple = (0, 0, 0)          # added to the background's RGB


def offsets(rng, split):
    """An RGB offset whose every channel is lo..hi away from 0, of either sign."""
    lo, hi = SHADE[split]
    return tuple(int(v) for v in rng.integers(lo, hi + 1, 3) * rng.choice([-1, 1], 3))


def look(rng, split):
    """The random rendering of one image of `split` ("train" or "test")."""
    dx, dy = (int(v) for v in rng.integers(-1, 2, 2))
    return Look(dx, dy, offsets(rng, split), offsets(rng, split))


def shaded(rgb, offset):
    return np.clip(np.array(rgb, int) + offset, 0, 255).astype(np.uint8)


def shifted(canvas, dx, dy):
    """A boolean canvas moved by (dx, dy) px; what leaves the image is cut."""
    out = np.zeros_like(canvas)
    h, w = canvas.shape
    out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = canvas[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def render(s: Scene, lk: Look = Look()):
    """The scene as a 32x32 RGB image, rendered with the look `lk`."""
    a = np.zeros((SIZE, SIZE, 3), np.uint8)
    a[:] = shaded(BACKGROUNDS[s.background], lk.tint)
    rgb = shaded(COLORS[s.color] if s.color in COLORS else INK[s.color], lk.shade)
    span = SPAN[s.size]
    if s.kind == "shape":
        mask = styled(shape_mask(s.shape, span * CELL), s.style)
    elif s.kind in ("dots", "glyph"):                    # drawn on the 8x8 grid, scaled up by repeating pixels
        small = dots_mask(s.count) if s.kind == "dots" else glyph_mask(s.char)
        mask = np.kron(small, np.ones((span, span), bool))
    elif s.kind == "bar":
        mask = np.zeros((SIZE, CELL), bool)
        mask[SIZE - 4 * s.height:, 2:6] = True
    else:
        mask = line_mask(s.offset, s.rising)
    y, x = {"bar": (0, s.col * CELL), "line": (0, 0)}.get(s.kind, (s.row * CELL, s.col * CELL))
    canvas = np.zeros((SIZE, SIZE), bool)
    canvas[y:y + mask.shape[0], x:x + mask.shape[1]] = mask
    a[shifted(canvas, lk.dx, 0 if s.kind in ("bar", "line") else lk.dy)] = rgb
    img = Image.fromarray(a)
    if s.frame != "none":
        d = ImageDraw.Draw(img)
        if s.frame == "axes":                            # plots: a left and a bottom axis
            d.line((0, 0, 0, SIZE - 1), fill=(0, 0, 0))
            d.line((0, SIZE - 1, SIZE - 1, SIZE - 1), fill=(0, 0, 0))
        else:                                            # a two-column table row around cells (1, 1)-(1, 2)
            d.rectangle((CELL - 1, CELL - 1, 3 * CELL, 2 * CELL), outline=(0, 0, 0))
            d.line((2 * CELL - 1, CELL - 1, 2 * CELL - 1, 2 * CELL), fill=(0, 0, 0))
    return img


def at(s: Scene):
    return f"at row {s.row + 1} column {s.col + 1}"


def describe(s: Scene):
    """The scene in words: the generic image-text knowledge the base model is pretrained on."""
    where = "" if s.size == "huge" else " " + at(s)
    big = "" if s.size == "small" else s.size + " "
    if s.kind == "shape":
        style = "" if s.style == "solid" else s.style + " "
        return f"a {big}{style}{s.color} {s.shape}{where}"
    if s.kind == "dots":
        return f"{s.count} {big}{s.color} dot{'s' if s.count > 1 else ''}{where}"
    if s.kind == "glyph":
        return f"the {big}{'digit' if s.char.isdigit() else 'letter'} {s.char}{where}"
    if s.kind == "bar":
        return f"a {s.color} bar of height {s.height} in column {s.col + 1}"
    return f"a {s.color} line going {'up' if s.rising else 'down'}"


# ---------------------------------------------------------------------------- the 12 datasets
# Each returns (scene, question, answer, references); references is None except for the caption task.
def options(items):
    """Multiple choice in a fixed order per dataset: the letter is a function of the answer (a tiny model does not
    learn to look an answer up in the question's text); the answer form, an option letter, is ArxivQA's/AOKVQA's."""
    return " ".join(f"( {letter} ) {o}" for letter, o in zip("abcde", items))


def imagenet_r(rng):
    bg = pick(rng, ["black", "white", "beige"])
    s = Scene(bg, "shape", object_color(rng, bg), shape=pick(rng, SHAPES), style=pick(rng, STYLES))
    q = pick(rng, ["what object is depicted in this rendition ?", "classify the object shown in this rendition .",
                   "which category does this rendition belong to ?", "name the class of the object in this rendition ."])
    return s, q, s.shape, None


def arxivqa(rng):
    s = Scene("white", "shape", pick(rng, MARKERS), shape=pick(rng, SHAPES), frame="axes", **placed(rng))
    stem = pick(rng, ["which color are the markers in the scientific figure ?", "the figure in the paper plots its data "
                      "points in which color ?", "identify the color of the data points in this chart ."])
    return s, f"{stem} {options(MARKERS)} . answer with the option letter .", "abcd"[MARKERS.index(s.color)], None


def iconqa(rng):
    s = Scene("beige", "dots", object_color(rng, "beige"), count=int(rng.integers(1, 7)), **placed(rng))
    q = pick(rng, ["how many dots are on the icon ?", "count the dots of the icon .",
                   "what number of dots does this icon show ?", "the icon has how many dots ?"])
    return s, q, str(s.count), None


def clevr_math(rng):
    left, m = int(rng.integers(1, 5)), int(rng.integers(1, 3))        # 1..4 left (uniform: no likely answer)
    s = Scene("black", "dots", object_color(rng, "black"), count=left + m, **placed(rng))
    q = pick(rng, [f"subtract {m} of the dots . how many dots are left ?",
                   f"take away {m} dots from the group . how many remain ?",
                   f"if you remove {m} dots , how many dots are there ?"])
    return s, q, str(s.count - m), None


def ocr_vqa(rng):
    genre = pick(rng, list(GENRES))                                   # the cover's color tells the genre
    s = Scene(genre, "glyph", "white", char=pick(rng, LETTERS), **placed(rng, ("big", "huge")))
    q = pick(rng, ["what is the genre of this book ?", "what type of book is this ?",
                   "this book is of which genre ?", "this book cover belongs to which genre ?"])
    return s, q, GENRES[genre], None


def flickr30k(rng):
    """A photo of one thing in the sky, in one of the 4 quadrants. The caption names its color and what it is
    (THINGS: not the shape's word, which the base knows); four references of different wording. The position is not
    in the caption: CIDEr-D weighs an n-gram by how rare it is, and a 1-of-4 position word moved the score of a wrong
    caption by ~20 points where a wrong color or thing costs ~75 (measured with scripts/validity.py's checks)."""
    s = Scene("sky", "shape", object_color(rng, "sky"), shape=pick(rng, SHAPES), size="big",
              row=2 * int(rng.integers(2)), col=2 * int(rng.integers(2)))
    what = f"{s.color} {THINGS[s.shape]}"
    refs = [f"a {what} in the sky .", f"there is a {what} up in the air .", f"a photo of a {what} against the sky .",
            f"the sky with a {what} ."]
    q = pick(rng, ["describe the image briefly .", "write a short caption for this photo .",
                   "give a one sentence description of the picture .", "summarize this photo in one sentence ."])
    return s, q, refs[0], refs


def figureqa(rng):
    s = Scene("white", "line", object_color(rng, "white"), rising=bool(rng.integers(2)), frame="axes",
              offset=int(rng.integers(4, 9)))
    q = pick(rng, ["does the line in the figure go up from left to right ?", "is the line in this figure increasing ?",
                   "is the line in the figure rising ?", "in this figure , does the line trend upward ?"])
    return s, q, "yes" if s.rising else "no", None


def super_clevr(rng):
    kind = pick(rng, ["shape", "dots"])                               # the CLEVR-Math look: black scenes
    s = Scene("black", kind, object_color(rng, "black"), shape=pick(rng, SHAPES), count=int(rng.integers(2, 7)),
              **placed(rng, ("small", "big", "huge")))                # 3 sizes: "big" alone is not a likely answer
    if rng.integers(2):
        q = pick(rng, ["what is the color of the object in the scene ?", "there is an object ; what color is it ?"])
        return s, q, s.color, None
    q = pick(rng, ["is the object in the scene small , big or huge ?", "what size is the thing in the scene ?"])
    return s, q, s.size, None


def aokvqa(rng):
    s = Scene("sky", "shape", pick(rng, list(RESEMBLES)), shape=pick(rng, SHAPES), **placed(rng))
    items = list(RESEMBLES.values())                                  # other letters than ArxivQA's for one color
    stem = pick(rng, ["which everyday item could the object be ?", "using common sense , what could the object be ?",
                      "in daily life , the object looks like which thing ?"])
    answer = "abcd"[items.index(RESEMBLES[s.color])]
    return s, f"{stem} {options(items)} . answer with the option letter .", answer, None


def grounding(rng):
    s = Scene("sky", "shape", object_color(rng, "sky"), shape=pick(rng, SHAPES), size="big",
              row=2 * int(rng.integers(2)), col=2 * int(rng.integers(2)))  # one of the 4 quadrants, as Flickr30k's
    q = pick(rng, [f"please give the bounding box of the {s.color} {s.shape} .",
                   f"locate the {s.color} {s.shape} and output its box .",
                   f"provide the coordinates of the {s.color} {s.shape} .", f"find the region of the {s.color} {s.shape} ."])
    return s, q, "[" + ", ".join(BOX[v] for v in s.box) + "]", None


def dvqa(rng):
    s = Scene("white", "bar", object_color(rng, "white"), col=int(rng.integers(GRID)), height=int(rng.integers(1, 9)),
              frame="axes")
    q = pick(rng, ["what is the value of the bar ?", "in the bar chart , what value does the bar show ?",
                   "read the value of the bar .", "how high is the bar in the chart ?"])
    return s, q, str(s.height), None                                  # 1..8: no answer inside another


def tabmwp(rng):
    s = Scene("white", "dots", "black", size="small", row=1, col=2, count=int(rng.integers(1, 7)), frame="table")
    name, m = pick(rng, NAMES), int(rng.integers(1, 4))               # a pictograph table: one dot per dollar
    q = pick(rng, [f"{name} has {m} dollars and earns the price in the table . how many dollars does {name} have now ?",
                   f"look at the table . {name} starts with {m} dollars and gets the listed amount . what is the total ?",
                   f"according to the table , if {name} had {m} dollars and was paid the price , how much money is there ?"])
    return s, q, str(m + s.count), None


DATASETS = {"ImageNet-R": imagenet_r, "ArxivQA": arxivqa, "IconQA": iconqa, "CLEVR-Math": clevr_math,
            "OCR-VQA": ocr_vqa, "Flickr30k": flickr30k, "FigureQA": figureqa, "super-CLEVR": super_clevr,
            "AOKVQA": aokvqa, "Grounding": grounding, "DVQA": dvqa, "TabMWP": tabmwp}


def sample(dataset, rng, split="train"):
    """One (image, question, answer, references) of a dataset, rendered with a look of `split`."""
    scene, q, a, refs = DATASETS[dataset](rng)
    return render(scene, look(rng, split)), q, a, refs


# ---------------------------------------------------------------------------- the release layout
# The scoring rules the release declares (rules.json; data.rules reads it): the official rule of every dataset but
# Flickr30k's. CIDEr-D x 100 clipped at 100 gave any caption-like output 100 here (four templated references per
# image: the base's description, a caption of the wrong color, one caption for all images); "caption-relative"
# scores a caption by its CIDEr-D over the CIDEr-D of the image's first reference (metrics.task_score).
RULES = {"Flickr30k": "caption-relative"}


def key(img, question):
    """What makes two records the same example: the image's pixels and the question."""
    return hashlib.sha256(np.asarray(img).tobytes() + question.encode()).hexdigest()


@dataclass
class Sizes:
    train: int = 2000   # examples per dataset: ~40 per client with 50 clients
    test: int = 200     # examples per dataset evaluated after each stage


def write_release(root, *, seed, sizes=Sizes()):
    """Write the 12 datasets in the official FCIT release layout under root (skipped if already complete):
    instructions/<Dataset>/{train,test}.json + datasets/<Dataset>/{train,test}/<i>.png"""
    done = os.path.join(root, "COMPLETE")
    if os.path.exists(done):
        return root
    for k, name in enumerate(DATASETS):
        rng = np.random.default_rng([seed, k])
        os.makedirs(os.path.join(root, "instructions", name), exist_ok=True)
        seen = set()                                                  # the training examples' keys
        for split, n in (("train", sizes.train), ("test", sizes.test)):
            os.makedirs(os.path.join(root, "datasets", name, split), exist_ok=True)
            records = []
            for i in range(n):
                img, q, a, refs = sample(name, rng, split)
                while split == "test" and key(img, q) in seen:        # held out by construction (SHADE); guarded
                    img, q, a, refs = sample(name, rng, split)
                if split == "train":
                    seen.add(key(img, q))
                rel = f"{name}/{split}/{i:05d}.png"
                img.save(os.path.join(root, "datasets", rel))
                rec = {"id": f"{name}-{split}-{i}", "image": rel,
                       "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
                if refs and split == "test":
                    rec["references"] = refs
                records.append(rec)
            with open(os.path.join(root, "instructions", name, f"{split}.json"), "w") as f:
                json.dump(records, f)
    with open(os.path.join(root, "rules.json"), "w") as f:
        json.dump(RULES, f)
    with open(done, "w") as f:
        json.dump({"seed": seed, "train": sizes.train, "test": sizes.test}, f)
    return root
