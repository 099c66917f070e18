"""Tests for server.py: each server's one-step update against numbers computed by hand (Reddi et al. 2021,
Algorithm 2), subspaces no client trained stay exactly unchanged, FedProx's term, the flag rules, and every
--server end to end on the tiny preset.
Run: python -m pytest -q tests/test_server.py"""
import math

import pytest
import torch

import server
import train
from federated import FedConfig, Strategy
from server import SERVERS, STATEFUL, ServerConfig, proximal_loss, slot_mask, step

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
    x1, s1 = step(x, agg1, {}, slot_mask(x, {0}), cfg)
    agg2 = {k: v.clone() for k, v in x1.items()}  # aggregation keeps subspace 0 at its global value
    agg2["l.A"][1] += 0.3
    agg2["proj.weight"] += 0.1
    x2, s2 = step(x1, agg2, s1, slot_mask(x1, {1}), cfg)
    for k in ("l.A", "l.B"):
        assert torch.equal(x2[k][0], x1[k][0])  # momentum would have moved it: the mask keeps it
        assert all(torch.equal(s2[f"{m}.{k}"][0], s1[f"{m}.{k}"][0]) for m in "mv" if f"{m}.{k}" in s1)
    assert not torch.equal(x2["l.A"][1], x1["l.A"][1]) and not torch.equal(x2["proj.weight"], x1["proj.weight"])
    # without the mask the old subspace drifts along its momentum
    drift, _ = step(x1, agg2, s1, {}, cfg)
    assert not torch.equal(drift["l.A"][0], x1["l.A"][0])


def test_slot_mask_selects_subspaces_of_lora_factors_only():
    state = {"l.A": torch.zeros(3, 2, 5), "l.B": torch.zeros(3, 4, 2), "proj.weight": torch.zeros(2, 2)}
    mask = slot_mask(state, {0, 2})
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


def test_strategy_state_round_trip_keeps_the_moments():
    cfg = ServerConfig("fedadam")
    a = Strategy(None, None, FedConfig(), aggregate_mode="ab", server_cfg=cfg)
    a.server_step(X, AGG, set())
    b = Strategy(None, None, FedConfig(), aggregate_mode="ab", server_cfg=cfg)
    b.load(a.state())
    assert b.server_state.keys() == a.server_state.keys()
    assert all(torch.equal(a.server_state[k], b.server_state[k]) for k in a.server_state)


@pytest.mark.parametrize("flags, message", [
    (["--server", "fedadam"], "--aggregate ab"),
    (["--server", "fedyogi", "--aggregate", "svd"], "--server fedyogi"),
    (["--server", "fedavg", "--server-lr", "0.1"], "--server-lr"),
])
def test_bad_server_flags_fail_in_resolve(flags, message):
    with pytest.raises(ValueError, match=message):
        train.resolve(train.parse_args(["--preset", "tiny", *flags]))


def test_unknown_server_name_is_refused():
    with pytest.raises(ValueError, match="--server"):
        server.ServerConfig("fedsgd")


@pytest.mark.parametrize("setting", ["task-hom", "task-het", "cap-hom", "cap-het"])
@pytest.mark.parametrize("name", SERVERS)
def test_every_server_runs(tiny_cache, tmp_path, setting, name):
    flags = ["--server", name] + (["--aggregate", "ab"] if name in STATEFUL else [])
    res = train.main(["--preset", "tiny", "--out", str(tmp_path), "--setting", setting, *flags], log=lambda *a: None)
    assert res["config"]["server"]["name"] == name
    assert len(res["acc"]) == train.get_setting(setting).num_stages
