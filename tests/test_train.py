"""End-to-end runs of train.py on the tiny preset: every setting and method, the outputs, the printed progress, the
flags and their defaults, errors, determinism, and resuming after a crash mid-stage. The runs are made once per
session (conftest.tiny_run) and shared by the tests that read them.
Run: python -m pytest -q tests/test_train.py"""
import contextlib
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fcit
import metrics
import train
from baselines.ewc import EWCConfig
from baselines.server import ServerConfig
from config.run import METHODS, PRESETS
from embedded.base import BaseConfig
from federated import FedConfig
from lora import LoRALinear
from storage.checkpoint import CHECKPOINT
from storage.results import CELL_H, CELL_W, PAD, draw_matrix

SETTINGS = ["task-hom", "task-het", "cap-hom", "cap-het"]
PRESET = PRESETS["tiny"]
ONE_STAGE = ("zeroshot", "mtl")                                  # evaluated once, on every task
# task-hom's runs take 2 rounds a stage: they are also the uninterrupted runs the resume tests compare with
# (test_baselines.py, and --server fedadam in test_server.py), and a crash can then fall mid-stage
ROUNDS = {"task-hom": ["--rounds", "2"]}


def flags(setting, method):
    return ["--setting", setting, "--method", method, *ROUNDS.get(setting, [])]


def grid(path, rows, cols):
    """The cells of a heatmap that storage.results.draw_matrix drew: the block at its bottom right (labels and title are
    above and to the left of it)."""
    with Image.open(path) as img:
        W, H = img.size
        P, w, h = PAD, CELL_W, CELL_H
        return np.asarray(img.convert("RGB").crop((W - P - cols * w, H - P - rows * h, W - P, H - P)))


# ---------------------------------------------------------------------------- every setting and method
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", METHODS)
def test_every_setting_and_method_runs(tiny_run, tmp_path, setting, method):
    run = tiny_run(*flags(setting, method))
    on_disk, s = run.results(), train.get_setting(setting)
    assert on_disk == json.loads(json.dumps(run.res))              # results.json is what main returned
    assert on_disk["setting"] == setting and on_disk["method"] == method and on_disk["tasks"] == s.tasks
    for key in ("beta", "seed", "tasks", "acc", "last", "avg", "forgetting", "wall_seconds", "config"):
        assert key in on_disk
    continual = method not in ONE_STAGE
    stages = s.num_stages if continual else 1
    assert len(on_disk["acc"]) == stages
    # after stage t the tasks seen so far are evaluated (zeroshot and mtl: every task, once)
    assert [list(a) for a in on_disk["acc"]] == ([s.seen_tasks(t) for t in range(stages)] if continual else [s.tasks])
    assert all(0 <= v <= 100 for row in on_disk["acc"] for v in row.values())
    assert on_disk["last"] == pytest.approx(np.mean(list(on_disk["acc"][-1].values())), abs=0.01)
    # accuracy.png is the heatmap of this accuracy matrix: its cells are those draw_matrix draws for it
    matrix = metrics.accuracy_matrix(on_disk["acc"], s.tasks)                     # nan where not seen yet
    draw_matrix(tmp_path / "expected.png", matrix, [f"stage {t + 1}" for t in range(stages)], s.tasks,
                        title="expected")
    assert np.array_equal(grid(run.out / "accuracy.png", stages, len(s.tasks)),
                          grid(tmp_path / "expected.png", stages, len(s.tasks)))
    # the partition: every task's training examples, each given to exactly one of the clients
    config = run.cfg
    assert (config.setting, config.method, config.preset) == (setting, method, "tiny")
    rounds = config.fed.rounds if continual else 0
    assert len([line for line in run.lines if line.startswith("stage ") and " round " in line]) == stages * rounds
    parts = json.loads((run.out / "partition.json").read_text())
    for task in s.tasks:
        size = min(config.train_limit, config.train_examples) * len(s.datasets[task])
        assert len(parts[task]) == config.fed.num_clients
        assert sorted(i for client in parts[task] for i in client) == list(range(size))
    assert json.loads((run.out / "config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(config)))
    if continual:
        assert run.progress() == (stages, 0)                      # the last checkpoint: every stage done
    else:
        assert not (run.out / CHECKPOINT).exists()
    if method == "disco":
        # DKO opened subspaces 0..K-1 and every one of them was trained by some task's clients
        K = on_disk["subspaces"][-1]
        assert len(on_disk["subspaces"]) == stages and (run.out / "activation.png").exists()
        assert sorted(set().union(*on_disk["routes"].values())) == list(range(K))
        assert on_disk["subspaces"] == sorted(on_disk["subspaces"]) and K <= config.rank // config.subspace_rank
    else:
        assert on_disk["subspaces"] is None and not (run.out / "activation.png").exists()


def test_results_follow_the_metric_definitions(tiny_run, tmp_path):
    run = tiny_run("--setting", "task-het", "--method", "finetune")
    setting = train.get_setting("task-het")
    assert list(run.res["acc"][0]) == setting.seen_tasks(0)
    assert {k: run.res[k] for k in ("last", "avg", "forgetting", "mean_forgetting", "bwt")} == \
           metrics.summarize(run.res["acc"])
    # the tiny runs score 0 everywhere, so the definitions are checked on what write_results makes of real numbers:
    # task j after stage t scores 10 t + j where seen (Het: tasks recur and are first seen at any stage)
    acc = [{task: 10.0 * t + j for j, task in enumerate(setting.tasks) if task in setting.seen_tasks(t)}
           for t in range(setting.num_stages)]
    history = {"acc": acc, "acc_datasets": acc, "subspaces": []}
    res = train.write_results(str(tmp_path), run.cfg, setting, history, {}, 1.0, lambda *a: None, inputs={})
    assert res == json.loads((tmp_path / "results.json").read_text())
    assert res["acc"] == acc
    # Last: the mean over all tasks after the final stage; Avg: the mean over stages of the mean over seen tasks
    assert res["last"] == pytest.approx(np.mean(list(acc[-1].values())), abs=0.01)
    assert res["avg"] == pytest.approx(np.mean([np.mean(list(a.values())) for a in acc]), abs=0.01)
    # forgetting of a task: its best score before the final stage minus its final score (here it only improves)
    final = {j: max(a[j] for a in acc[:-1] if j in a) - acc[-1][j] for j in acc[-2]}
    assert res["forgetting"] == pytest.approx(final, abs=0.01) and all(v < 0 for v in final.values())
    assert res["mean_forgetting"] == pytest.approx(np.mean(list(final.values())), abs=0.01)


def test_disco_reports_own_gate_as_the_final_gate_on_its_routed_subspaces(tiny_run):
    run = tiny_run(*flags("task-hom", "disco"))
    res, K = run.res, train.lora_layout(run.cfg)[0]
    assert set(res["gates"]) == set(res["own_gate"]) == set(res["routes"]) == set(res["tasks"])
    for task, gate in res["gates"].items():
        assert len(gate) == K
        assert sum(gate) == pytest.approx(1.0, abs=1e-3)          # softmax over the open subspaces, 0 elsewhere
        assert res["own_gate"][task] == pytest.approx(sum(gate[k] for k in res["routes"][task]), abs=1e-4)


def test_same_seed_same_numbers(tiny_run):
    a, b = tiny_run(*flags("task-hom", "disco")), tiny_run(*flags("task-hom", "disco"), name="again")
    assert a.out != b.out
    assert a.res["acc"] == b.res["acc"] and a.res["subspaces"] == b.res["subspaces"]
    assert a.res["gates"] == b.res["gates"] and a.res["routes"] == b.res["routes"]
    assert (a.out / "partition.json").read_text() == (b.out / "partition.json").read_text()
    x, y = (load_file(run.out / CHECKPOINT) for run in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------- what a run prints
ROUND = re.compile(r"stage (\d+)/(\d+) round (\d+)/(\d+) \| loss \d+\.\d{3}( \| subspaces \[[\d, ]*\] trained, "
                   r"\d+ opened \(\d+ open\))? \| \S+ elapsed, ETA \S+( \+ evaluation)?")
EVALUATED = re.compile(r"  evaluated (\d+)/(\d+) \S+: \d+\.\d \(\d+ questions, \d+\.\ds\)")
AFTER_STAGE = re.compile(r"after stage (\d+): .* \| mean \d+\.\d")
START = re.compile(r"trainable: LoRA [\d,]+ \(\d+ x rank \d+ on \d+ FFN projections of the language model\), "
                   r"projector [\d,]+(, other [\d,]+)?; frozen [\d,]+")
SUMMARY = re.compile(r"accuracy matrix \(rows.*|stage( +\S+)+|\s+\d+( +(\d+\.\d|-))+|Last \d+\.\d\d  Avg .*|wrote .*")
ONCE = re.compile(r"generating the embedded benchmark into .*|pretraining the tiny base model into .*|"
                  r"pretrain step \d+/\d+ .*")          # the session's first run makes the cache
CLIENT = re.compile(r"  client +\d+ \[\S+, \d+ ex, subspace \d+\] loss \d+\.\d{3}")
DKO = re.compile(r"  DKO client \d+: (opened|joined) subspace \d+ .*\[\S+\]")
SVD = re.compile(r"  svd aggregation dropped .*")


def kinds(lines):
    """Each line's kind; 'other' for a line no pattern knows."""
    named = (("start", START), ("round", ROUND), ("evaluated", EVALUATED), ("after", AFTER_STAGE), ("summary", SUMMARY),
             ("once", ONCE), ("client", CLIENT), ("dko", DKO), ("svd", SVD))
    return [next((k for k, p in named if p.fullmatch(line)), "other") for line in lines]


def test_default_output_is_one_line_per_round_then_the_evaluation(tiny_run):
    setting = train.get_setting("cap-hom")
    run = tiny_run("--setting", "cap-hom", "--method", "disco")
    k = kinds(run.lines)
    assert "other" not in k, [line for line, kind in zip(run.lines, k) if kind == "other"]
    assert not {"client", "dko", "svd"} & set(k)                   # no per-client detail without --verbose
    assert k.count("start") == 1 and k.index("start") < k.index("round")   # what trains, once, before training
    rounds = [ROUND.fullmatch(line).groups()[:4] for line in run.lines if ROUND.fullmatch(line)]
    R = PRESET["fed"]["rounds"]
    assert rounds == [(str(t + 1), "4", str(r + 1), str(R)) for t in range(4) for r in range(R)]
    assert k.count("evaluated") == sum(len(setting.seen_tasks(t)) for t in range(4))
    assert [AFTER_STAGE.fullmatch(line).group(1) for line in run.lines if AFTER_STAGE.fullmatch(line)] == \
           ["1", "2", "3", "4"]


def test_verbose_adds_each_clients_line_and_its_routing_and_changes_no_result(tiny_run):
    quiet = tiny_run("--setting", "cap-hom", "--method", "disco")
    loud = tiny_run("--setting", "cap-hom", "--method", "disco", "--verbose")
    k = kinds(loud.lines)
    assert "other" not in k, [line for line, kind in zip(loud.lines, k) if kind == "other"]
    clients = 4 * PRESET["fed"]["rounds"] * PRESET["fed"]["clients_per_round"]
    assert k.count("client") == k.count("dko") == clients and k.count("svd") == 4 * PRESET["fed"]["rounds"]
    assert [kind for kind in k if kind not in ("client", "dko", "svd", "once")] == \
           [kind for kind in kinds(quiet.lines) if kind != "once"]
    assert loud.res["acc"] == quiet.res["acc"] and loud.res["routes"] == quiet.res["routes"]
    x, y = (load_file(run.out / CHECKPOINT) for run in (quiet, loud))            # the same model, bit for bit
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------- flags
def test_every_flag_default_is_its_dataclass_field():
    args = train.parse_args([])
    assert all(v is None for k, v in vars(args).items() if k not in ("fresh", "verbose"))
    assert train.resolve(args) == train.RunConfig()
    assert train.resolve(args).fed == FedConfig() and train.resolve(args).disco == fcit.DiscoConfig()
    assert train.resolve(args).server == ServerConfig() and train.resolve(args).system == BaseConfig.system


def test_a_preset_sets_its_fields_and_keeps_the_other_defaults():
    fed, ewc = PRESET["fed"], PRESET["ewc"]
    expected = train.RunConfig(**{k: v for k, v in PRESET.items() if k not in ("fed", "ewc")}, preset="tiny",
                               fed=FedConfig(**fed), ewc=EWCConfig(**ewc))
    cfg = train.resolve(train.parse_args(["--preset", "tiny"]))
    assert cfg == expected and cfg.ewc.fisher_examples == 4 and cfg.ewc.lam == EWCConfig().lam   # a method's config


@pytest.mark.parametrize("flags, field, value", [
    (["--threshold", "0"], ("disco", "threshold"), 0.0),              # was `args.threshold or 0.9`
    (["--threshold", "-1"], ("disco", "threshold"), -1.0),
    (["--mu", "0"], ("server", "mu"), 0.0),
    (["--lr", "0.01", "--rounds", "3"], ("fed", "lr"), 0.01),
    (["--aggregate", "ab"], ("fed", "aggregate"), "ab"),
    (["--open", "first-round"], ("disco", "open"), "first-round"),
    (["--seed", "3"], ("seed",), 3),
    (["--lora-dropout", "0"], ("lora_dropout",), 0.0),
    (["--parallel", "balanced"], ("parallel",), "balanced"),
    (["--gradient-checkpointing"], ("gradient_checkpointing",), True),
    (["--preset", "paper", "--gradient-checkpointing"], ("gradient_checkpointing",), True),   # the preset has it off
    (["--preset", "paper", "--no-gradient-checkpointing"], ("gradient_checkpointing",), False),
])
def test_a_flag_given_reaches_its_config_field_also_when_falsy(flags, field, value):
    cfg = train.resolve(train.parse_args(flags))
    for name in field:
        cfg = getattr(cfg, name)
    assert cfg == value


def test_open_defaults_to_the_disco_config_field():
    assert train.resolve(train.parse_args([])).disco.open == fcit.DiscoConfig.open


@pytest.mark.parametrize("flags, aggregate", [
    ([], "svd"), (["--method", "finetune"], "svd"), (["--aggregate", "ab"], "ab"),
    (["--method", "ewc"], "ab"), (["--method", "ewc", "--aggregate", "ab"], "ab"),  # EWC's state: factor coordinates
    (["--server", "fedadam"], "ab"), (["--server", "fedprox"], "svd"),             # a stateful server's moments too
])
def test_aggregate_left_out_is_the_methods_choice(flags, aggregate):
    assert train.resolve(train.parse_args(flags)).fed.aggregate == aggregate


def test_ewc_under_svd_is_refused_naming_the_flag_and_why():
    with pytest.raises(ValueError, match=r"--method ewc keeps its anchor and Fisher .* --aggregate svd re-factors "
                                         r"every round.*pass --aggregate ab"):
        train.resolve(train.parse_args(["--method", "ewc", "--aggregate", "svd"]))


def test_methods_are_the_strategies_table():
    assert METHODS == list(train.STRATEGIES)
    assert {"disco", "finetune", "mtl", "zeroshot", "ewc", "lwf", "olora", "moelora"} == set(METHODS)


@pytest.mark.parametrize("flags, message", [
    (["--setting", "task-xyz"], "--setting"),
    (["--method", "nope"], "--method"),
    (["--beta", "0"], "--beta"),
    (["--beta", "-1"], "--beta"),
    (["--clients", "1000"], "clients"),
    (["--threshold", "1.5"], "--threshold"),
])
def test_bad_flags_fail_before_training(tiny_cache, tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        train.main(["--preset", "tiny", "--out", str(out), *flags], log=lambda *a: None)
    assert not out.exists()                                         # stopped before anything was written


# ---------------------------------------------------------------------------- checkpoints
def test_resume_after_a_crash_mid_stage_gives_the_same_results(tiny_run, crash_and_resume, tmp_path):
    full = tiny_run(*flags("task-hom", "finetune"))
    assert full.cfg.fed.rounds == 2
    # checkpoints 1, 2: stage 1's rounds; 3: stage 1 evaluated; 4: stage 2 round 1, where the machine dies
    resumed, died = crash_and_resume(flags("task-hom", "finetune"), crash_at=4, out=tmp_path / "crash")
    assert died == (1, 1)                                          # next: stage 2 (index 1), its round 2 (index 1)
    assert sum(line.startswith("resuming from") for line in resumed.lines) == 1
    # it trained only the rounds left: stage 2 round 2 and the 6 stages after it
    assert [line.split(" |")[0] for line in resumed.lines if ROUND.fullmatch(line)] == \
           [f"stage {t + 1}/8 round {r + 1}/2" for t in range(1, 8) for r in range(2)][1:]
    assert resumed.progress() == (8, 0)
    assert resumed.res["acc"] == full.res["acc"]
    a, b = (load_file(run.out / CHECKPOINT) for run in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_config_is_refused(tiny_run, copy_run):
    run = tiny_run(*flags("task-hom", "finetune"))
    out = copy_run(run)
    with pytest.raises(ValueError, match=re.escape(str(out / CHECKPOINT)) + r": a checkpoint of another run \(.*seed: 0 -> 1"):
        train.main([*run.argv, "--seed", "1", "--out", str(out)], log=lambda *a: None)


def test_lora_goes_on_the_language_models_ffn_only_and_the_projector_trains_in_every_family():
    # a tiny random Qwen2.5-VL: its vision blocks have gate_proj / up_proj / down_proj too, which must stay frozen
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]), image_token_id=290, video_token_id=291,
        vision_start_token_id=292))
    cfg = train.resolve(train.parse_args(["--preset", "tiny", "--method", "disco"]))
    counts = train.adapt(qwen, cfg)
    wrapped = [n for n, m in qwen.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == [f"model.language_model.layers.{i}.mlp.{p}" for i in range(2)
                       for p in ("gate_proj", "up_proj", "down_proj")]
    assert not any(isinstance(m, LoRALinear) for m in qwen.model.visual.blocks.modules())
    trainable = {n for n, p in qwen.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.endswith((".A", ".B"))} == \
           {n for n, _ in qwen.model.visual.merger.named_parameters(prefix="model.visual.merger")}
    assert counts["projector"] == sum(p.numel() for p in qwen.model.visual.merger.parameters())
    K, R = train.lora_layout(cfg)
    assert counts["lora"] == sum(K * R * (m.in_features + m.out_features) for n, m in qwen.named_modules()
                                 if n in {w + ".base" for w in wrapped})


def test_answer_lengths_give_each_task_room_for_its_longest_training_answer_up_to_the_cap(monkeypatch):
    """Evaluation generates at most ceil(1.5 x the task's longest training answer) + 4 tokens, never more than
    max_new_tokens: a one-word task stops a rambling row early, a caption task keeps room for its captions."""
    from data import Example, TaskData

    def ex(answer):
        return Example(id=answer, image="", question="q", answer=answer)

    def tokenizer(texts, add_special_tokens):
        return {"input_ids": [t.split() for t in texts]}
    word, caption = [ex("yes"), ex("no")], [ex("a red kite in the sky"), ex("two dogs")]
    data = {"W": TaskData("W", train=word, test={"W1": [ex("yes")]}),
            "C": TaskData("C", train=caption, test={"C1": [ex("x")], "C2": [ex("y")]})}
    lengths = metrics.answer_lengths(data, tokenizer, cap=12)
    assert lengths[id(data["W"].test["W1"][0])] == 6                  # ceil(1.5 * 1) + 4
    assert [lengths[id(e)] for e in data["C"].test["C1"] + data["C"].test["C2"]] == [12, 12]  # ceil(1.5*6)+4 = 13
    assert metrics.answer_lengths(data, tokenizer, cap=64)[id(data["C"].test["C1"][0])] == 13
    asked = []
    monkeypatch.setattr(train, "generate", lambda *a, max_new_tokens, **k: asked.append(max_new_tokens) or ["a"])
    monkeypatch.setattr(train, "images_of", lambda examples, processor: [])
    monkeypatch.setattr(train, "gated", lambda model, gate: contextlib.nullcontext())
    answer = train.answerer(None, None, train.RunConfig(), lengths)
    answer(data["W"].test["W1"], None), answer([ex("unseen")], None)
    assert asked == [6, FedConfig.max_new_tokens]                   # an example of no task: the cap
