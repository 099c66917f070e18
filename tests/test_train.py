"""End-to-end smoke runs of train.py on the tiny preset: every setting and method, outputs, errors, determinism,
and resuming after a crash mid-stage."""
import json

import numpy as np
import pytest
from PIL import Image

import train

SETTINGS = ["task-hom", "task-het", "cap-hom", "cap-het"]


def run(tmp_path, *flags, name="out"):
    out = tmp_path / name
    res = train.main(["--preset", "tiny", "--out", str(out), *flags], log=lambda *a: None)
    return res, out


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", train.METHODS)
def test_every_setting_and_method_runs(tiny_cache, tmp_path, setting, method):
    res, out = run(tmp_path, "--setting", setting, "--method", method)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["setting"] == setting and on_disk["method"] == method
    for key in ("beta", "seed", "tasks", "acc", "last", "avg", "forgetting", "wall_seconds", "config"):
        assert key in on_disk
    stages = 1 if method in ("zeroshot", "mtl") else train.get_setting(setting).num_stages
    assert len(on_disk["acc"]) == stages
    assert all(0 <= v <= 100 for row in on_disk["acc"] for v in row.values())
    assert Image.open(out / "accuracy.png").size[0] > 100
    assert (out / "partition.json").exists() and (out / "config.json").exists()
    if method == "disco":
        assert len(on_disk["subspaces"]) == stages and (out / "activation.png").exists()


def test_results_follow_the_metric_definitions(tiny_cache, tmp_path):
    res, _ = run(tmp_path, "--setting", "task-het", "--method", "finetune")
    acc = res["acc"]
    assert res["last"] == pytest.approx(np.mean(list(acc[-1].values())), abs=0.01)
    assert res["avg"] == pytest.approx(np.mean([np.mean(list(a.values())) for a in acc]), abs=0.01)
    assert list(acc[0]) == train.get_setting("task-het").seen_tasks(0)


def test_same_seed_same_numbers(tiny_cache, tmp_path):
    a, _ = run(tmp_path, "--method", "disco", name="a")
    b, _ = run(tmp_path, "--method", "disco", name="b")
    assert a["acc"] == b["acc"] and a["subspaces"] == b["subspaces"]


def test_resume_after_a_crash_mid_stage_gives_the_same_results(tiny_cache, tmp_path, monkeypatch):
    full, _ = run(tmp_path, "--method", "finetune", "--rounds", "2", name="full")
    calls = {"n": 0}
    real = train.checkpoint

    def crashing(out, cfg_json):
        save = real(out, cfg_json)

        def on_round(p, strategy):
            save(p, strategy)
            calls["n"] += 1
            if calls["n"] == 3:                                   # stage 2, round 1 saved, then the machine dies
                raise KeyboardInterrupt
        return on_round
    monkeypatch.setattr(train, "checkpoint", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--method", "finetune", "--rounds", "2", name="crash")
    monkeypatch.setattr(train, "checkpoint", real)
    resumed, out = run(tmp_path, "--method", "finetune", "--rounds", "2", name="crash")
    assert json.loads((out / "checkpoint.json").read_text())["stage"] == 8
    assert resumed["acc"] == full["acc"]


def test_a_checkpoint_of_another_config_is_refused(tiny_cache, tmp_path):
    run(tmp_path, "--method", "finetune", name="x")
    with pytest.raises(ValueError, match="different configuration"):
        run(tmp_path, "--method", "finetune", "--seed", "1", name="x")


@pytest.mark.parametrize("flags, message", [
    (["--setting", "task-xyz"], "--setting"),
    (["--method", "nope"], "--method"),
    (["--beta", "0"], "--beta"),
    (["--beta", "-1"], "--beta"),
    (["--clients", "1000"], "clients"),
])
def test_bad_flags_fail_before_training(tiny_cache, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, *flags)
    assert not (tmp_path / "out" / "results.json").exists()
