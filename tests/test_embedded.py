"""Tests for embedded/benchmark.py, the embedded FCIT benchmark: the 12 datasets, their determinism and release
layout, each answer checked against the pixels of its image, the instructions' templates, and the pretraining
mixture of the tiny base. Run: python -m pytest -q tests/test_embedded.py"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from embedded import benchmark, pretraining

# The paper's datasets (fcit-paper-notes.md 1.2), written out here so the test does not read them from data.py.
PAPER_DATASETS = {"ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR",
                  "AOKVQA", "Grounding", "DVQA", "TabMWP"}
TINY = benchmark.Sizes(train=5, test=3)


def samples(dataset, n, seed=0):
    """n (image, question, answer, references), each scene rendered without a look (the palette's colors, no shift)
    so that its answer can be read back from the pixels; the looks are tested on their own below."""
    rng = np.random.default_rng(seed)
    return [(benchmark.render(s), q, a, r) for s, q, a, r in (benchmark.DATASETS[dataset](rng) for _ in range(n))]


def drawn(dataset, n, split, seed=0):
    rng = np.random.default_rng(seed)
    return [benchmark.sample(dataset, rng, split) for _ in range(n)]


def files(root):
    """relative path -> bytes of every JSON and PNG file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.suffix in (".json", ".png")}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    benchmark.write_release(str(root), seed=0, sizes=TINY)
    return root


# ---------------------------------------------------------------------------- the 12 datasets
@pytest.mark.parametrize("dataset", list(benchmark.DATASETS))
def test_sample_yields_32x32_rgb_image_question_and_nonempty_answer(dataset):
    for img, q, a, refs in drawn(dataset, 20, "train") + drawn(dataset, 20, "test"):
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
        assert isinstance(q, str) and q.strip()
        assert isinstance(a, str) and a.strip()
        assert refs is None or (isinstance(refs, list) and all(isinstance(r, str) for r in refs))
        assert refs is None or a in refs                                             # a caption is one of its refs
    # one rng, one draw: the same seed gives the same question, answer and pixels
    [(img0, *rest0)], [(img1, *rest1)] = drawn(dataset, 1, "test"), drawn(dataset, 1, "test")
    assert rest0 == rest1 and np.array_equal(np.asarray(img0), np.asarray(img1))


def test_there_are_the_12_fcit_datasets():
    assert set(benchmark.DATASETS) == set(data.METRIC) == PAPER_DATASETS
    assert len(benchmark.DATASETS) == 12


def test_write_release_is_deterministic_for_a_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    benchmark.write_release(str(a), seed=0, sizes=TINY)
    benchmark.write_release(str(b), seed=0, sizes=TINY)
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys() and len(fa) > 0
    assert all(fa[k] == fb[k] for k in fa)


def test_write_release_differs_across_seeds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    benchmark.write_release(str(a), seed=0, sizes=TINY)
    benchmark.write_release(str(b), seed=1, sizes=TINY)
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    for name in benchmark.DATASETS:
        assert fa[f"instructions/{name}/train.json"] != fb[f"instructions/{name}/train.json"], name
        # the seed changes the content, not the form: the same ids and image paths in both
        ra, rb = (json.loads(f[f"instructions/{name}/train.json"]) for f in (fa, fb))
        assert [(r["id"], r["image"]) for r in ra] == [(r["id"], r["image"]) for r in rb]


def test_write_release_layout_matches_the_official_release(release):
    for name in benchmark.DATASETS:
        for split, n in (("train", TINY.train), ("test", TINY.test)):
            records = json.loads((release / "instructions" / name / f"{split}.json").read_text())
            assert isinstance(records, list) and len(records) == n
            for r in records:
                assert {"id", "image", "conversations"} <= set(r)
                assert r["image"].startswith(f"{name}/{split}/")
                assert (release / "datasets" / r["image"]).is_file()
                human, gpt = r["conversations"]
                assert human["from"] == "human" and gpt["from"] == "gpt"
                assert human["value"].startswith("<image>\n")
            assert len({r["id"] for r in records}) == n


def test_write_release_second_call_does_not_rewrite(tmp_path):
    root = tmp_path / "rel"
    benchmark.write_release(str(root), seed=0, sizes=TINY)
    assert (root / "COMPLETE").is_file()
    watched = [root / "instructions" / "DVQA" / "train.json", root / "datasets" / "DVQA" / "train" / "00000.png",
               root / "COMPLETE"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert benchmark.write_release(str(root), seed=0, sizes=TINY) == str(root)
    assert [p.stat().st_mtime_ns for p in watched] == before


# ---------------------------------------------------------------------------- answer forms
# Each answer is checked against the image it belongs to (read back from the pixels), not only its format.
QUADRANTS = {"[0.00, 0.00, 0.50, 0.50]", "[0.50, 0.00, 1.00, 0.50]", "[0.00, 0.50, 0.50, 1.00]",
             "[0.50, 0.50, 1.00, 1.00]"}


def pixels(img):
    return np.asarray(img).astype(int)                                               # (32, 32, 3)


def color_mask(img, rgb):
    return (pixels(img) == np.array(rgb)).all(-1)                                    # (32, 32)


def object_colors(img):
    """The names of the object colors (benchmark.COLORS) that occur in the image."""
    return {name for name, rgb in benchmark.COLORS.items() if color_mask(img, rgb).any()}


def object_mask(img, background):
    return ~color_mask(img, benchmark.BACKGROUNDS[background])


def shows_die_face(mask, n):
    """mask is exactly a die face of n dots, small (1 cell) or big (2x2 cells), on some grid cell."""
    for span in (1, 2):
        face = np.kron(benchmark.dots_mask(n), np.ones((span, span), bool))
        for r in range(benchmark.GRID - span + 1):
            for c in range(benchmark.GRID - span + 1):
                placed = np.zeros_like(mask)
                placed[8 * r:8 * (r + span), 8 * c:8 * (c + span)] = face
                if np.array_equal(placed, mask):
                    return True
    return False


def option_letters(question):
    """{letter: option} of a multiple-choice question '... ( a ) red ( b ) green ...'."""
    return dict(re.findall(r"\( ([a-e]) \) (\w+)", question))


def test_arxivqa_letter_names_the_markers_color():
    for img, q, a, _ in samples("ArxivQA", 200):
        opts = option_letters(q)
        assert list(opts) == list("abcd") and a in opts, (q, a)
        assert object_colors(img) == {opts[a]}, (q, a)


def test_aokvqa_letter_names_what_the_objects_color_resembles():
    for img, q, a, _ in samples("AOKVQA", 200):
        opts = option_letters(q)
        assert list(opts) == list("abcd") and a in opts, (q, a)
        (color,) = object_colors(img)
        assert opts[a] == benchmark.RESEMBLES[color], (q, a, color)


def color_to_letters(dataset, n=300):
    out = {}
    for img, _, a, _ in samples(dataset, n):
        (color,) = object_colors(img)
        out.setdefault(color, set()).add(a)
    return out


def test_multiple_choice_letter_is_a_function_of_the_color():
    for dataset in ("ArxivQA", "AOKVQA"):
        mapping = color_to_letters(dataset)
        assert len(mapping) == 4 and all(len(v) == 1 for v in mapping.values()), (dataset, mapping)
        assert set().union(*mapping.values()) == set("abcd"), (dataset, mapping)


def test_arxivqa_and_aokvqa_give_one_color_different_letters():
    arxiv, aok = color_to_letters("ArxivQA"), color_to_letters("AOKVQA")
    shared = set(arxiv) & set(aok)
    assert any(arxiv[c] != aok[c] for c in shared), (arxiv, aok)
    # each dataset's letter is the position of the color's option in its own option list
    assert shared and all(arxiv[c] == {"abcd"[benchmark.MARKERS.index(c)]} for c in shared)
    assert all(aok[c] == {"abcd"[list(benchmark.RESEMBLES).index(c)]} for c in shared)


def test_iconqa_answer_is_the_dot_count():
    seen = set()
    for img, _, a, _ in samples("IconQA", 200):
        assert a in {str(n) for n in range(1, 7)}, a
        assert shows_die_face(object_mask(img, "beige"), int(a)), a
        seen.add(a)
    assert len(seen) == 6


def test_clevr_math_answer_is_dots_minus_subtracted():
    for img, q, a, _ in samples("CLEVR-Math", 200):
        m = int(re.search(r"(?:subtract|take away|remove) (\d+)", q).group(1))
        assert re.fullmatch(r"\d+", a) and int(a) >= 1, (q, a)
        assert shows_die_face(object_mask(img, "black"), int(a) + m), (q, a)


def test_ocr_vqa_answer_is_the_genre_of_the_cover_color():
    for img, _, a, _ in samples("OCR-VQA", 200):
        colors, counts = np.unique(pixels(img).reshape(-1, 3), axis=0, return_counts=True)
        cover = tuple(colors[counts.argmax()])                                       # the background dominates
        name = next(k for k, rgb in benchmark.COLORS.items() if rgb == cover)
        assert a == benchmark.GENRES[name], (a, name)


def test_figureqa_answer_says_whether_the_line_rises():
    seen = set()
    for img, _, a, _ in samples("FigureQA", 200):
        assert a in ("yes", "no")
        (color,) = object_colors(img)
        ys, xs = np.nonzero(color_mask(img, benchmark.COLORS[color]))
        left, right = ys[xs < 8].mean(), ys[xs >= 24].mean()                         # image y grows downwards
        assert (a == "yes") == (left > right), a
        seen.add(a)
    assert seen == {"yes", "no"}


def test_super_clevr_answers_the_color_or_the_size_asked():
    kinds = set()
    for img, q, a, _ in samples("super-CLEVR", 200):
        ys, xs = np.nonzero(object_mask(img, "black"))
        if "color" in q:
            assert object_colors(img) == {a}, (q, a)
            kinds.add("color")
        else:
            assert a in ("small", "big", "huge"), (q, a)
            width = xs.max() - xs.min() + 1                        # small spans 1 cell, big 2, huge 4
            assert width <= {"small": 8, "big": 16, "huge": 32}[a] and width > {"small": 0, "big": 8, "huge": 16}[a]
            kinds.add("size")
    assert kinds == {"color", "size"}


def test_grounding_box_is_the_quadrant_of_the_named_object():
    seen = set()
    for img, q, a, _ in samples("Grounding", 200):
        assert a in QUADRANTS, a
        x1, y1, x2, y2 = (float(v) * benchmark.SIZE for v in re.findall(r"[0-9.]+", a))
        ys, xs = np.nonzero(object_mask(img, "sky"))
        assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2, (q, a)
        (color,) = object_colors(img)
        assert color in q.split(), (q, color)
        seen.add(a)
    assert seen == QUADRANTS


def test_dvqa_answer_is_the_bar_height():
    for img, _, a, _ in samples("DVQA", 200):
        assert re.fullmatch(r"[1-8]", a), a                        # one digit: no answer is a substring of another
        (color,) = object_colors(img)
        top = np.nonzero(color_mask(img, benchmark.COLORS[color]))[0].min()
        assert int(a) == (benchmark.SIZE - top) // 4, (a, top)                       # one unit of height is 4 px


def test_flickr30k_caption_names_the_color_and_the_thing_of_the_shape():
    things = {v: k for k, v in benchmark.THINGS.items()}
    for img, _, a, refs in samples("Flickr30k", 100):
        (color,) = object_colors(img)
        assert a == refs[0] and all(f"{color} " in r for r in refs), (a, color)
        (thing,) = set(a.split()) & set(things)
        mask = color_mask(img, benchmark.COLORS[color])
        ys, xs = np.nonzero(mask)
        r, c = 8 * (ys.min() // 8), 8 * (xs.min() // 8)          # the quadrant the big (16 px) shape is drawn in
        assert mask.sum() == mask[r:r + 16, c:c + 16].sum(), a
        assert np.array_equal(mask[r:r + 16, c:c + 16], benchmark.shape_mask(things[thing], 16)), a


def test_tabmwp_answer_is_money_plus_the_dots_in_the_table():
    for img, q, a, _ in samples("TabMWP", 200):
        m = int(re.search(r"(\d+) dollars", q).group(1))
        cell = color_mask(img, benchmark.INK["black"])[8:16, 16:24]                  # the price cell, row 1 col 2
        n = int(a) - m
        assert 1 <= n <= 6 and np.array_equal(cell, benchmark.dots_mask(n)), (q, a)


def test_flickr30k_test_records_carry_references_containing_the_answer(release):
    records = json.loads((release / "instructions" / "Flickr30k" / "test.json").read_text())
    for r in records:
        assert r["conversations"][1]["value"] in r["references"] and len(r["references"]) > 1


# ---------------------------------------------------------------------------- held-out test images
def test_test_shades_are_never_training_shades():
    rng = np.random.default_rng(0)
    train = np.array([benchmark.look(rng, "train").shade for _ in range(2000)])          # (N, 3)
    test = np.array([benchmark.look(rng, "test").tint for _ in range(2000)])
    assert np.abs(train).max() <= 8 and np.abs(test).min() >= 10 and np.abs(test).max() <= 18
    assert set(np.unique(train)) == set(range(-8, 9))                    # every training shade is drawn
    assert (test < 0).any() and (test > 0).any()


def test_a_look_shades_and_shifts_the_object_and_the_background():
    scene = benchmark.Scene("black", "shape", "red", size="small", row=1, col=1, shape="square")
    plain = pixels(benchmark.render(scene))
    moved = pixels(benchmark.render(scene, benchmark.Look(dx=1, dy=-1, shade=(10, -10, 12), tint=(-12, 11, 10))))
    red, black = np.array(benchmark.COLORS["red"]), np.array(benchmark.BACKGROUNDS["black"])
    obj = (plain == red).all(-1)
    assert ((moved == red + [10, -10, 12]).all(-1) == np.roll(np.roll(obj, 1, axis=1), -1, axis=0)).all()
    assert ((moved == black + [-12, 11, 10]).all(-1) == ~np.roll(np.roll(obj, 1, axis=1), -1, axis=0)).all()


def test_no_test_record_of_any_dataset_is_a_training_record(tmp_path):
    from scripts import validity
    benchmark.write_release(str(tmp_path), seed=0, sizes=benchmark.Sizes(train=300, test=60))
    for name in benchmark.DATASETS:
        train = {validity.key(e) for e in data.load_dataset(str(tmp_path), name, "train")}
        test = [validity.key(e) for e in data.load_dataset(str(tmp_path), name, "test")]
        assert len(train) > 10 and not train & set(test), name
    assert json.loads((tmp_path / "rules.json").read_text()) == benchmark.RULES


# ---------------------------------------------------------------------------- instructions and pretraining
def questions(dataset, n, seed=0):
    return {q for _, q, _, _ in samples(dataset, n, seed)}


def test_instruction_templates_differ_between_datasets():
    qs = {name: questions(name, 50) for name in benchmark.DATASETS}
    for x in qs:
        for y in qs:
            if x < y:
                assert not qs[x] & qs[y], (x, y, qs[x] & qs[y])


@pytest.mark.parametrize("dataset", list(benchmark.DATASETS))
def test_every_dataset_paraphrases_its_instruction(dataset):
    def stems(seed):
        """The templates behind the questions: numbers, names, colors and shapes blanked out."""
        words = "|".join(benchmark.NAMES + list(benchmark.COLORS) + benchmark.SHAPES)
        return {re.sub(rf"\d+|\b({words})\b", "#", q) for q in questions(dataset, 200, seed)}
    assert len(stems(0)) >= 2, stems(0)
    assert stems(0) == stems(1)                                  # a fixed set of paraphrases, whatever the seed


def test_multiple_choice_options_are_fixed_per_dataset_and_differ_between_them():
    opts = {d: {tuple(option_letters(q).values()) for q in questions(d, 100)} for d in ("ArxivQA", "AOKVQA")}
    assert opts["ArxivQA"] == {tuple(benchmark.MARKERS)}
    assert opts["AOKVQA"] == {tuple(benchmark.RESEMBLES.values())}


def test_clevr_math_and_super_clevr_share_the_image_style():
    for dataset in ("CLEVR-Math", "super-CLEVR"):
        for img, _, _, _ in samples(dataset, 50):
            assert color_mask(img, benchmark.BACKGROUNDS["black"]).mean() > 0.4, dataset   # a huge square: 56%
            assert {tuple(pixels(img)[y, x]) for y in (0, -1) for x in (0, -1)} == {benchmark.BACKGROUNDS["black"]}


def test_pretraining_mixture_contains_none_of_the_benchmark_questions():
    pre = {q for _, q, _ in pretraining.pretraining_mixture(2000, seed=0)}
    for name in benchmark.DATASETS:
        overlap = pre & questions(name, 300)
        assert not overlap, (name, overlap)
    # what it asks instead: a description, the background, the object's name, or to copy words
    generic = set(pretraining.DESCRIBE) | {"what is the background color ?", "name the color of the background .",
                                          "name the object .", "what is this thing called ?"}
    assert {q for q in pre if not q.startswith("repeat after me : ")} == generic


def test_pretraining_mixture_is_deterministic():
    a, b = pretraining.pretraining_mixture(30, seed=0), pretraining.pretraining_mixture(30, seed=0)
    assert [(q, ans) for _, q, ans in a] == [(q, ans) for _, q, ans in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))


