"""Tests for scripts/validity.py on a small embedded release: the issue-11 criteria of a valid benchmark hold
(no test record is a training record, no constant answer scores more than 10 points above chance, a wrong answer
scores at most chance, the untrained base at most 25), and the checks themselves catch what they are for (a copied
test record, the substring rule's constant answer on answers that contain each other).
Run: python -m pytest -q tests/test_validity.py"""
import json

import pytest

from embedded import benchmark
from scripts import validity


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    benchmark.write_release(str(root), seed=0, sizes=benchmark.Sizes(train=60, test=200))
    return root


def test_the_embedded_benchmark_meets_the_validity_criteria(release):
    rows = validity.main(["--data", str(release), "--no-base"], log=lambda *a: None)
    assert set(rows) == set(benchmark.DATASETS)
    for name, r in rows.items():
        assert r["test"] == 200 and r["overlap"] == 0, name
        assert r["constant"] <= r["chance"] + 10, (name, r)
        assert r["wrong"] <= r["chance"], (name, r)
    assert rows["Flickr30k"]["rule"] == "caption-relative" and rows["DVQA"]["rule"] == "substring"


def test_the_untrained_base_scores_at_most_25_everywhere(release):
    rows = validity.main(["--data", str(release), "--limit", "30"], log=lambda *a: None)
    assert all(r["base"] <= 25 for r in rows.values()), {n: r["base"] for n, r in rows.items()}


def test_a_copied_test_record_is_counted(release, tmp_path):
    # the first test record of DVQA replaced by the first training record: the overlap column counts it
    root = tmp_path / "copy"
    root.mkdir()
    for p in release.rglob("*"):
        if p.is_file():
            (root / p.relative_to(release)).parent.mkdir(parents=True, exist_ok=True)
            (root / p.relative_to(release)).write_bytes(p.read_bytes())
    path = root / "instructions" / "DVQA" / "test.json"
    test = json.loads(path.read_text())
    test[0] = json.loads((root / "instructions" / "DVQA" / "train.json").read_text())[0]
    path.write_text(json.dumps(test))
    rows = validity.main(["--data", str(root), "--no-base", "--limit", "50"], log=lambda *a: None)
    assert rows["DVQA"]["overlap"] == 1 and rows["TabMWP"]["overlap"] == 0


def test_best_constant_finds_the_substring_rules_degenerate_answer():
    class E:                                                   # v9's DVQA answers: 10..80, "0" inside every one
        def __init__(self, a):
            self.answer, self.references = a, None
    examples = [E(str(10 * h)) for h in range(1, 9)] * 5
    score, answer = validity.best_constant("substring", examples)
    assert (score, answer) == (100.0, "0")
    assert validity.chance("substring", examples, __import__("numpy").random.default_rng(0)) < 30


def test_transfer_learns_one_dataset_and_scores_its_training_and_test_records(release):
    out = validity.main(["--data", str(release), "--transfer", "ImageNet-R"], log=lambda *a: None)
    assert set(out) == {"ImageNet-R"} and set(out["ImageNet-R"]) == {"train", "test"}   # no fresh draws: --data
    assert all(0 <= v <= 100 for v in out["ImageNet-R"].values())


def test_transfer_names_an_unknown_dataset(release):
    with pytest.raises(SystemExit, match="--transfer: 'ImageNet' is not a dataset"):
        validity.main(["--data", str(release), "--transfer", "ImageNet"], log=lambda *a: None)
