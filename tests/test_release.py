"""Tests for data.py and release/partitions.py on the official FCIT release layout: file names, record forms,
Flickr30k references, pre-made client partitions, the missing-file report, and that the embedded benchmark still
loads the same way. The release is a tiny fixture in the exact official layout (tests/release_fixture.py). Run:
python -m pytest -q tests/test_release.py"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import data
import release_fixture as rf
from embedded import benchmark
from release.partitions import load_release, release_setting

CLIENTS, PER_FILE = 3, 4


def load(root, name="task-hom", *, beta=1.0, clients=CLIENTS, **limits):
    return load_release(str(root), data.SETTINGS[name], beta=beta, num_clients=clients,
                        rng=np.random.default_rng(0), **limits)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcit")
    rf.write_release_fixture(root, num_clients=CLIENTS, per_file=PER_FILE)
    return root


@pytest.fixture
def fresh(tmp_path):
    """A release of one's own, to break."""
    rf.write_release_fixture(tmp_path, num_clients=CLIENTS, per_file=PER_FILE)
    return tmp_path


def ids(examples):
    return [e.id for e in examples]


def client_ids(root, kind, t, c):
    path = root / "partitioned_data" / kind / f"Task{t}" / f"client_{c}.json"
    return [r["id"] for r in json.loads(path.read_text())]


# ---------------------------------------------------------------------------- file names and record forms
def test_release_table_names_the_official_files():
    for dataset, (folder, train, test, train_dir, _) in rf.OFFICIAL.items():
        spec = data.RELEASE[dataset]
        assert (spec.folder, spec.train, spec.test) == (folder, train, test), dataset
        assert spec.images == train_dir.split("/")[0], dataset
    assert data.RELEASE["Flickr30k"].refs == os.path.basename(rf.FLICKR_REFS)


@pytest.mark.parametrize("name", ["task-hom", "cap-hom"])
def test_loader_reads_each_datasets_official_files(release, name):
    got, parts = load(release, name, beta=0.5)                   # no pre-made partition for 0.5: train files
    assert parts is None
    for task, td in got.items():
        want = []
        for d in data.SETTINGS[name].datasets[task]:
            folder, train, test, _, _ = rf.OFFICIAL[d]
            want += [f"{folder}/{train}#{i}" for i in range(PER_FILE)]
            assert ids(td.test[d]) == [f"{folder}/{test}#{i}" for i in range(PER_FILE)]
        assert sorted(ids(td.train)) == sorted(want)


def test_question_record_test_files_parse(release):
    ex = data.load_dataset(str(release), "FigureQA", "test")
    assert ex[2].question == "<image>\nFigureQA test question 2" and ex[2].answer == "FigureQA test answer 2"
    assert Path(ex[2].image) == release / "datasets" / "FigureQA" / "images" / "figureqa_2.png"


def test_grounding_answer_bbox_becomes_the_answer(release):
    ex = data.load_dataset(str(release), "Grounding", "test")
    assert [e.answer for e in ex] == [f"[0.1, 0.2, 0.{i + 3}, 0.9]" for i in range(PER_FILE)]


def test_conversation_record_test_files_parse_first_turns(release):
    ex = data.load_dataset(str(release), "IconQA", "test")
    assert ex[1].question == "<image>\nIconQA test question 1" and ex[1].answer == "IconQA test answer 1"
    assert ex[1].later == (("and then ?", "a later turn"),)            # kept: a training record trains on it


def test_a_multi_turn_training_record_keeps_every_turn_and_an_unanswered_turn_is_refused(fresh):
    path = fresh / "partitioned_data/Task-related/seq/1.0/Task2/client_0.json"
    records = json.loads(path.read_text())
    records[0]["conversations"] += [{"from": "human", "value": "and the year ?"}, {"from": "gpt", "value": "2020"}]
    path.write_text(json.dumps(records))
    got, parts = load(fresh, "task-hom")
    first = got["ArxivQA"].train[parts["ArxivQA"][0][0]]
    assert first.later == (("and the year ?", "2020"),) and first.answer == records[0]["conversations"][1]["value"]
    records[0]["conversations"].append({"from": "human", "value": "and the month ?"})
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": record 0 has 3 human and 2 gpt turns"):
        load(fresh, "task-hom")


def test_limits_take_the_first_records_of_each_file(release):
    got, _ = load(release, "task-hom", beta=0.5, train_limit=2, test_limit=1)
    assert sorted(ids(got["OCR-VQA"].train)) == ["OCRVQA/train_10w.json#0", "OCRVQA/train_10w.json#1"]
    assert ids(got["OCR-VQA"].test["OCR-VQA"]) == ["OCRVQA/test_1w.json#0"]


# ---------------------------------------------------------------------------- Flickr30k references
@pytest.mark.parametrize("by", ["name", "path", "position"])
def test_flickr30k_references_are_attached(tmp_path, by):
    rf.write_release_fixture(tmp_path, per_file=PER_FILE, refs_by=by, partitions=False)
    ex = data.load_dataset(str(tmp_path), "Flickr30k", "test")
    assert [e.references for e in ex] == [[f"caption {c} of image {i}" for c in range(3)] for i in range(PER_FILE)]


def test_flickr30k_reference_without_match_names_the_file(fresh):
    path = fresh / rf.FLICKR_REFS
    path.write_text(json.dumps({"images": [{"file_name": "nothing.jpg", "id": 99}],
                                "annotations": [{"image_id": 99, "caption": "a caption of no test image"}]}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": no captions for test record 0"):
        data.load_dataset(str(fresh), "Flickr30k", "test")


# ---------------------------------------------------------------------------- pre-made partitions
def test_premade_task_partitions_index_each_clients_records(release):
    got, parts = load(release, "task-hom")
    assert list(parts) == data.TASK_ORDER
    for t, task in enumerate(data.TASK_ORDER, 1):
        assert len(parts[task]) == CLIENTS
        for c, idx in enumerate(parts[task]):
            assert [got[task].train[i].id for i in idx] == client_ids(release, "Task-related/seq/1.0", t, c)
        assert sorted(np.concatenate(parts[task]).tolist()) == list(range(len(got[task].train)))


def test_premade_partitions_serve_hom_and_het_alike(release):
    hom, het = load(release, "cap-hom"), load(release, "cap-het")
    assert {t: ids(td.train) for t, td in hom[0].items()} == {t: ids(td.train) for t, td in het[0].items()}


@pytest.mark.parametrize("order", [rf.CAP_ORDER, ["General", "Chart", "Math", "Other"],
                                   ["Chart", "Other", "General", "Math"]])
def test_cap_folders_are_mapped_by_content_whatever_their_order(tmp_path, order):
    train = rf.write_release_fixture(tmp_path, num_clients=CLIENTS, per_file=PER_FILE, cap_order=order)
    got, parts = load(tmp_path, "cap-hom")
    assert list(got) == list(parts) == list(data.CAPABILITIES)
    for group, datasets in data.CAPABILITIES.items():
        assert sorted(ids(got[group].train)) == sorted(r["id"] for d in datasets for r in train[d])
        t = order.index(group) + 1
        for c, idx in enumerate(parts[group]):
            assert [got[group].train[i].id for i in idx] == client_ids(tmp_path, "Capability-related/cap/1.0", t, c)


def test_the_stage_order_is_the_release_folders_and_the_het_table_indexes_it(tmp_path):
    official = ["General", "Other", "Math", "Chart"]                   # the order the official cap-hom eval implies
    rf.write_release_fixture(tmp_path, num_clients=CLIENTS, per_file=PER_FILE, cap_order=official)
    hom = release_setting(str(tmp_path), data.SETTINGS["cap-hom"], beta=1.0)
    het = release_setting(str(tmp_path), data.SETTINGS["cap-het"], beta=1.0)
    assert hom.tasks == het.tasks == official and [hom.stage_tasks(t) for t in range(4)] == [[g] for g in official]
    assert het.client_tasks == data.HET_CAP                             # the rows of task indices are kept
    default = data.SETTINGS["cap-het"]
    names = lambda s, t: sorted(s.tasks[i] for i in s.client_tasks[t])  # noqa: E731
    assert names(het, 0) == names(default, 0)                           # row 1 holds Chart and Other twice each
    for t in (1, 2, 3):                                                 # rows 2-4: Chart and Other swap
        swap = {"Chart": "Other", "Other": "Chart"}
        assert names(het, t) == sorted(swap.get(g, g) for g in names(default, t))
    # and the data of each group is the same, only the order of the stages moved
    got, parts = load_release(str(tmp_path), hom, beta=1.0, num_clients=CLIENTS, rng=np.random.default_rng(0))
    assert list(got) == list(parts) == official


def test_without_a_partition_the_setting_keeps_its_order(tmp_path):
    rf.write_release_fixture(tmp_path, num_clients=CLIENTS, per_file=PER_FILE, partitions=False)
    assert release_setting(str(tmp_path), data.SETTINGS["cap-het"], beta=1.0) is data.SETTINGS["cap-het"]
    rf.write_release_fixture(tmp_path / "b", num_clients=CLIENTS, per_file=PER_FILE)
    assert release_setting(str(tmp_path / "b"), data.SETTINGS["cap-hom"], beta=0.5) is data.SETTINGS["cap-hom"]


def test_unidentifiable_cap_folder_raises_naming_it(fresh):
    folder = fresh / "partitioned_data" / "Capability-related" / "cap" / "1.0" / "Task2"
    for c in range(CLIENTS):                         # the same images, moved to a folder no dataset uses
        path = folder / f"client_{c}.json"
        records = json.loads(path.read_text())
        for r in records:
            moved = fresh / "datasets" / "Elsewhere" / r["image"]
            moved.parent.mkdir(parents=True, exist_ok=True)
            moved.write_bytes((fresh / "datasets" / r["image"]).read_bytes())
            r["image"] = f"Elsewhere/{r['image']}"
        path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r": cannot tell which task.*Elsewhere"):
        load(fresh, "cap-hom")


def test_two_folders_holding_one_task_raise(tmp_path):
    rf.write_release_fixture(tmp_path, num_clients=CLIENTS, per_file=PER_FILE,
                             cap_order=["Math", "Chart", "Math", "Other"])
    with pytest.raises(ValueError, match=r"Task1 and Task3 both hold Math"):
        load(tmp_path, "cap-hom")


def test_train_limit_applies_to_each_clients_share(release):
    got, parts = load(release, "task-hom", train_limit=1)
    assert [len(p) for p in parts["ArxivQA"]] == [1] * CLIENTS
    assert ids(got["ArxivQA"].train) == [client_ids(release, "Task-related/seq/1.0", 2, c)[0] for c in range(CLIENTS)]


def test_embedded_layout_loads_like_load_setting(tmp_path):
    benchmark.write_release(str(tmp_path), seed=0, sizes=benchmark.Sizes(train=3, test=2))
    got, parts = load(tmp_path, "cap-hom")
    want = data.load_setting(str(tmp_path), data.SETTINGS["cap-hom"], rng=np.random.default_rng(0))
    assert parts is None
    assert {t: ids(td.train) for t, td in got.items()} == {t: ids(td.train) for t, td in want.items()}
    assert {t: {d: ids(v) for d, v in td.test.items()} for t, td in got.items()} == \
           {t: {d: ids(v) for d, v in td.test.items()} for t, td in want.items()}
    assert got["Other"].test["Flickr30k"][0].references                       # from the records themselves


# ---------------------------------------------------------------------------- errors
def test_missing_files_are_listed_in_one_error_before_reading(fresh, monkeypatch):
    gone = ["instructions/OCRVQA/train_10w.json", "instructions/IconQA/val.json", rf.FLICKR_REFS]
    for rel in gone:
        (fresh / rel).unlink()
    monkeypatch.setattr(data, "read_json", lambda path: pytest.fail(f"read {path} before checking"))
    with pytest.raises(FileNotFoundError) as e:
        load(fresh, "task-hom", beta=0.5)
    msg = str(e.value)
    assert msg.startswith(f"missing 3 files under {fresh}") and "Run the real benchmark" in msg
    assert all(rel in msg for rel in gone)


def test_missing_client_files_are_listed(fresh):
    (fresh / "partitioned_data/Task-related/seq/1.0/Task5/client_1.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load(fresh, "task-hom", clients=CLIENTS + 1)          # one client more than the release holds
    msg = str(e.value)
    assert msg.startswith(f"missing 9 files under {fresh}")
    assert "Task5/client_1.json" in msg and all(f"Task{t}/client_{CLIENTS}.json" in msg for t in range(1, 9))


def test_bad_record_in_a_client_file_names_file_and_index(fresh):
    path = fresh / "partitioned_data/Capability-related/cap/1.0/Task3/client_2.json"
    records = json.loads(path.read_text())
    records[1] = {"id": "x", "image": records[1]["image"]}
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": record 1 has no 'conversations'.*Data format"):
        load(fresh, "cap-hom")


def test_question_record_without_answer_names_file_and_index(fresh):
    path = fresh / "instructions/ArxivQA/test_1w.json"
    records = json.loads(path.read_text())
    del records[3]["answer"]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": record 3 .*'answer'"):
        data.load_dataset(str(fresh), "ArxivQA", "test")
