"""Tests for scripts/ask.py: a finished run's folder loads as its final model (LoRA subspaces, projector, DISCO's
token cache), evaluates exactly as the run did at its end, and answers one question with its gate; a base whose
weights changed is named. Run: python -m pytest -q tests/test_ask.py"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import metrics
import train
from data import rules
from embedded import benchmark
from federated import client_state, strip_prefix
from lora import split_factor
from scripts import ask


def test_a_loaded_run_evaluates_its_test_sets_exactly_as_the_run_did_at_its_end(tiny_run):
    run = tiny_run()                                                    # DISCO, task-hom, the tiny preset
    model, processor, strategy, cfg = ask.load_run(str(run.out))
    root, _ = train.prepare(cfg, log=lambda *a: None)
    setting, data, _ = train.load_data(cfg, root)
    harness = train.make_harness(model, processor, data, cfg, lambda *a: None, rules=rules(root, metrics.RULES))
    acc, acc_datasets, gates = harness.evaluate(setting.tasks, strategy)
    assert acc == run.res["acc"][-1] and acc_datasets == run.res["acc_datasets"][-1]
    assert gates == run.res["gates"]                                    # DISCO's token cache came back too
    # and the answers came from the trained subspaces, not from the base's zero-initialized B
    saved = strip_prefix(load_file(str(run.out / "checkpoint.safetensors")), "global.")
    now = client_state(model)
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    assert any((split_factor(k) or ("", ""))[1] == "B" and v.abs().sum() > 0 for k, v in now.items())


def test_ask_answers_a_question_about_an_image_with_the_gate_over_subspaces(tiny_run, tmp_path):
    run = tiny_run()
    image = tmp_path / "q.png"
    benchmark.render(benchmark.Scene("black", "shape", "red", shape="circle")).save(image)
    lines = []
    answer, gate = ask.main([str(run.out), "--image", str(image), "--question", "what object is depicted ?"],
                            log=lines.append)
    assert isinstance(answer, str) and f"answer: {answer}" in lines
    K = train.lora_layout(run.cfg)[0]
    assert len(gate) == K and abs(sum(gate) - 1) < 1e-4                 # SSA: a softmax over the open subspaces


def test_a_base_whose_weights_changed_is_named(tiny_run, tmp_path):
    run = tiny_run()
    out = tmp_path / "run"
    shutil.copytree(run.out, out)
    res = json.loads((out / "results.json").read_text())
    res["base_sha256"] = "0" * 64
    (out / "results.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match="its weights are not the ones"):
        ask.load_run(str(out))


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ask.load_run(str(tmp_path))


def test_gates_scores_every_task_under_three_gates_and_its_softmax_row_is_the_runs(tiny_run):
    run = tiny_run()
    out = ask.main([str(run.out), "--gates"], log=lambda *a: None)
    assert set(out) == set(run.res["tasks"])
    assert {t: v["softmax"] for t, v in out.items()} == run.res["acc"][-1]      # the gate the run evaluated with
    assert all(set(v) == {"softmax", "argmax", "own", "learned"} for v in out.values())


def test_gates_refuses_a_method_without_routes(tiny_run):
    run = tiny_run("--method", "finetune")
    with pytest.raises(ValueError, match="needs a gated method's run"):
        ask.main([str(run.out), "--gates"], log=lambda *a: None)
