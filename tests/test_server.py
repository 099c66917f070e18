"""Tests for baselines/server.py: each server's one-step update against numbers computed by hand (Reddi et al. 2021,
Algorithm 2), subspaces no client trained stay exactly unchanged, FedProx's term, the wrapper strategy that
train.make_strategy puts on top of a method (and only when --server is not fedavg), the flag rules, and every
--server end to end on one setting (the four settings are the end-to-end tests of test_train.py).
Run: python -m pytest -q tests/test_server.py"""
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import fcit
import train
from baselines import server
from baselines.server import SERVERS, STATEFUL, ServerConfig, ServerOptimizer, proximal_loss, step, subspace_mask
from federated import Disco, FedConfig, Finetune
from lora import LoRALinear, factor_keys

X = {"w": torch.tensor([1.0, -2.0])}
AGG = {"w": torch.tensor([1.5, -2.2])}  # Delta = [0.5, -0.2]
D = [0.5, -0.2]
B1, B2, TAU = 0.9, 0.99, 1e-3


def one_step(name, **kw):
    new, state = step(X, AGG, {}, {}, ServerConfig(name, **kw))
    return new["w"], state


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_servers_take_the_aggregate_as_is(name):
    new, state = one_step(name)
    assert torch.equal(new, AGG["w"]) and state == {}


def test_fedavgm_one_and_two_steps():
    new, state = one_step("fedavgm", lr=1.0)
    # m = Delta, x = x + m
    torch.testing.assert_close(new, torch.tensor([1.5, -2.2]))
    torch.testing.assert_close(state["m.w"], torch.tensor(D))
    # second round: Delta' = [0.1, 0.1]; m = 0.9 m + Delta' = [0.55, -0.08]; x = x + m
    new2, _ = step({"w": new}, {"w": new + 0.1}, state, {}, ServerConfig("fedavgm", lr=1.0))
    torch.testing.assert_close(new2["w"], torch.tensor([1.5 + 0.55, -2.2 - 0.08]))


@pytest.mark.parametrize("name, v_by_hand", [
    ("fedadagrad", [TAU ** 2 + 0.25, TAU ** 2 + 0.04]),                          # v = v0 + Delta^2
    ("fedadam", [B2 * TAU ** 2 + (1 - B2) * 0.25, B2 * TAU ** 2 + (1 - B2) * 0.04]),  # v = b2 v0 + (1-b2) Delta^2
    ("fedyogi", [TAU ** 2 + (1 - B2) * 0.25, TAU ** 2 + (1 - B2) * 0.04]),       # v0 < Delta^2: v += (1-b2) Delta^2
])
def test_adaptive_servers_one_step(name, v_by_hand):
    eta = 0.01
    new, state = one_step(name, lr=eta)
    m = [(1 - B1) * 0.5, (1 - B1) * -0.2]  # m = b1 * 0 + (1 - b1) Delta
    x = [1.0 + eta * m[0] / (math.sqrt(v_by_hand[0]) + TAU), -2.0 + eta * m[1] / (math.sqrt(v_by_hand[1]) + TAU)]
    torch.testing.assert_close(state["m.w"], torch.tensor(m))
    torch.testing.assert_close(state["v.w"], torch.tensor(v_by_hand))
    torch.testing.assert_close(new, torch.tensor(x))


def test_yogi_shrinks_v_additively_when_it_exceeds_delta_squared():
    state = {"m.w": torch.zeros(2), "v.w": torch.tensor([1.0, 1.0])}
    _, new_state = step(X, AGG, state, {}, ServerConfig("fedyogi"))
    # v > Delta^2: v = v - (1 - b2) Delta^2 (Adam would decay it to b2 v + (1 - b2) Delta^2)
    torch.testing.assert_close(new_state["v.w"], torch.tensor([1.0 - 0.01 * 0.25, 1.0 - 0.01 * 0.04]))


@pytest.mark.parametrize("name", STATEFUL)
def test_subspaces_no_client_trained_stay_exactly_unchanged(name):
    # a LoRA layer with K = 2 subspaces and a projector; round 1 trains subspace 0, round 2 only subspace 1
    x = {"l.A": torch.zeros(2, 1, 3), "l.B": torch.zeros(2, 4, 1), "proj.weight": torch.zeros(2, 2)}
    cfg = ServerConfig(name)
    agg1 = {k: v.clone() for k, v in x.items()}
    agg1["l.A"][0] += 0.3
    agg1["l.B"][0] -= 0.2
    agg1["proj.weight"] += 0.1
    x1, s1 = step(x, agg1, {}, subspace_mask(x, {0}), cfg)
    agg2 = {k: v.clone() for k, v in x1.items()}  # aggregation keeps subspace 0 at its global value
    agg2["l.A"][1] += 0.3
    agg2["proj.weight"] += 0.1
    x2, s2 = step(x1, agg2, s1, subspace_mask(x1, {1}), cfg)
    for k in ("l.A", "l.B"):
        assert torch.equal(x2[k][0], x1[k][0])  # momentum would have moved it: the mask keeps it
        assert all(torch.equal(s2[f"{m}.{k}"][0], s1[f"{m}.{k}"][0]) for m in "mv" if f"{m}.{k}" in s1)
    assert not torch.equal(x2["l.A"][1], x1["l.A"][1]) and not torch.equal(x2["proj.weight"], x1["proj.weight"])
    # without the mask the old subspace drifts along its momentum
    drift, _ = step(x1, agg2, s1, {}, cfg)
    assert not torch.equal(drift["l.A"][0], x1["l.A"][0])


def test_subspace_mask_selects_subspaces_of_lora_factors_only():
    state = {"l.A": torch.zeros(3, 2, 5), "l.B": torch.zeros(3, 4, 2), "proj.weight": torch.zeros(2, 2)}
    mask = subspace_mask(state, {0, 2})
    assert mask["l.A"].shape == (3, 1, 1) and mask["l.A"].flatten().tolist() == [True, False, True]
    assert "proj.weight" not in mask  # absent = stepped entirely


def test_proximal_term_is_zero_at_the_global_model_and_pulls_back_to_it():
    model = torch.nn.Linear(3, 2)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = proximal_loss(anchor, mu=0.5)
    assert loss(model, None).item() == 0.0
    with torch.no_grad():
        model.weight.add_(0.2)
    value = loss(model, None)
    torch.testing.assert_close(value, torch.tensor(0.5 / 2 * 6 * 0.2 ** 2))  # (mu / 2) ||w - w_global||^2
    value.backward()
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), 0.5 * 0.2))  # mu (w - w_global)


# ---------------------------------------------------------------------------- the wrapper strategy
def test_server_optimizer_state_round_trip_keeps_the_moments_under_server():
    cfg = ServerConfig("fedadam")
    a = ServerOptimizer(Finetune(None, None, FedConfig(aggregate="ab")), cfg)
    new = a.aggregate(X, [AGG], [1], [0])
    assert set(a.state()) == {"server.m.w", "server.v.w"}
    torch.testing.assert_close(new["w"], one_step("fedadam")[0])     # the aggregate, then one fedadam step
    b = ServerOptimizer(Finetune(None, None, FedConfig(aggregate="ab")), cfg)
    b.load(a.state())
    assert b.moments.keys() == a.moments.keys() == {"m.w", "v.w"}
    assert all(torch.equal(a.moments[k], b.moments[k]) for k in a.moments)


def test_server_optimizer_keeps_the_wrapped_strategys_state_and_answers():
    model = nn.Sequential(LoRALinear(nn.Linear(3, 3), num_subspaces=4, rank=1, alpha=1.0))
    disco = Disco(model, None, FedConfig(aggregate="ab"))
    disco.cache = fcit.TokenCache(torch.eye(3)[:2], torch.tensor([5, 7]))
    wrapped = ServerOptimizer(disco, ServerConfig("fedyogi"))
    wrapped.moments = {"m.w": torch.ones(2)}
    assert wrapped.name == "disco" and wrapped.num_subspaces() == 4 and wrapped.open_subspaces() == 2
    assert set(wrapped.state()) == {"disco.tokens", "disco.counts", "server.m.w"}
    again = ServerOptimizer(Disco(model, None, FedConfig(aggregate="ab")), ServerConfig("fedyogi"))
    again.load(wrapped.state())
    assert torch.equal(again.cache.tokens, disco.cache.tokens) and again.cache.counts.tolist() == [5, 7]
    assert torch.equal(again.moments["m.w"], torch.ones(2))


def test_fedprox_adds_the_proximal_term_at_the_global_model_and_the_others_add_nothing():
    model = nn.Sequential(nn.Linear(3, 2))
    prox = ServerOptimizer(Finetune(model, None, FedConfig()), ServerConfig("fedprox", mu=0.5))
    term = prox.extra_loss(0)                                         # asked right after the global state is loaded
    assert term(model, None).item() == 0.0
    with torch.no_grad():
        model[0].weight.add_(0.2)
    torch.testing.assert_close(term(model, None), torch.tensor(0.5 / 2 * 6 * 0.2 ** 2))
    assert ServerOptimizer(Finetune(model, None, FedConfig()), ServerConfig("fedadam")).extra_loss(0) is None


# ---------------------------------------------------------------------------- train.make_strategy
LAYER = "model.language_model.layers.0.mlp.up_proj"
PROJ = "model.multi_modal_projector.linear_1.weight"


def lora_state(seed, K=8, R=2, I=4, O=3):
    """A global state shaped like the tiny preset's DISCO: K = 8 subspaces of rank 2, and a projector."""
    g = torch.Generator().manual_seed(seed)
    return {f"{LAYER}.A": torch.randn(K, R, I, generator=g), f"{LAYER}.B": torch.randn(K, O, R, generator=g),
            PROJ: torch.randn(O, I, generator=g)}


def strategy_for(*flags):
    cfg = train.resolve(train.parse_args(["--preset", "tiny", *flags]))
    return train.make_strategy(cfg, None, None, log=lambda *a: None, detail=None)


def test_plain_fedavg_gets_the_method_itself_with_no_server_step():
    strategy = strategy_for("--server", "fedavg")
    assert type(strategy) is Disco and not isinstance(strategy, ServerOptimizer)
    x, clients = lora_state(0), [lora_state(1), lora_state(2)]
    new = strategy.aggregate(x, clients, [3, 1], [2, 2])
    expected, _ = fcit.aggregate(x, clients, [3, 1], [2, 2], factors=factor_keys(x), mode="svd")
    assert new.keys() == expected.keys() and all(torch.equal(new[k], expected[k]) for k in new)


@pytest.mark.parametrize("name", [n for n in SERVERS if n != "fedavg"])
def test_every_other_server_wraps_the_method(name):
    strategy = strategy_for("--server", name, *(["--aggregate", "ab"] if name in STATEFUL else []))
    assert type(strategy) is ServerOptimizer and type(strategy.strategy) is Disco and strategy.cfg.name == name


def test_fedadam_from_make_strategy_leaves_untrained_subspaces_exactly_unchanged():
    strategy = strategy_for("--server", "fedadam", "--aggregate", "ab")
    assert type(strategy) is ServerOptimizer
    x0 = lora_state(0)
    # round 1: two clients train subspace 1; round 2: one client trains subspace 3, subspace 1 has momentum now
    x1 = strategy.aggregate(x0, [lora_state(1), lora_state(2)], [3, 1], [1, 1])
    m1 = {k: v.clone() for k, v in strategy.state().items()}
    x2 = strategy.aggregate(x1, [lora_state(3)], [2], [3])
    for key in (f"{LAYER}.A", f"{LAYER}.B"):
        for k in set(range(8)) - {1, 3}:
            assert torch.equal(x2[key][k], x0[key][k]), (key, k)          # never trained: never moved
        assert torch.equal(x2[key][1], x1[key][1])                        # trained in round 1 only: kept in round 2
        assert torch.equal(strategy.state()[f"server.m.{key}"][1], m1[f"server.m.{key}"][1])
        assert not torch.equal(x1[key][1], x0[key][1]) and not torch.equal(x2[key][3], x1[key][3])
    # where it steps, it is the server's step along the aggregate's change, not the aggregate itself
    plain, _ = fcit.aggregate(x1, [lora_state(3)], [2], [3], factors=factor_keys(x1), mode="ab")
    delta = plain[f"{LAYER}.A"][3] - x1[f"{LAYER}.A"][3]
    assert torch.equal(torch.sign(x2[f"{LAYER}.A"][3] - x1[f"{LAYER}.A"][3]), torch.sign(delta))
    assert not torch.allclose(x2[f"{LAYER}.A"][3], plain[f"{LAYER}.A"][3])
    assert not torch.equal(x2[PROJ], x1[PROJ])                            # the projector is stepped every round


@pytest.mark.parametrize("flags, message", [
    (["--server", "fedadam", "--aggregate", "svd"], "--aggregate ab"),
    (["--server", "fedyogi", "--aggregate", "svd"], "--server fedyogi"),
    (["--server", "fedavg", "--server-lr", "0.1"], "--server-lr"),
])
def test_bad_server_flags_fail_in_resolve(flags, message):
    with pytest.raises(ValueError, match=message):
        train.resolve(train.parse_args(["--preset", "tiny", *flags]))


def test_unknown_server_name_is_refused():
    with pytest.raises(ValueError, match="--server"):
        server.ServerConfig("fedsgd")


@pytest.mark.parametrize("name", SERVERS)
def test_every_server_runs(tiny_run, name):
    flags = ["--server", name] + (["--aggregate", "ab"] if name in STATEFUL else [])
    # task-hom at 2 rounds a stage: fedavg's run is test_train.py's DISCO run, fedadam's the one a resume must match
    run = tiny_run("--setting", "task-hom", "--rounds", "2", *flags)
    assert run.res["config"]["server"]["name"] == name
    assert run.res["config"]["fed"]["aggregate"] == ("ab" if name in STATEFUL else "svd")
    assert [list(a) for a in run.res["acc"]] == [train.get_setting("task-hom").seen_tasks(t) for t in range(8)]
    # the moments travel in the checkpoint, and only for the servers that keep some
    keys = load_file(run.out / "checkpoint.safetensors")
    moments = {k for k in keys if k.startswith("server.")}
    assert bool(moments) == (name in STATEFUL)
    assert all(k.startswith("server.m.") or k.startswith("server.v.") for k in moments)
