"""The embedded FCIT benchmark: 12 small instruction datasets drawn with pillow, named after the 12 FCIT datasets.

Each dataset mimics its source's skill, question style, answer form and metric (fcit-paper-notes.md, 1.1) on a
32x32 image cut into a 4x4 grid of 8x8 cells, one cell per vision patch. The planning measurements showed that a
tiny model learns *local* recognition in a minute but not counting, so every answer here is a function of one or
a few cells: which cell is found by position words ("top left corner"), by attributes ("the red bar"), or because
it holds the only object. What differs between datasets is the instruction text (every dataset has its own
paraphrased templates: what DISCO's identity tokens see) and the answer form; CLEVR-Math and super-CLEVR share
their image style on purpose (the paper's argument for text identity tokens).

    python -c "import synthetic; print(synthetic.sample('CLEVR-Math', __import__('numpy').random.default_rng(0)))"

`write_release(root, seed, sizes)` writes the official release layout (instructions/<Dataset>/{train,test}.json,
images under datasets/<Dataset>/); `pretraining_mixture` is the generic image-text data the base model learns
before instruction tuning (it contains none of the 12 datasets' instructions). Tests: tests/test_data.py.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

VERSION = 2  # bump when the generated data changes: cache folders are keyed by it

# ---------------------------------------------------------------------------- the visual world
CELL, GRID = 8, 4                      # 8x8 px cells, 4x4 grid -> a 32x32 image, one cell per vision patch
SIZE = CELL * GRID
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230),
          "yellow": (225, 200, 30), "purple": (150, 60, 200), "cyan": (40, 190, 200)}
SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
STYLES = ["solid", "hollow", "striped", "dotted"]          # ImageNet-R's renditions
CORNERS = {"top left": (0, 0), "top right": (0, 3), "bottom left": (3, 0), "bottom right": (3, 3)}
WORDS = ["cat", "dog", "sun", "map", "owl", "box", "sea", "fox", "hat", "pen", "cup", "bee",
         "ant", "egg", "ice", "jam", "key", "log", "net", "oak", "pig", "ram", "toy", "van"]
GENRES = {"red": "romance", "green": "travel", "blue": "science", "yellow": "cooking",
          "purple": "fantasy", "cyan": "history"}
LOOKS_LIKE = {"circle": "coin", "square": "window", "triangle": "tent", "cross": "bandage", "diamond": "kite"}
NAMES = ["tom", "ann", "bob", "eve"]
BOX = ["0.00", "0.25", "0.50", "0.75", "1.00"]
DARK, WHITE, BEIGE = (25, 25, 25), (245, 245, 245), (235, 225, 190)
# 3x5 bitmap glyphs for the OCR-like and table-like datasets (rows top to bottom)
GLYPHS = dict(zip("abcdefghijklmnopqrstuvwxyz0123456789", (
    "010101111101101 110101110101110 011100100100011 110101101101110 111100110100111 111100110100100 "
    "011100101101011 101101111101101 111010010010111 001001001101010 101101110101101 100100100100111 "
    "101111111101101 110101101101101 010101101101010 110101110100100 010101101110011 110101110101101 "
    "011100010001110 111010010010010 101101101101111 101101101101010 101101111111101 101101010101101 "
    "101101010010010 111001010100111 111101101101111 010110010010111 110001010100111 110001010001110 "
    "101101111001001 111100110001110 011100111101111 111001010010010 111101111101111 111101111001110").split()))


def new_image(background=DARK):
    return Image.new("RGB", (SIZE, SIZE), background)


def shape_mask(shape):
    """An 8x8 boolean mask of a shape, drawn once in a 1-bit image."""
    m = Image.new("1", (CELL, CELL), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse((1, 1, 6, 6), fill=1)
    elif shape == "square":
        d.rectangle((1, 1, 6, 6), fill=1)
    elif shape == "triangle":
        d.polygon([(3.5, 1), (6.5, 6.5), (0.5, 6.5)], fill=1)
    elif shape == "cross":
        d.rectangle((3, 1, 4, 6), fill=1)
        d.rectangle((1, 3, 6, 4), fill=1)
    elif shape == "diamond":
        d.polygon([(3.5, 0), (7, 3.5), (3.5, 7), (0, 3.5)], fill=1)
    return np.array(m, dtype=bool)


def styled(mask, style):
    """Renditions: the same class drawn solid, as an outline, striped or dotted."""
    yy, xx = np.mgrid[:CELL, :CELL]
    if style == "hollow":
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        return mask & ~inner
    if style == "striped":
        return mask & (yy % 2 == 0)
    if style == "dotted":
        return mask & ((yy + xx) % 2 == 0)
    return mask


def paint(img, cell, mask, color):
    """Paint a boolean 8x8 mask into grid cell (row, col)."""
    a = np.array(img)
    r, c = cell
    patch = a[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
    patch[mask] = color
    img.paste(Image.fromarray(a))


def glyph_mask(ch):
    m = np.zeros((CELL, CELL), bool)
    bits = np.array([int(b) for b in GLYPHS[ch]], bool).reshape(5, 3)
    m[1:6, 2:5] = bits
    return m


def dots_mask(n):
    """A die face of n dots (1..6), 2x2 px each: counting inside one cell is local recognition."""
    spots = {1: [4], 2: [0, 8], 3: [0, 4, 8], 4: [0, 2, 6, 8], 5: [0, 2, 4, 6, 8], 6: [0, 2, 3, 5, 6, 8]}[n]
    m = np.zeros((CELL, CELL), bool)
    for s in spots:
        y, x = 3 * (s // 3), 3 * (s % 3)
        m[y:y + 2, x:x + 2] = True
    return m


def bar_mask(height):
    m = np.zeros((CELL, CELL), bool)
    m[CELL - height:, 2:6] = True
    return m


def line_mask():
    m = np.zeros((CELL, CELL), bool)
    m[3:5, :] = True
    return m


def draw_axes(img):
    """Figure style: a left and a bottom axis."""
    d = ImageDraw.Draw(img)
    d.line((0, 0, 0, SIZE - 1), fill=(0, 0, 0))
    d.line((0, SIZE - 1, SIZE - 1, SIZE - 1), fill=(0, 0, 0))


def cells(rng, n, exclude=()):
    """n distinct random cells (row, col)."""
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in exclude]
    return [free[i] for i in rng.choice(len(free), n, replace=False)]


def pick(rng, items, n=None):
    if n is None:
        return items[rng.integers(len(items))]
    return [items[i] for i in rng.choice(len(items), n, replace=False)]


def objects(rng, n):
    """n objects with distinct colors and distinct shapes, so attribute words name exactly one."""
    return list(zip(pick(rng, list(COLORS), n), pick(rng, SHAPES, n)))


def scene(rng, n, background=DARK, extra=()):
    """A CLEVR-like scene: n objects on random free cells. Returns (img, [(color, shape, cell)])."""
    img = new_image(background)
    placed = [(c, s, cell) for (c, s), cell in zip(objects(rng, n), cells(rng, n, exclude=extra))]
    for color, shape, cell in placed:
        paint(img, cell, shape_mask(shape), COLORS[color])
    return img, placed


def options(rng, correct, pool):
    """Multiple choice: 4 options in random order. Returns ('( a ) x ( b ) y ...', letter)."""
    opts = [correct] + pick(rng, [p for p in pool if p != correct], 3)
    opts = [opts[i] for i in rng.permutation(4)]
    text = " ".join(f"( {l} ) {o}" for l, o in zip("abcd", opts))
    return text, "abcd"[opts.index(correct)]


# ---------------------------------------------------------------------------- the 12 datasets
# Each returns (image, question, answer, references); references is None except for the caption task.

def imagenet_r(rng):
    img = new_image(pick(rng, [DARK, WHITE, BEIGE]))
    color, shape, style = pick(rng, list(COLORS)), pick(rng, SHAPES), pick(rng, STYLES)
    paint(img, cells(rng, 1)[0], styled(shape_mask(shape), style), COLORS[color])
    q = pick(rng, ["what object is depicted in this rendition ?", "classify the object shown in this artwork .",
                   "which category does this drawing belong to ?", "name the class of the object in this sketch ."])
    return img, q, shape, None


def arxivqa(rng):
    img = new_image(WHITE)
    draw_axes(img)
    color, shape = pick(rng, list(COLORS)), pick(rng, SHAPES)
    paint(img, cells(rng, 1)[0], shape_mask(shape), COLORS[color])
    opts, letter = options(rng, shape, SHAPES)
    stem = pick(rng, ["which marker is plotted in the scientific figure ?", "the figure in the paper uses which marker ?",
                      "identify the marker symbol of the plotted data .", "what symbol marks the data points in this figure ?"])
    return img, f"{stem} {opts} . answer with the option letter .", letter, None


def iconqa(rng):
    img = new_image(BEIGE)
    icons = dict(zip(CORNERS, objects(rng, 4)))                      # corner -> (color, shape)
    for corner, (color, shape) in icons.items():
        paint(img, CORNERS[corner], shape_mask(shape), COLORS[color])
    corner = pick(rng, list(CORNERS))
    q = pick(rng, [f"what icon appears in the {corner} corner ?", f"look at the {corner} corner . which icon is there ?",
                   f"identify the icon at the {corner} .", f"the {corner} corner shows which icon ?"])
    return img, q, icons[corner][1], None


def clevr_math(rng):
    n = int(rng.integers(2, 7))
    img, placed = scene(rng, int(rng.integers(1, 3)))
    color = pick(rng, [c for c in COLORS if c not in {p[0] for p in placed}])
    free = cells(rng, 1, exclude=[p[2] for p in placed])[0]
    paint(img, free, dots_mask(n), COLORS[color])
    m = int(rng.integers(1, n))
    q = pick(rng, [f"subtract {m} {color} dots . how many {color} dots are left ?",
                   f"take away {m} of the {color} dots . how many remain ?",
                   f"if you remove {m} {color} dots , how many {color} dots are there ?",
                   f"{color} dots minus {m} equals what number ?"])
    return img, q, str(n - m), None


def ocr_vqa(rng):
    genre_color = pick(rng, list(GENRES))
    img = new_image(COLORS[genre_color])
    title, author = pick(rng, WORDS, 2)
    for row, word in ((1, title), (3, author)):
        for i, ch in enumerate(word):
            paint(img, (row, 1 + i), glyph_mask(ch), WHITE)
    kind = pick(rng, ["title", "author", "genre"])
    q = {"title": pick(rng, ["what is the title of this book ?", "what is this book called ?"]),
         "author": pick(rng, ["who wrote this book ?", "who is the author of this book ?"]),
         "genre": pick(rng, ["what is the genre of this book ?", "what type of book is this ?"])}[kind]
    return img, q, {"title": title, "author": author, "genre": GENRES[genre_color]}[kind], None


def flickr30k(rng):
    img, placed = scene(rng, 2, background=(120, 170, 220))
    placed.sort(key=lambda p: p[2])                                   # raster order: the caption reads top-down
    (c1, s1, _), (c2, s2, _) = placed
    refs = [f"a {c1} {s1} and a {c2} {s2} .", f"there is a {c1} {s1} and a {c2} {s2} .",
            f"a {c1} {s1} next to a {c2} {s2} .", f"a photo of a {c1} {s1} and a {c2} {s2} ."]
    q = pick(rng, ["describe the image briefly .", "write a short caption for this photo .",
                   "give a one sentence description of the picture .", "summarize this photo in one sentence ."])
    return img, q, refs[0], refs


def figureqa(rng):
    img = new_image(WHITE)
    draw_axes(img)
    present = pick(rng, list(COLORS), int(rng.integers(1, 4)))
    for color, cell in zip(present, cells(rng, len(present))):
        paint(img, cell, line_mask(), COLORS[color])
    yes = bool(rng.integers(2))
    color = pick(rng, present) if yes else pick(rng, [c for c in COLORS if c not in present])
    q = pick(rng, [f"is there a {color} line in the figure ?", f"does the chart include a {color} series ?",
                   f"is {color} one of the colors in the plot ?", f"does a {color} curve appear in this figure ?"])
    return img, q, "yes" if yes else "no", None


def super_clevr(rng):
    img, placed = scene(rng, int(rng.integers(2, 4)))
    free = cells(rng, 1, exclude=[p[2] for p in placed])[0]
    dots = pick(rng, [c for c in COLORS if c not in {p[0] for p in placed}])    # a color names one thing
    paint(img, free, dots_mask(int(rng.integers(1, 7))), COLORS[dots])             # the CLEVR-Math look
    color, shape, _ = pick(rng, placed)
    if rng.integers(2):
        q = pick(rng, [f"what is the color of the {shape} in the scene ?", f"there is a {shape} ; what color is it ?"])
        return img, q, color, None
    q = pick(rng, [f"what shape is the {color} thing ?", f"the {color} object has what shape ?"])
    return img, q, shape, None


def aokvqa(rng):
    img, placed = scene(rng, 2, background=(120, 170, 220))
    color, shape, _ = pick(rng, placed)
    opts, letter = options(rng, LOOKS_LIKE[shape], list(LOOKS_LIKE.values()))
    stem = pick(rng, [f"which everyday item does the {color} object resemble ?",
                      f"using common sense , what could the {color} object be ?",
                      f"in daily life , the {color} object looks like which thing ?"])
    return img, f"{stem} {opts} . answer with the option letter .", letter, None


def grounding(rng):
    img, placed = scene(rng, int(rng.integers(2, 5)), background=(120, 170, 220))
    color, shape, (r, c) = pick(rng, placed)
    q = pick(rng, [f"please give the bounding box of the {color} {shape} .", f"locate the {color} {shape} and output its box .",
                   f"provide the coordinates of the {color} {shape} .", f"find the region of the {color} {shape} ."])
    return img, q, f"[{BOX[c]}, {BOX[r]}, {BOX[c + 1]}, {BOX[r + 1]}]", None


def dvqa(rng):
    img = new_image(WHITE)
    draw_axes(img)
    colors = pick(rng, list(COLORS), int(rng.integers(2, 5)))
    heights = {}
    for color, col in zip(colors, sorted(pick(rng, [0, 1, 2, 3], len(colors)))):
        heights[color] = int(rng.integers(1, 8))
        paint(img, (3, col), bar_mask(heights[color]), COLORS[color])
    color = pick(rng, colors)
    q = pick(rng, [f"what is the value of the {color} bar ?", f"how high is the {color} bar in the chart ?",
                   f"read the value of the {color} bar .", f"the {color} bar reaches which value ?"])
    return img, q, str(10 * heights[color]), None


def tabmwp(rng):
    img = new_image(WHITE)
    d = ImageDraw.Draw(img)
    d.rectangle((CELL, CELL, 3 * CELL, 2 * CELL), outline=(0, 0, 0))
    d.line((2 * CELL, CELL, 2 * CELL, 2 * CELL), fill=(0, 0, 0))
    shape, price = pick(rng, SHAPES), int(rng.integers(1, 10))
    paint(img, (1, 1), shape_mask(shape), (90, 90, 90))
    paint(img, (1, 2), glyph_mask(str(price)), (0, 0, 0))
    name, m = pick(rng, NAMES), int(rng.integers(1, 6))
    q = pick(rng, [f"{name} has {m} dollars . {name} earns the amount shown in the table . how many dollars does {name} have now ?",
                   f"look at the table . {name} starts with {m} dollars and gets that amount more . what is the total ?",
                   f"according to the table , if {name} had {m} dollars and was paid the listed amount , how much money is there ?"])
    return img, q, str(m + price), None


DATASETS = {"ImageNet-R": imagenet_r, "ArxivQA": arxivqa, "IconQA": iconqa, "CLEVR-Math": clevr_math,
            "OCR-VQA": ocr_vqa, "Flickr30k": flickr30k, "FigureQA": figureqa, "super-CLEVR": super_clevr,
            "AOKVQA": aokvqa, "Grounding": grounding, "DVQA": dvqa, "TabMWP": tabmwp}


def sample(dataset, rng):
    """One (image, question, answer, references) of a dataset."""
    return DATASETS[dataset](rng)


# ---------------------------------------------------------------------------- the base model's pretraining mixture
# Like LLaVA's alignment data, it teaches what is where in an image and how to read it, in every image style of the
# benchmark, but none of the 12 datasets' instructions or answer forms (no yes/no, letters of options for an
# image question, boxes, captions, arithmetic): zero-shot stays low, instruction tuning has something to build on.
BACKGROUNDS = {"black": DARK, "white": WHITE, "beige": BEIGE, "sky": (120, 170, 220),
               **{c: rgb for c, rgb in COLORS.items() if c in ("red", "blue", "green")}}


def random_cell_content(rng, background, color):
    """(mask, rgb, description) of one cell's content, any kind the benchmark draws."""
    ink = (0, 0, 0) if background in (WHITE, BEIGE) else WHITE
    kind = pick(rng, ["shape", "shape", "styled", "dots", "glyph", "bar", "line"])
    if kind == "shape":
        shape = pick(rng, SHAPES)
        return shape_mask(shape), COLORS[color], f"a {color} {shape}"
    if kind == "styled":
        shape, style = pick(rng, SHAPES), pick(rng, STYLES)
        return styled(shape_mask(shape), style), COLORS[color], f"a {style} {color} {shape}"
    if kind == "dots":
        n = int(rng.integers(1, 7))
        return dots_mask(n), COLORS[color], f"{n} {color} dots"
    if kind == "glyph":
        ch = pick(rng, list(GLYPHS))
        return glyph_mask(ch), ink, f"the {'digit' if ch.isdigit() else 'letter'} {ch}"
    if kind == "bar":
        h = int(rng.integers(1, 8))
        return bar_mask(h), COLORS[color], f"a {color} bar of height {h}"
    return line_mask(), COLORS[color], f"a {color} line"


def pretraining_example(rng):
    """One generic (image, question, answer). The skills are the ones instruction tuning composes: describe the
    whole image, the content of a cell (by position), an object (by its color), where something is, read a word,
    name the background, and which option letter marks a word (a text skill for multiple choice)."""
    bg_name = pick(rng, list(BACKGROUNDS))
    img = new_image(BACKGROUNDS[bg_name])
    kind = pick(rng, ["image", "cell", "cell", "color", "color", "where", "read", "background", "letter"])
    if kind == "read":
        row, word = int(rng.integers(GRID)), pick(rng, WORDS)
        for i, ch in enumerate(word):
            paint(img, (row, 1 + i), glyph_mask(ch), WHITE if bg_name not in ("white", "beige") else (0, 0, 0))
        return img, pick(rng, [f"read the word in row {row + 1} .", f"which word is in row {row + 1} ?"]), word
    n = int(rng.integers(1, 4 if kind == "image" else 5))
    colors = pick(rng, [c for c in COLORS if c != bg_name], n)               # one color names one object
    filled = {cell: random_cell_content(rng, BACKGROUNDS[bg_name], color) for cell, color in zip(cells(rng, n), colors)}
    for cell, (mask, rgb, _) in filled.items():
        paint(img, cell, mask, rgb)
    if kind == "image":
        return img, "describe the image .", " , ".join(filled[c][2] for c in sorted(filled))
    if kind == "cell":
        r, c = int(rng.integers(GRID)), int(rng.integers(GRID))
        what = filled[(r, c)][2] if (r, c) in filled else "nothing"
        return img, f"describe the content at row {r + 1} column {c + 1} .", what
    colored = [(cell, d) for cell, (_, _, d) in filled.items() if not d.startswith("the ")]
    if kind == "color" and colored:
        cell, what = pick(rng, colored)
        color = next(c for c in COLORS if f" {c} " in f" {what} ")
        return img, f"describe the {color} thing .", f"{what} at row {cell[0] + 1} column {cell[1] + 1}"
    if kind in ("color", "where"):
        cell, (_, _, what) = pick(rng, list(filled.items()))
        return img, f"where is {what} ?", f"row {cell[0] + 1} column {cell[1] + 1}"
    if kind == "background":
        return img, "what is the background color ?", bg_name
    items = pick(rng, list(COLORS) + SHAPES + WORDS + list(LOOKS_LIKE.values()), 4)
    target = pick(rng, items)
    listing = " ".join(f"( {l} ) {o}" for l, o in zip("abcd", items))
    return img, f"in the list {listing} , which letter marks {target} ?", "abcd"[items.index(target)]


def pretraining_mixture(n, seed):
    """n generic (image, question, answer) triples, deterministic for a seed."""
    rng = np.random.default_rng([seed, 1000])
    return [pretraining_example(rng) for _ in range(n)]


# ---------------------------------------------------------------------------- vocabulary and the release layout
VOCAB_EXTRA = ([str(i) for i in range(100)] + BOX + list(GLYPHS) + WORDS + list(GENRES.values()) + NAMES
               + list(LOOKS_LIKE.values()) + list(COLORS) + SHAPES + STYLES + list(BACKGROUNDS) + ["yes", "no"])


def corpus(seed, per_dataset=300):
    """Every text the benchmark can produce, for building the word-level vocabulary."""
    rng = np.random.default_rng([seed, 2000])
    texts = [" ".join(VOCAB_EXTRA)]
    for name in DATASETS:
        for _ in range(per_dataset):
            _, q, a, refs = sample(name, rng)
            texts += [q, a] + (refs or [])
    texts += [t for _, q, a in pretraining_mixture(2000, seed) for t in (q, a)]
    return texts


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
        for split, n in (("train", sizes.train), ("test", sizes.test)):
            folder = os.path.join(root, "datasets", name, split)
            os.makedirs(folder, exist_ok=True)
            records = []
            for i in range(n):
                img, q, a, refs = sample(name, rng)
                rel = f"{name}/{split}/{i:05d}.png"
                img.save(os.path.join(root, "datasets", rel))
                rec = {"id": f"{name}-{split}-{i}", "image": rel,
                       "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
                if refs and split == "test":
                    rec["references"] = refs
                records.append(rec)
            with open(os.path.join(root, "instructions", name, f"{split}.json"), "w") as f:
                json.dump(records, f)
    with open(done, "w") as f:
        json.dump({"seed": seed, "train": sizes.train, "test": sizes.test}, f)
    return root
