"""Tests for data.py: the loader's error messages, the four settings against the paper's tables
(fcit-paper-notes.md 1.2), the Dirichlet partition, and load_setting on the embedded benchmark's release.
The embedded benchmark itself is tested in test_embedded.py. Run: python -m pytest -q tests/test_data.py"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from embedded import benchmark

# The paper's tables (fcit-paper-notes.md 1.2), written out here so the test does not read them from data.py.
PAPER_TASK_ORDER = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]
PAPER_CAPABILITIES = {"General": {"AOKVQA", "IconQA", "Grounding", "ImageNet-R"},
                      "Chart": {"ArxivQA", "FigureQA", "DVQA"},
                      "Math": {"CLEVR-Math", "super-CLEVR", "TabMWP"},
                      "Other": {"Flickr30k", "OCR-VQA"}}
PAPER_HET_TASK = [[1, 2, 4, 5, 6], [3, 4, 5, 7, 7], [0, 2, 3, 4, 5], [0, 0, 1, 3, 7],
                  [1, 2, 4, 4, 5], [0, 3, 5, 7, 7], [2, 2, 5, 7, 7], [5, 5, 5, 6, 6]]
PAPER_HET_CAP = [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]
TINY = benchmark.Sizes(train=5, test=3)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    benchmark.write_release(str(root), seed=0, sizes=TINY)
    return root


# ---------------------------------------------------------------------------- the loader and its errors
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


def test_rules_are_the_official_ones_with_what_the_release_declares(tmp_path):
    assert data.rules(str(tmp_path), ["exact", "substring", "iou", "caption"]) == data.METRIC    # no rules.json
    (tmp_path / "rules.json").write_text(json.dumps({"Flickr30k": "caption-relative"}))
    got = data.rules(str(tmp_path), ["exact", "substring", "iou", "caption", "caption-relative"])
    assert got == {**data.METRIC, "Flickr30k": "caption-relative"}
    for bad in ({"Flickr30k": "bleu"}, {"Flickr": "caption"}, ["caption"]):
        (tmp_path / "rules.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "rules.json"))):
            data.rules(str(tmp_path), ["exact", "caption", "caption-relative"])


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
    ex = data.load_dataset(str(tmp_path), "D", "train")           # the records parse; the images are checked at once
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + r": record 1\b.*D/missing\.png is missing"):
        data.check_images({"D": data.TaskData("D", train=ex)})
    data.check_images({"D": data.TaskData("D", train=ex[:1])})    # the present image alone passes


def test_unreadable_image_names_the_path(tmp_path):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"this is not a png" * 10)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        data.read_image(str(bad))


def test_read_image_returns_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (32, 32), 7).save(path)
    img = data.read_image(str(path))
    assert img.mode == "RGB" and img.size == (32, 32)
    assert (np.asarray(img) == 7).all()                                              # gray 7 in all three channels


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
    for name in benchmark.DATASETS:
        ex = data.load_dataset(str(release), name, "test")
        assert len(ex) == TINY.test
        assert data.read_image(ex[0].image).size == (32, 32)
        assert (ex[0].references is not None) == (name == "Flickr30k")


# ---------------------------------------------------------------------------- the four settings
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
def test_het_client_task_tables_are_the_papers(name, table):
    s = data.SETTINGS[name]
    assert s.heterogeneous and s.client_tasks == table


@pytest.mark.parametrize("name", list(data.SETTINGS))
def test_seen_tasks_is_the_union_of_rows_so_far(name):
    s = data.SETTINGS[name]
    for t in range(s.num_stages):
        rows = {i for row in s.client_tasks[:t + 1] for i in row}
        assert s.seen_tasks(t) == [s.tasks[i] for i in sorted(rows)]
    assert s.seen_tasks(s.num_stages - 1) == s.tasks


def test_capability_groups_cover_the_12_datasets_once():
    groups = data.SETTINGS["cap-hom"].datasets
    assert {k: set(v) for k, v in groups.items()} == PAPER_CAPABILITIES
    flat = [d for v in groups.values() for d in v]
    assert sorted(flat) == sorted(benchmark.DATASETS)


def test_task_settings_map_each_task_to_its_dataset():
    assert data.SETTINGS["task-het"].datasets == {d: [d] for d in PAPER_TASK_ORDER}


def test_get_setting_unknown_names_flag_and_choices():
    with pytest.raises(ValueError) as e:
        data.get_setting("nope")
    msg = str(e.value)
    assert "--setting" in msg and "nope" in msg
    assert all(name in msg for name in ("task-hom", "task-het", "cap-hom", "cap-het"))


# ---------------------------------------------------------------------------- the Dirichlet partition
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
    # a real minimum, reached: with very skewed shares most clients get exactly min_size
    assert min(len(p) for p in partition(beta=0.01, min_size=3)) == 3


def test_partition_is_deterministic_for_a_seed():
    a, b = partition(seed=7), partition(seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, partition(seed=8)))


def test_smaller_beta_gives_more_skew():
    def skew(beta):
        return np.mean([np.std([len(p) for p in partition(beta=beta, seed=s)]) for s in range(20)])
    assert skew(0.5) > skew(5.0)
    # as much as Dirichlet shares have: size_c = min_size + w_c * extra (+ rounding), w ~ Dir(beta 1_C), so
    # Var(size_c) = extra^2 Var(w_c) = extra^2 (1/C)(1 - 1/C) / (C beta + 1); many examples make the rounding small
    n, C, min_size = 20100, 50, 2
    for beta in (0.5, 5.0):
        var = np.mean([np.var([len(p) for p in partition(n, C, beta=beta, min_size=min_size, seed=s)])
                       for s in range(300)])
        assert var == pytest.approx((n - C * min_size) ** 2 * (1 / C) * (1 - 1 / C) / (C * beta + 1), rel=0.1), beta


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


# ---------------------------------------------------------------------------- load_setting
@pytest.fixture(scope="module")
def cap_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap")
    benchmark.write_release(str(root), seed=0, sizes=benchmark.Sizes(train=6, test=2))
    return root


@pytest.fixture(scope="module")
def cap_data(cap_root):
    return data.load_setting(str(cap_root), data.SETTINGS["cap-hom"], rng=np.random.default_rng(0))


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


def test_capability_train_set_is_shuffled_across_datasets(cap_data, cap_root):
    ids = [e.id.rsplit("-train-", 1)[0] for e in cap_data["General"].train]
    assert ids != sorted(ids, key=data.SETTINGS["cap-hom"].datasets["General"].index)
    # by the rng passed in: the first task's order is the first permutation of np.random.default_rng(0)
    union = [e.id for d in data.SETTINGS["cap-hom"].datasets["General"] for e in data.load_dataset(str(cap_root), d, "train")]
    order = np.random.default_rng(0).permutation(len(union))
    assert [e.id for e in cap_data["General"].train] == [union[i] for i in order]
