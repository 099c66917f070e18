"""Tests for synthetic.py and data.py: the embedded benchmark's determinism, layout and answer forms, the loader's
error messages, the four settings against the paper's tables (fcit-paper-notes.md 1.2), and the Dirichlet partition.
Run: python -m pytest -q tests/test_data.py"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import synthetic  # noqa: E402

# The paper's tables (fcit-paper-notes.md 1.2), written out here so the test does not read them from data.py.
PAPER_TASK_ORDER = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]
PAPER_CAPABILITIES = {"General": {"AOKVQA", "IconQA", "Grounding", "ImageNet-R"},
                      "Chart": {"ArxivQA", "FigureQA", "DVQA"},
                      "Math": {"CLEVR-Math", "super-CLEVR", "TabMWP"},
                      "Other": {"Flickr30k", "OCR-VQA"}}
PAPER_HET_TASK = [[1, 2, 4, 5, 6], [3, 4, 5, 7, 7], [0, 2, 3, 4, 5], [0, 0, 1, 3, 7],
                  [1, 2, 4, 4, 5], [0, 3, 5, 7, 7], [2, 2, 5, 7, 7], [5, 5, 5, 6, 6]]
PAPER_HET_CAP = [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]
TINY = synthetic.Sizes(train=5, test=3)


def samples(dataset, n, seed=0):
    rng = np.random.default_rng(seed)
    return [synthetic.sample(dataset, rng) for _ in range(n)]


def files(root):
    """relative path -> bytes of every JSON and PNG file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.suffix in (".json", ".png")}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    synthetic.write_release(str(root), seed=0, sizes=TINY)
    return root


# ---------------------------------------------------------------------------- synthetic: the 12 datasets
@pytest.mark.parametrize("dataset", list(synthetic.DATASETS))
def test_sample_yields_32x32_rgb_image_question_and_nonempty_answer(dataset):
    for img, q, a, refs in samples(dataset, 20):
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
        assert isinstance(q, str) and q.strip()
        assert isinstance(a, str) and a.strip()
        assert refs is None or (isinstance(refs, list) and all(isinstance(r, str) for r in refs))


def test_there_are_the_12_fcit_datasets():
    assert set(synthetic.DATASETS) == set(data.METRIC) == set(PAPER_TASK_ORDER) | set().union(*PAPER_CAPABILITIES.values())
    assert len(synthetic.DATASETS) == 12


def test_write_release_is_deterministic_for_a_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic.write_release(str(a), seed=0, sizes=TINY)
    synthetic.write_release(str(b), seed=0, sizes=TINY)
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys() and len(fa) > 0
    assert all(fa[k] == fb[k] for k in fa)


def test_write_release_differs_across_seeds(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic.write_release(str(a), seed=0, sizes=TINY)
    synthetic.write_release(str(b), seed=1, sizes=TINY)
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    for name in synthetic.DATASETS:
        assert fa[f"instructions/{name}/train.json"] != fb[f"instructions/{name}/train.json"], name


def test_write_release_layout_matches_the_official_release(release):
    for name in synthetic.DATASETS:
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
    synthetic.write_release(str(root), seed=0, sizes=TINY)
    assert (root / "COMPLETE").is_file()
    watched = [root / "instructions" / "DVQA" / "train.json", root / "datasets" / "DVQA" / "train" / "00000.png",
               root / "COMPLETE"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert synthetic.write_release(str(root), seed=0, sizes=TINY) == str(root)
    assert [p.stat().st_mtime_ns for p in watched] == before


# ---------------------------------------------------------------------------- synthetic: answer forms
# Each answer is checked against the image it belongs to (read back from the pixels), not only its format.
QUADRANTS = {"[0.00, 0.00, 0.50, 0.50]", "[0.50, 0.00, 1.00, 0.50]", "[0.00, 0.50, 0.50, 1.00]",
             "[0.50, 0.50, 1.00, 1.00]"}


def pixels(img):
    return np.asarray(img).astype(int)                                               # (32, 32, 3)


def color_mask(img, rgb):
    return (pixels(img) == np.array(rgb)).all(-1)                                    # (32, 32)


def object_colors(img):
    """The names of the object colors (synthetic.COLORS) that occur in the image."""
    return {name for name, rgb in synthetic.COLORS.items() if color_mask(img, rgb).any()}


def object_mask(img, background):
    return ~color_mask(img, synthetic.BACKGROUNDS[background])


def shows_die_face(mask, n):
    """mask is exactly a die face of n dots, small (1 cell) or big (2x2 cells), on some grid cell."""
    for span in (1, 2):
        face = np.kron(synthetic.dots_mask(n), np.ones((span, span), bool))
        for r in range(synthetic.GRID - span + 1):
            for c in range(synthetic.GRID - span + 1):
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
        assert opts[a] == synthetic.RESEMBLES[color], (q, a, color)


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
        name = next(k for k, rgb in synthetic.COLORS.items() if rgb == cover)
        assert a == synthetic.GENRES[name], (a, name)


def test_figureqa_answer_says_whether_the_line_rises():
    seen = set()
    for img, _, a, _ in samples("FigureQA", 200):
        assert a in ("yes", "no")
        (color,) = object_colors(img)
        ys, xs = np.nonzero(color_mask(img, synthetic.COLORS[color]))
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
            assert a in ("small", "big"), (q, a)
            width = xs.max() - xs.min() + 1
            assert (a == "big") == (width > synthetic.CELL), (q, a, width)           # big spans 2 cells
            kinds.add("size")
    assert kinds == {"color", "size"}


def test_grounding_box_is_the_quadrant_of_the_named_object():
    seen = set()
    for img, q, a, _ in samples("Grounding", 200):
        assert a in QUADRANTS, a
        x1, y1, x2, y2 = (float(v) * synthetic.SIZE for v in re.findall(r"[0-9.]+", a))
        ys, xs = np.nonzero(object_mask(img, "sky"))
        assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2, (q, a)
        (color,) = object_colors(img)
        assert color in q.split(), (q, color)
        seen.add(a)
    assert seen == QUADRANTS


def test_dvqa_answer_is_ten_times_the_bar_height():
    for img, _, a, _ in samples("DVQA", 200):
        assert re.fullmatch(r"[1-8]0", a), a
        (color,) = object_colors(img)
        top = np.nonzero(color_mask(img, synthetic.COLORS[color]))[0].min()
        assert int(a) == 10 * (synthetic.SIZE - top) // 4, (a, top)                  # one unit of height is 4 px


def test_tabmwp_answer_is_money_plus_the_dots_in_the_table():
    for img, q, a, _ in samples("TabMWP", 200):
        m = int(re.search(r"(\d+) dollars", q).group(1))
        cell = color_mask(img, synthetic.INK["black"])[8:16, 16:24]                  # the price cell, row 1 col 2
        n = int(a) - m
        assert 1 <= n <= 6 and np.array_equal(cell, synthetic.dots_mask(n)), (q, a)


def test_flickr30k_test_records_carry_references_containing_the_answer(release):
    records = json.loads((release / "instructions" / "Flickr30k" / "test.json").read_text())
    for r in records:
        assert r["conversations"][1]["value"] in r["references"] and len(r["references"]) > 1


# ---------------------------------------------------------------------------- synthetic: instructions and pretraining
def questions(dataset, n, seed=0):
    return {q for _, q, _, _ in samples(dataset, n, seed)}


def test_instruction_templates_differ_between_datasets():
    qs = {name: questions(name, 50) for name in synthetic.DATASETS}
    for x in qs:
        for y in qs:
            if x < y:
                assert not qs[x] & qs[y], (x, y, qs[x] & qs[y])


@pytest.mark.parametrize("dataset", list(synthetic.DATASETS))
def test_every_dataset_paraphrases_its_instruction(dataset):
    stems = {re.sub(r"\d+|\b(tom|ann|bob|eve)\b", "#", q) for q in questions(dataset, 100)}
    assert len(stems) >= 2, stems


def test_multiple_choice_options_are_fixed_per_dataset_and_differ_between_them():
    opts = {d: {tuple(option_letters(q).values()) for q in questions(d, 100)} for d in ("ArxivQA", "AOKVQA")}
    assert opts["ArxivQA"] == {tuple(synthetic.MARKERS)}
    assert opts["AOKVQA"] == {tuple(synthetic.RESEMBLES.values())}


def test_clevr_math_and_super_clevr_share_the_image_style():
    for dataset in ("CLEVR-Math", "super-CLEVR"):
        for img, _, _, _ in samples(dataset, 50):
            assert color_mask(img, synthetic.BACKGROUNDS["black"]).mean() > 0.5, dataset


def test_pretraining_mixture_contains_none_of_the_benchmark_questions():
    pre = {q for _, q, _ in synthetic.pretraining_mixture(2000, seed=0)}
    for name in synthetic.DATASETS:
        overlap = pre & questions(name, 300)
        assert not overlap, (name, overlap)


def test_pretraining_mixture_is_deterministic():
    a, b = synthetic.pretraining_mixture(30, seed=0), synthetic.pretraining_mixture(30, seed=0)
    assert [(q, ans) for _, q, ans in a] == [(q, ans) for _, q, ans in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- data: the loader and its errors
def write_split(root, records, *, name="train.json", dataset="D", raw=None):
    """A one-dataset release under root with one 32x32 image 'D/0.png'; returns the split file's path."""
    (root / "datasets" / dataset).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32)).save(root / "datasets" / dataset / "0.png")
    folder = root / "instructions" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(raw if raw is not None else json.dumps(records))
    return path


def record(**over):
    r = {"id": "x", "image": "D/0.png",
         "conversations": [{"from": "human", "value": "<image>\nq ?"}, {"from": "gpt", "value": "a"}]}
    r.update(over)
    return {k: v for k, v in r.items() if v is not None}


def test_load_dataset_reads_a_valid_split(tmp_path):
    write_split(tmp_path, [record(), record(id="y")])
    ex = data.load_dataset(str(tmp_path), "D", "train")
    assert [e.id for e in ex] == ["x", "y"]
    assert ex[0].question == "<image>\nq ?" and ex[0].answer == "a"
    assert Path(ex[0].image) == tmp_path / "datasets" / "D" / "0.png"


def test_malformed_json_names_the_file(tmp_path):
    path = write_split(tmp_path, None, raw="[{not json")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data.load_dataset(str(tmp_path), "D", "train")


def test_json_object_instead_of_list_names_the_file(tmp_path):
    path = write_split(tmp_path, None, raw=json.dumps({"records": []}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*list"):
        data.load_dataset(str(tmp_path), "D", "train")


def test_record_without_conversations_names_file_and_index(tmp_path):
    path = write_split(tmp_path, [record(), record(conversations=None)])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": record 1 .*conversations"):
        data.load_dataset(str(tmp_path), "D", "train")


def test_record_without_gpt_turn_names_file_and_index(tmp_path):
    two_humans = [{"from": "human", "value": "<image>\nq ?"}, {"from": "human", "value": "more"}]
    path = write_split(tmp_path, [record(), record(), record(conversations=two_humans)])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": record 2 .*gpt"):
        data.load_dataset(str(tmp_path), "D", "train")


def test_record_without_image_names_file_and_index(tmp_path):
    path = write_split(tmp_path, [record(image=None)])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": record 0 .*'image'"):
        data.load_dataset(str(tmp_path), "D", "train")


def test_missing_image_file_names_the_image(tmp_path):
    path = write_split(tmp_path, [record(), record(image="D/missing.png")])
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + r": record 1\b.*D/missing\.png"):
        data.load_dataset(str(tmp_path), "D", "train")


def test_unreadable_image_names_the_path(tmp_path):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"this is not a png" * 10)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        data.read_image(str(bad))


def test_read_image_returns_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (32, 32), 7).save(path)
    assert data.read_image(str(path)).mode == "RGB"


def test_missing_split_file_raises_file_not_found(tmp_path):
    write_split(tmp_path, [record()])
    with pytest.raises(FileNotFoundError, match=r"instructions/D/test\*\.json"):
        data.load_dataset(str(tmp_path), "D", "test")


def test_split_file_finds_release_style_names(tmp_path):
    train = write_split(tmp_path, [record()], name="train_4w.json")
    test = write_split(tmp_path, [record()], name="test_1w.json")
    assert data.split_file(str(tmp_path), "D", "train") == str(train)
    assert data.split_file(str(tmp_path), "D", "test") == str(test)


def test_load_dataset_reads_the_written_release(release):
    for name in synthetic.DATASETS:
        ex = data.load_dataset(str(release), name, "test")
        assert len(ex) == TINY.test
        assert data.read_image(ex[0].image).size == (32, 32)
        assert (ex[0].references is not None) == (name == "Flickr30k")


# ---------------------------------------------------------------------------- data: the four settings
def test_settings_are_the_four_of_the_paper():
    assert set(data.SETTINGS) == {"task-hom", "task-het", "cap-hom", "cap-het"}


@pytest.mark.parametrize("name,stages", [("task-hom", 8), ("task-het", 8), ("cap-hom", 4), ("cap-het", 4)])
def test_number_of_stages(name, stages):
    s = data.SETTINGS[name]
    assert s.num_stages == stages and len(s.tasks) == stages


def test_task_order_is_the_papers():
    assert data.SETTINGS["task-hom"].tasks == PAPER_TASK_ORDER == data.SETTINGS["task-het"].tasks
    assert data.SETTINGS["cap-hom"].tasks == ["General", "Chart", "Math", "Other"] == data.SETTINGS["cap-het"].tasks


@pytest.mark.parametrize("name", ["task-hom", "cap-hom"])
def test_hom_stage_trains_only_its_own_task(name):
    s = data.SETTINGS[name]
    assert not s.heterogeneous
    for t in range(s.num_stages):
        assert s.stage_tasks(t) == [s.tasks[t]]


@pytest.mark.parametrize("name,table", [("task-het", PAPER_HET_TASK), ("cap-het", PAPER_HET_CAP)])
def test_het_slot_tables_are_the_papers(name, table):
    s = data.SETTINGS[name]
    assert s.heterogeneous and s.slots == table


@pytest.mark.parametrize("name", list(data.SETTINGS))
def test_seen_tasks_is_the_union_of_rows_so_far(name):
    s = data.SETTINGS[name]
    for t in range(s.num_stages):
        rows = {i for row in s.slots[:t + 1] for i in row}
        assert s.seen_tasks(t) == [s.tasks[i] for i in sorted(rows)]
    assert s.seen_tasks(s.num_stages - 1) == s.tasks


def test_capability_groups_cover_the_12_datasets_once():
    groups = data.SETTINGS["cap-hom"].datasets
    assert {k: set(v) for k, v in groups.items()} == PAPER_CAPABILITIES
    flat = [d for v in groups.values() for d in v]
    assert sorted(flat) == sorted(synthetic.DATASETS)


def test_task_settings_map_each_task_to_its_dataset():
    assert data.SETTINGS["task-het"].datasets == {d: [d] for d in PAPER_TASK_ORDER}


def test_get_setting_unknown_names_flag_and_choices():
    with pytest.raises(ValueError) as e:
        data.get_setting("nope")
    msg = str(e.value)
    assert "--setting" in msg and "nope" in msg
    assert all(name in msg for name in ("task-hom", "task-het", "cap-hom", "cap-het"))


# ---------------------------------------------------------------------------- data: the Dirichlet partition
def partition(n=500, clients=50, *, beta=1.0, min_size=2, seed=0):
    return data.dirichlet_partition(n, clients, beta=beta, min_size=min_size, rng=np.random.default_rng(seed))


@pytest.mark.parametrize("beta", [0.5, 1.0, 5.0])
def test_partition_conserves_examples(beta):
    parts = partition(beta=beta)
    assert len(parts) == 50
    flat = np.concatenate(parts)
    assert len(flat) == 500 and np.array_equal(np.sort(flat), np.arange(500))


@pytest.mark.parametrize("beta", [0.5, 1.0, 5.0])
def test_partition_gives_every_client_min_size(beta):
    for seed in range(5):
        assert min(len(p) for p in partition(beta=beta, min_size=3, seed=seed)) >= 3


def test_partition_is_deterministic_for_a_seed():
    a, b = partition(seed=7), partition(seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, partition(seed=8)))


def test_smaller_beta_gives_more_skew():
    def skew(beta):
        return np.mean([np.std([len(p) for p in partition(beta=beta, seed=s)]) for s in range(20)])
    assert skew(0.5) > skew(5.0)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_partition_rejects_nonpositive_beta(beta):
    with pytest.raises(ValueError, match=r"--beta must be > 0"):
        partition(beta=beta)


def test_partition_rejects_too_few_examples():
    with pytest.raises(ValueError, match=r"50 clients at least 3 examples each from 100"):
        partition(n=100, clients=50, min_size=3)


def test_partition_setting_error_names_the_task():
    tiny = {"Chart": data.TaskData("Chart", train=list(range(10)))}
    with pytest.raises(ValueError, match=r"^task Chart: "):
        data.partition_setting(tiny, 50, beta=1.0, min_size=1, rng=np.random.default_rng(0))


def test_save_partition_round_trips(tmp_path):
    tasks = {"A": data.TaskData("A", train=list(range(120))), "B": data.TaskData("B", train=list(range(80)))}
    parts = data.partition_setting(tasks, 10, beta=1.0, min_size=2, rng=np.random.default_rng(0))
    path = tmp_path / "partition.json"
    data.save_partition(str(path), parts)
    back = json.loads(path.read_text())
    assert back.keys() == parts.keys()
    assert all(back[t] == [p.tolist() for p in parts[t]] for t in parts)


# ---------------------------------------------------------------------------- data: load_setting
@pytest.fixture(scope="module")
def cap_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap")
    synthetic.write_release(str(root), seed=0, sizes=synthetic.Sizes(train=6, test=2))
    return data.load_setting(str(root), data.SETTINGS["cap-hom"], rng=np.random.default_rng(0))


def test_capability_train_set_is_the_union_of_its_datasets(cap_data):
    for task, datasets in data.SETTINGS["cap-hom"].datasets.items():
        train = cap_data[task].train
        assert len(train) == 6 * len(datasets)
        assert {e.id.rsplit("-train-", 1)[0] for e in train} == set(datasets)


def test_capability_test_sets_are_keyed_by_dataset(cap_data):
    for task, datasets in data.SETTINGS["cap-hom"].datasets.items():
        test = cap_data[task].test
        assert list(test) == datasets
        assert all(len(v) == 2 and all(e.id.startswith(f"{d}-test-") for e in v) for d, v in test.items())


def test_capability_train_set_is_shuffled_across_datasets(cap_data):
    ids = [e.id.rsplit("-train-", 1)[0] for e in cap_data["General"].train]
    assert ids != sorted(ids, key=data.SETTINGS["cap-hom"].datasets["General"].index)
