"""Tests for federated.py: FedAvg, per-subspace aggregation (a client's update never leaves its subspace; SVD
aggregation is the exact mean update), client sampling, the clients' tasks in Hom and Het settings, the learning-rate
schedule and groups, one client's local training under a one-hot gate (through a Harness, as train.py builds it),
and what the two strategies Finetune and Disco answer (layout, routing, gates, report).
Run: python -m pytest -q tests/test_federated.py"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import fcit
from data import Example
from embedded import benchmark
from embedded.base import BaseConfig, build_processor, build_tiny_llava, build_tokenizer
from fcit import fedavg
from federated import (Disco, FedConfig, Finetune, Harness, add_losses, client_state, cosine_lr, local_train,
                       param_groups, round_jobs, sample_clients)
from lora import LoRAConfig, LoRALinear, add_lora, factor_keys, lora_modules
from model import checkpoint_activations, collate, to_device

# C clients, K subspaces, R rank, I d_in, O d_out
C, K, R, I, O = 3, 3, 4, 6, 5
PROJ = "model.multi_modal_projector.linear_1.weight"


def random_state(seed, *, dtype=torch.float32):
    """A state dict shaped like a client's: one LoRA layer with K subspaces and one projector weight."""
    g = torch.Generator().manual_seed(seed)
    return {"layer.A": torch.randn(K, R, I, generator=g, dtype=dtype),                  # (K, R, I)
            "layer.B": torch.randn(K, O, R, generator=g, dtype=dtype),                  # (K, O, R)
            PROJ: torch.randn(O, I, generator=g, dtype=dtype)}


# ---------------------------------------------------------------------------- FedAvg
def test_fedavg_of_identical_float32_states_is_bit_for_bit_the_state():
    s = random_state(0)
    out = fedavg([s, s, s], [1, 2, 7])
    assert all(torch.equal(out[k], s[k]) and out[k].dtype == s[k].dtype for k in s)


def test_fedavg_of_identical_float64_states_is_the_state_to_rounding():
    s = random_state(0, dtype=torch.float64)
    out = fedavg([s, s, s], [1, 2, 7])
    for k in s:
        torch.testing.assert_close(out[k], s[k], rtol=0, atol=1e-15)


def test_fedavg_is_the_sample_count_weighted_mean():
    states, n = [random_state(i) for i in range(C)], [10, 30, 60]
    out = fedavg(states, n)
    for k in states[0]:
        expected = sum(n_i * s[k].double() for n_i, s in zip(n, states)) / sum(n)
        torch.testing.assert_close(out[k].double(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- aggregation per subspace
def aggregate(glob, states, n, subspaces, *, mode):
    """fcit.aggregate with the LoRA factors lora.factor_keys finds, as Finetune.aggregate calls it."""
    return fcit.aggregate(glob, states, n, subspaces, factors=factor_keys(glob), mode=mode)[0]


@pytest.mark.parametrize("mode", ["svd", "ab"])
def test_aggregate_changes_only_the_routed_subspace(mode):
    glob, states = random_state(100), [random_state(i) for i in range(C)]      # clients differ in every subspace
    new = aggregate(glob, states, [5, 3, 2], [1, 1, 1], mode=mode)
    for key in ("layer.A", "layer.B"):
        for k in (0, 2):
            assert torch.equal(new[key][k], glob[key][k]), (key, k)
        assert not torch.equal(new[key][1], glob[key][1]), key


@pytest.mark.parametrize("mode", ["svd", "ab"])
def test_aggregate_uses_only_the_clients_routed_to_each_subspace(mode):
    glob, states, n = random_state(100), [random_state(i) for i in range(C)], [5, 3, 2]
    new = aggregate(glob, states, n, [0, 2, 0], mode=mode)
    # client 1 (subspace 2) moved alone: its subspace 2 is the global one now; clients 0 and 2 never touch it
    alone = aggregate(glob, [states[1]], [n[1]], [2], mode=mode)
    pair = aggregate(glob, [states[0], states[2]], [n[0], n[2]], [0, 0], mode=mode)
    for key in ("layer.A", "layer.B"):
        assert torch.equal(new[key][1], glob[key][1])
        torch.testing.assert_close(new[key][2], alone[key][2], rtol=0, atol=1e-6)
        torch.testing.assert_close(new[key][0], pair[key][0], rtol=0, atol=1e-6)


def test_svd_aggregate_subspace_is_the_weighted_mean_update_when_the_rank_allows():
    glob, states, n = random_state(100), [random_state(i) for i in range(2)], [1, 3]
    for s in states:                        # each client's subspace-1 update has rank R/2: together rank R fits exactly
        s["layer.A"][1, R // 2:] = 0
    new = aggregate(glob, states, n, [1, 1], mode="svd")
    dW = sum(n_i * (s["layer.B"][1].double() @ s["layer.A"][1].double()) for n_i, s in zip(n, states)) / sum(n)
    torch.testing.assert_close((new["layer.B"][1] @ new["layer.A"][1]).double(), dW, rtol=0, atol=1e-5)


def test_ab_aggregate_subspace_averages_each_factor():
    glob, states, n = random_state(100), [random_state(i) for i in range(2)], [1, 3]
    new = aggregate(glob, states, n, [1, 1], mode="ab")
    for key in ("layer.A", "layer.B"):
        expected = (n[0] * states[0][key][1] + n[1] * states[1][key][1]) / sum(n)
        torch.testing.assert_close(new[key][1], expected, rtol=0, atol=1e-6)


def test_aggregate_returns_the_energy_svd_drops_and_ab_drops_none():
    glob, states, n = random_state(100), [random_state(i) for i in range(C)], [5, 3, 2]   # 3 rank-R updates > rank R
    _, dropped = fcit.aggregate(glob, states, n, [1, 1, 1], factors=factor_keys(glob), mode="svd")
    *_, expected = fcit.svd_aggregate([s["layer.A"][1] for s in states], [s["layer.B"][1] for s in states],
                                      torch.tensor(n, dtype=torch.float64), rank=R)
    assert dropped > 0 and dropped == pytest.approx(expected)
    assert fcit.aggregate(glob, states, n, [1, 1, 1], factors=factor_keys(glob), mode="ab")[1] == 0.0


def test_projector_is_fedavged_over_all_clients_whatever_their_subspace():
    glob, states, n = random_state(100), [random_state(i) for i in range(C)], [5, 3, 2]
    new = aggregate(glob, states, n, [0, 2, 1], mode="svd")
    torch.testing.assert_close(new[PROJ], fedavg(states, n)[PROJ], rtol=0, atol=0)


# ---------------------------------------------------------------------------- clients and their tasks
def test_sample_clients_is_deterministic_for_a_seeded_rng():
    a = sample_clients(50, 5, np.random.default_rng(3))
    b = sample_clients(50, 5, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_sample_clients_draws_distinct_valid_ids():
    for seed in range(20):
        c = sample_clients(10, 4, np.random.default_rng(seed))
        assert len(c) == 4 and len(set(c.tolist())) == 4 and all(0 <= int(x) < 10 for x in c)
    # without replacement: asking for every client returns each exactly once
    assert sorted(sample_clients(10, 10, np.random.default_rng(0)).tolist()) == list(range(10))


def test_sample_clients_refuses_more_than_there_are():
    with pytest.raises(ValueError, match=r"--clients-per-round 6 exceeds --clients 5"):
        sample_clients(5, 6, np.random.default_rng(0))


def fake_tasks(setting, num_clients=10):
    """Per task: train examples named '<task>-<i>', and client c owns examples 2c and 2c + 1."""
    tasks = {t: data.TaskData(t, train=[f"{t}-{i}" for i in range(2 * num_clients)]) for t in setting.tasks}
    parts = {t: [np.array([2 * c, 2 * c + 1]) for c in range(num_clients)] for t in setting.tasks}
    return tasks, parts


@pytest.mark.parametrize("name", ["task-hom", "cap-hom"])
def test_round_jobs_give_every_hom_client_the_stages_task(name):
    setting = data.get_setting(name)
    tasks, parts = fake_tasks(setting)
    clients = np.array([7, 0, 3, 9, 4])
    for t in range(setting.num_stages):
        jobs = round_jobs(setting, tasks, parts, t, clients)
        assert [j[0] for j in jobs] == clients.tolist()
        assert all(task == setting.tasks[t] for _, task, _ in jobs)
        assert all(ex == [f"{task}-{2 * c}", f"{task}-{2 * c + 1}"] for c, task, ex in jobs)


@pytest.mark.parametrize("name", ["task-het", "cap-het"])
def test_round_jobs_give_het_clients_the_tasks_of_the_table_row(name):
    setting = data.get_setting(name)
    tasks, parts = fake_tasks(setting)
    clients = np.array([7, 0, 3, 9, 4])
    for t, row in enumerate(setting.client_tasks):
        jobs = round_jobs(setting, tasks, parts, t, clients)
        assert [task for _, task, _ in jobs] == [setting.tasks[i] for i in row]
        assert all(ex == [f"{task}-{2 * c}", f"{task}-{2 * c + 1}"] for c, task, ex in jobs)
    # the paper's first Het row (fcit-paper-notes.md 1.2): ArxivQA, IconQA, OCR-VQA, Flickr30k, FigureQA
    if name == "task-het":
        first = [task for _, task, _ in round_jobs(setting, tasks, parts, 0, clients)]
        assert first == ["ArxivQA", "IconQA", "OCR-VQA", "Flickr30k", "FigureQA"]


# ---------------------------------------------------------------------------- schedule and extra losses
def test_cosine_lr_warms_up_linearly_then_decays_to_zero():
    total, warm = 10, 4
    lr = [cosine_lr(step, total, warm) for step in range(total + 1)]
    assert lr[:warm] == [(s + 1) / warm for s in range(warm)]                # 0.25, 0.5, 0.75, 1.0
    assert lr[warm] == 1.0 and lr[total] == pytest.approx(0.0, abs=1e-12)
    mid = warm + (total - warm) / 2
    assert cosine_lr(mid, total, warm) == pytest.approx(0.5)                 # halfway through the decay


def test_add_losses_sums_the_terms_given_and_skips_the_absent_ones():
    one = lambda model, batch, outputs=None: torch.tensor(1.5)
    two = lambda model, batch, outputs=None: torch.tensor(2.0)
    assert add_losses() is None and add_losses(None, None) is None
    assert add_losses(None, one) is one                                      # a single term is passed through
    assert float(add_losses(one, None, two)(None, None, None)) == 3.5


# ---------------------------------------------------------------------------- a tiny LLaVA with K LoRA subspaces
SYSTEM = BaseConfig.system


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Four examples of two embedded datasets, images written to disk as the loader's Examples point to them."""
    root, rng, out = tmp_path_factory.mktemp("fed"), np.random.default_rng(0), []
    for i, name in enumerate(["IconQA", "IconQA", "OCR-VQA", "OCR-VQA"]):
        img, q, a, _ = benchmark.sample(name, rng)
        img.save(root / f"{i}.png")
        out.append(Example(f"{name}-{i}", str(root / f"{i}.png"), "<image>\n" + q, a))
    return out


def tiny_lora_llava(examples, *, K=K, dropout=0.0):
    tokenizer = build_tokenizer([e.question for e in examples] + [e.answer for e in examples]
                                + [SYSTEM, "user : assistant :"])
    cfg = BaseConfig(width=32, layers=1, heads=4, ffn=64, vision_width=32, vision_layers=1)
    model = build_tiny_llava(tokenizer, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, LoRAConfig(num_subspaces=K, rank=2, dropout=dropout), generator=torch.Generator().manual_seed(0))
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    with torch.no_grad():                   # B != 0, so the loss reaches every factor of an active subspace
        for m in lora_modules(model).values():
            m.B.normal_(0, 0.1)
    return model.eval(), build_processor(tokenizer, cfg)


def harness_of(model, processor):
    """The part of train.make_harness that local training needs: examples -> a batch on the model's device."""
    from data import read_image

    def make_batch(chunk):
        batch = collate(processor, [read_image(e.image) for e in chunk], [e.question for e in chunk],
                        [e.answer for e in chunk], system=SYSTEM)
        return to_device(batch, model.device, model.dtype)
    return Harness(make_batch=make_batch, evaluate=None, encode_text=None)


def test_param_groups_put_the_projector_at_projector_lr_and_the_rest_at_lr(examples):
    model, _ = tiny_lora_llava(examples)
    cfg = FedConfig(lr=1e-3, projector_lr=1e-4)
    by_lr = {g["peak_lr"]: {id(p) for p in g["params"]} for g in param_groups(model, cfg)}
    projector = {id(p) for p in model.model.multi_modal_projector.parameters()}
    lora = {id(p) for m in lora_modules(model).values() for p in (m.A, m.B)}
    assert by_lr == {1e-4: projector, 1e-3: lora}


def test_local_train_with_a_one_hot_gate_changes_only_that_subspace(examples):
    model, processor = tiny_lora_llava(examples)
    before = client_state(model)
    k = 1
    state, loss = local_train(model, harness_of(model, processor), examples,
                              gate=torch.nn.functional.one_hot(torch.tensor(k), K).float(),
                              cfg=FedConfig(batch_size=2, lr=1e-2), rng=np.random.default_rng(0))
    assert math.isfinite(loss) and loss > 0
    lora_keys = [n for n in before if n.endswith(".A") or n.endswith(".B")]
    assert lora_keys and set(state) == set(before)
    for n in lora_keys:
        assert not torch.equal(state[n][k], before[n][k]), n
        for other in set(range(K)) - {k}:
            assert torch.equal(state[n][other], before[n][other]), (n, other)
    # what local_train returns is the model's state after training (the client's update, in memory)
    assert all(torch.equal(v, client_state(model)[n]) for n, v in state.items())


def test_micro_batches_give_the_same_update_as_the_whole_batch(examples):
    """Gradient accumulation is exact: each part's loss is weighted by its share of the batch's answer tokens."""
    states = []
    for micro in (0, 1):
        model, processor = tiny_lora_llava(examples)
        before = client_state(model)
        state, _ = local_train(model, harness_of(model, processor), examples, gate=None,
                               cfg=FedConfig(batch_size=4, micro_batch=micro, lr=1e-2),
                               rng=np.random.default_rng(0))
        states.append(state)
    whole, parts = states
    assert all(not torch.equal(whole[n], before[n]) for n in whole)         # one step moved every tensor
    for n in whole:
        # float32 sums in two orders; Adam's first step (lr 1e-2) turns a gradient's last bits into ~1e-6
        torch.testing.assert_close(parts[n], whole[n], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_changes_no_number_dropout_included(examples):
    """--gradient-checkpointing trades memory for time only: the recomputed forward replays the same LoRA dropout
    draws (torch restores the RNG state), so the client's state is the same to the last bit."""
    states = []
    for checkpointing in (False, True):
        model, processor = tiny_lora_llava(examples, dropout=0.3)
        if checkpointing:
            checkpoint_activations(model)
        torch.manual_seed(0)
        state, _ = local_train(model, harness_of(model, processor), examples, gate=None,
                               cfg=FedConfig(batch_size=2, lr=1e-2), rng=np.random.default_rng(0))
        states.append(state)
    plain, recomputed = states
    before = client_state(tiny_lora_llava(examples)[0])
    assert all(not torch.equal(plain[n], before[n]) for n in plain)
    assert all(torch.equal(recomputed[n], plain[n]) for n in plain)


def gated_layer_model(K=2):
    """The smallest model with LoRA: one LoRALinear, enough for the strategies."""
    return nn.Sequential(LoRALinear(nn.Linear(3, 3), num_subspaces=K, rank=1, alpha=1.0))


# ---------------------------------------------------------------------------- the strategies
def test_every_method_here_splits_the_same_total_rank():
    assert Finetune.lora_layout(rank=16, subspace_rank=2, num_stages=8) == (1, 16)
    assert Disco.lora_layout(rank=16, subspace_rank=2, num_stages=8) == (8, 2)
    assert Disco.lora_layout(rank=64, subspace_rank=8, num_stages=4) == (8, 8)    # K_max does not follow the stages


def test_disco_refuses_a_rank_its_subspaces_do_not_divide():
    with pytest.raises(ValueError, match="rank 10 is not a multiple of subspace_rank 4"):
        Disco.lora_layout(rank=10, subspace_rank=4, num_stages=8)


def test_disco_counts_its_subspaces_from_the_lora_layers():
    model = gated_layer_model(K=5)
    assert Disco(model, None, FedConfig()).num_subspaces() == 5
    assert Disco(model, None, FedConfig()).open_subspaces() == 0 and Finetune(model, None, FedConfig()).open_subspaces() is None


def one_hot_features(questions):
    """A frozen 'encoder' for the routing test: the question's first word picks a direction."""
    words = {"red": 0, "blue": 1, "green": 2}
    return torch.nn.functional.one_hot(torch.tensor([words[q.split()[0]] for q in questions]), 4).float()


def test_disco_routes_clients_by_identity_token_and_logs_routing_as_detail():
    model = gated_layer_model(K=2)
    harness = Harness(make_batch=None, evaluate=None, encode_text=one_hot_features)
    log, detail = [], []
    disco = Disco(model, harness, FedConfig(), log=log.append, detail=detail.append)
    ex = lambda word: [Example("x", "img", f"{word} question", "a")]
    jobs = [(3, "R", ex("red")), (5, "B", ex("blue")), (1, "R", ex("red")), (4, "G", ex("green"))]
    assert disco.assign(0, 0, jobs) == [0, 1, 0, 0]                              # green finds the cache full
    assert disco.open_subspaces() == 2 and disco.cache.counts.tolist() == [3, 1]
    # routing of each client is --verbose detail; a client that had to join a subspace it does not match is said
    assert [line.split(":")[0] for line in detail] == ["  DKO client 3", "  DKO client 5", "  DKO client 1"]
    assert len(log) == 1 and "client 4" in log[0] and "cap of 2 subspaces" in log[0]
    # the test gate of a red question is (nearly) all on subspace 0: SSA recovers the subspace its task trained
    gate = disco.eval_gate(ex("red") + ex("blue"))
    assert gate.shape == (2, 2) and gate.argmax(-1).tolist() == [0, 1] and float(gate[0, 0]) > 0.99


@pytest.mark.parametrize("rule, expected", [("every-round", [1, 2]), ("first-round", [1, 0])])
def test_disco_passes_the_round_to_its_opening_rule(rule, expected):
    harness = Harness(make_batch=None, evaluate=None, encode_text=one_hot_features)
    disco = Disco(gated_layer_model(K=4), harness, FedConfig(), hp=fcit.DiscoConfig(open=rule))
    ex = lambda word: [Example("x", "img", f"{word} question", "a")]
    assert disco.assign(0, 0, [(0, "R", ex("red")), (1, "B", ex("blue"))]) == [0, 1]
    # round 1 of the stage: green matches nothing (cos 0 to both); it opens a subspace where every round may open,
    # and joins the nearest (the first of a tie) where only the first round may
    assert disco.assign(0, 1, [(2, "B", ex("blue")), (3, "G", ex("green"))]) == expected
    # the next stage's first round: green has its own subspace 2 under both rules (joined, or opened now)
    assert disco.assign(1, 0, [(4, "G", ex("green"))]) == [2]


def test_disco_gates_nothing_before_any_subspace_is_open():
    disco = Disco(gated_layer_model(K=3), None, FedConfig())
    assert torch.equal(disco.eval_gate([None, None]), torch.zeros(2, 3))


def test_disco_report_own_gate_is_the_final_gate_on_the_tasks_routed_subspaces():
    history = {"gates": [{"A": [1.0, 0.0, 0.0]}, {"A": [0.7, 0.2, 0.1], "B": [0.1, 0.15, 0.75]}],
               "routes": {"A": [0], "B": [2, 1]}}
    report = Disco(gated_layer_model(K=3), None, FedConfig()).report(history)
    assert report["gates"] == history["gates"][-1] and report["routes"] == history["routes"]
    assert report["own_gate"] == {"A": 0.7, "B": round(0.75 + 0.15, 4)}
    assert Disco(gated_layer_model(K=3), None, FedConfig()).report({"gates": [], "routes": {}}) == {}


def test_finetune_trains_subspace_zero_reports_nothing_and_trains_only_routed_subspaces():
    model = gated_layer_model(K=1)
    ft = Finetune(model, None, FedConfig())
    assert ft.assign(0, 0, [None, None, None]) == [0, 0, 0] and ft.train_gate(0).tolist() == [1.0]
    assert ft.eval_gate([None]) is None and ft.report({"gates": [], "routes": {}}) == {}
    assert ft.trained_subspaces([0, 0]) == {0} and Disco(model, None, FedConfig()).trained_subspaces([2, 0, 2]) == {0, 2}
