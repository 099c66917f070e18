"""Tests of fcit.py, the core of DISCO: python -m pytest -q tests/test_fcit.py"""
import dataclasses
import math

import pytest
import torch

from fcit import (OPENINGS, DiscoConfig, TokenCache, activation_weights, ab_aggregate, aggregate_subspace,
                  cosine_similarity, identity_token, may_open, pad_gate, route_clients, svd_aggregate)

D = 16


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def task_tokens(direction, num, *, noise=0.02, seed=0):
    """Identity tokens of `num` clients of one task: a base direction plus small noise, (num, D)."""
    return direction + noise * torch.randn(num, D, generator=gen(seed))


def factors(ranks, d_in=12, d_out=10, *, seed=0):
    g = gen(seed)
    As = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for r in ranks]
    return As, Bs


def dense_update(As, Bs, weights):
    p = weights.double() / weights.sum()  # float64 weights: the oracle must be as exact as the code
    return sum(p_i * B @ A for p_i, A, B in zip(p, As, Bs))


# ---- Identity tokens

def test_identity_token_is_float32_mean():
    features = torch.randn(7, D, generator=gen(), dtype=torch.float64)
    token = identity_token(features)
    assert token.dtype == torch.float32 and token.shape == (D,)
    torch.testing.assert_close(token, features.mean(0).float())


# ---- Dynamic Knowledge Organization

def test_same_task_shares_a_subspace_and_a_new_direction_opens_one():
    e = torch.eye(D)
    tokens = torch.cat([task_tokens(e[0], 3), task_tokens(e[1], 1, seed=1)])  # (4, D)
    assignment, cache, log = route_clients(tokens, [10, 20, 30, 40], TokenCache.empty(D),
                                           threshold=0.9, max_subspaces=8)
    assert assignment == [0, 0, 0, 1]
    assert len(cache) == 2 and "opened subspace 1" in log[3]


def test_two_clients_of_a_new_task_in_one_round_share_the_new_subspace():
    e = torch.eye(D)
    _, cache, _ = route_clients(task_tokens(e[0], 2), [5, 5], TokenCache.empty(D), threshold=0.9, max_subspaces=8)
    new = task_tokens(e[2], 2, seed=3)  # both clients of a task the cache has not seen
    assignment, cache, log = route_clients(new, [5, 5], cache, threshold=0.9, max_subspaces=8)
    assert assignment == [1, 1] and len(cache) == 2
    assert "opened subspace 1" in log[0] and "joined subspace 1" in log[1]


def test_running_mean_is_the_count_weighted_mean_of_everything_routed():
    e = torch.eye(D)
    cache, routed = TokenCache.empty(D), {}
    for round_ in range(4):
        tokens = torch.cat([task_tokens(e[0], 2, seed=round_), task_tokens(e[1], 2, seed=10 + round_)])
        counts = torch.randint(1, 500, (4,), generator=gen(round_))
        assignment, cache, _ = route_clients(tokens, counts, cache, threshold=0.9, max_subspaces=8)
        for k, t, n in zip(assignment, tokens, counts):
            routed.setdefault(k, []).append((t, n))
    assert cache.tokens.dtype == torch.float32 and cache.counts.dtype == torch.int64
    for k, items in routed.items():
        ts = torch.stack([t for t, _ in items]).double()  # (n, D)
        ns = torch.stack([n for _, n in items]).double()  # (n,)
        torch.testing.assert_close(cache.tokens[k], ((ns[:, None] * ts).sum(0) / ns.sum()).float())
        assert int(cache.counts[k]) == int(ns.sum())


def test_full_cache_joins_the_nearest_subspace_and_says_so():
    e = torch.eye(D)
    _, cache, _ = route_clients(e[:2], [1, 1], TokenCache.empty(D), threshold=0.9, max_subspaces=2)
    stranger = (e[1] + 2 * e[5])[None]  # cos 0.45 to subspace 1, 0 to subspace 0
    assignment, cache, log = route_clients(stranger, [1], cache, threshold=0.9, max_subspaces=2)
    assert assignment == [1] and len(cache) == 2
    assert "cap of 2 subspaces" in log[0] and "0.45" in log[0]


def test_routing_does_not_mutate_its_inputs():
    e = torch.eye(D)
    _, cache, _ = route_clients(e[:2], [3, 4], TokenCache.empty(D), threshold=0.9, max_subspaces=8)
    tokens, counts = task_tokens(e[0], 3), torch.tensor([5, 6, 7])
    before = (tokens.clone(), counts.clone(), cache.tokens.clone(), cache.counts.clone())
    route_clients(tokens, counts, cache, threshold=0.9, max_subspaces=8)
    for a, b in zip(before, (tokens, counts, cache.tokens, cache.counts)):
        assert torch.equal(a, b)


def test_cosine_exactly_at_threshold_joins():
    g = torch.ones(1, 4)
    cache = TokenCache(g, torch.tensor([1]))
    token = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # cos = 1/2 exactly, in any precision
    assert float(cosine_similarity(token, g)) == 0.5
    assert route_clients(token, [1], cache, threshold=0.5, max_subspaces=8)[0] == [0]
    assert route_clients(token, [1], cache, threshold=0.5 + 1e-6, max_subspaces=8)[0] == [1]


def route_under(rule, round, tokens, cache, *, max_subspaces=8):
    return route_clients(tokens, [5] * len(tokens), cache, threshold=0.9, max_subspaces=max_subspaces,
                         open_new=may_open(rule, round))


def test_a_later_round_stranger_opens_under_every_round_and_joins_the_nearest_under_first_round():
    e = torch.eye(D)
    _, cache, _ = route_clients(e[:2], [1, 1], TokenCache.empty(D), threshold=0.9, max_subspaces=8)
    stranger = (e[1] + 2 * e[5])[None]  # cos 0.45 to subspace 1, 0 to subspace 0: below tau
    assignment, opened, log = route_under("every-round", 3, stranger, cache)
    assert assignment == [2] and len(opened) == 3 and "opened subspace 2" in log[0]
    assignment, joined, log = route_under("first-round", 3, stranger, cache)
    assert assignment == [1] and len(joined) == 2 and "nearest subspace 1" in log[0] and "0.45" in log[0]
    assert int(joined.counts[1]) == 1 + 5  # it joins the running mean of the subspace it trains


def test_round_zero_routes_the_same_under_both_rules():
    e = torch.eye(D)
    _, cache, _ = route_clients(e[:2], [1, 1], TokenCache.empty(D), threshold=0.9, max_subspaces=8)
    tokens = torch.cat([task_tokens(e[0], 2), task_tokens(e[3], 2, seed=1), (e[1] + 2 * e[5])[None]])  # (5, D)
    for start in (TokenCache.empty(D), cache):  # a run's first round, and a later stage's first round
        every, first = route_under("every-round", 0, tokens, start), route_under("first-round", 0, tokens, start)
        assert every[0] == first[0] and every[2] == first[2]
        torch.testing.assert_close(every[1].tokens, first[1].tokens)
        assert torch.equal(every[1].counts, first[1].counts)


def test_first_round_rule_opens_when_no_subspace_is_open_and_keeps_the_cap_rule_in_round_zero():
    e = torch.eye(D)
    assignment, cache, log = route_under("first-round", 2, e[:1], TokenCache.empty(D))
    assert assignment == [0] and "opened subspace 0" in log[0]  # nothing to join: a later round opens all the same
    _, full, _ = route_clients(e[:2], [1, 1], TokenCache.empty(D), threshold=0.9, max_subspaces=2)
    assignment, _, log = route_under("first-round", 0, (e[1] + 2 * e[5])[None], full, max_subspaces=2)
    assert assignment == [1] and "cap of 2 subspaces" in log[0]  # as under every-round


def test_open_rule_is_checked():
    assert DiscoConfig().open == "first-round" and set(OPENINGS) == {"every-round", "first-round"}
    assert [may_open("first-round", r) for r in range(3)] == [True, False, False]
    assert [may_open("every-round", r) for r in range(3)] == [True, True, True]
    with pytest.raises(ValueError, match="--open"):
        DiscoConfig(open="never")


# ---- Aggregation inside a subspace

def test_svd_aggregate_at_full_rank_is_the_exact_average_update():
    As, Bs = factors([4, 4, 3])
    weights = torch.tensor([100.0, 7.0, 31.0])
    A, B, dropped = svd_aggregate(As, Bs, weights, rank=11)
    torch.testing.assert_close(B @ A, dense_update(As, Bs, weights), atol=1e-5, rtol=0)
    assert dropped < 1e-12


def test_ab_aggregate_is_not_the_average_update():
    As, Bs = factors([4, 4, 4, 4])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    A, B = ab_aggregate(As, Bs, weights)
    assert (B @ A - dense_update(As, Bs, weights)).norm() > 1e-3
    # it is the product of the averaged factors: sum_ij p_i p_j B_i A_j, cross terms of different clients included
    p = weights.double() / weights.sum()
    cross = sum(p_i * p_j * B_i @ A_j for p_i, B_i in zip(p, Bs) for p_j, A_j in zip(p, As))
    torch.testing.assert_close(B @ A, cross)


def test_truncated_svd_aggregate_drops_exactly_the_smallest_singular_values():
    As, Bs = factors([4, 4, 4])
    weights = torch.tensor([3.0, 1.0, 2.0])
    dW = dense_update(As, Bs, weights)
    rank = 5
    A, B, dropped = svd_aggregate(As, Bs, weights, rank=rank)
    sigma = torch.linalg.svdvals(dW)
    lost = float(sigma[rank:].square().sum())
    assert float((dW - B @ A).square().sum()) == pytest.approx(lost, rel=1e-9)
    assert dropped == pytest.approx(lost / float(dW.square().sum()), rel=1e-9)


def test_single_client_at_its_rank_is_reproduced():
    As, Bs = factors([6])
    A, B, _ = svd_aggregate(As, Bs, torch.tensor([42.0]), rank=6)
    torch.testing.assert_close(B @ A, Bs[0] @ As[0])


def test_shapes_are_fixed_even_below_the_requested_rank():
    As, Bs = factors([2, 1], d_in=12, d_out=10)
    A, B, dropped = svd_aggregate(As, Bs, torch.tensor([1.0, 1.0]), rank=8)
    assert A.shape == (8, 12) and B.shape == (10, 8) and dropped == 0.0
    assert torch.all(A[3:] == 0) and torch.all(B[:, 3:] == 0)


def test_zero_factors_give_zero_and_no_dropped_energy():
    As = [torch.zeros(4, 12), torch.zeros(4, 12)]
    Bs = [torch.zeros(10, 4), torch.zeros(10, 4)]
    A, B, dropped = aggregate_subspace(As, Bs, torch.tensor([1.0, 3.0]), rank=4, mode="svd")
    assert torch.all(A == 0) and torch.all(B == 0) and dropped == 0.0


def test_aggregate_returns_the_input_dtype_and_rejects_unknown_modes():
    As, Bs = factors([2, 2])
    A, B, _ = aggregate_subspace([a.float() for a in As], [b.float() for b in Bs], torch.ones(2), rank=2, mode="ab")
    assert A.dtype == B.dtype == torch.float32
    torch.testing.assert_close(A, ((As[0] + As[1]) / 2).float())           # equal weights: the plain mean
    torch.testing.assert_close(B, ((Bs[0] + Bs[1]) / 2).float())
    with pytest.raises(ValueError, match="'mean'"):
        aggregate_subspace(As, Bs, torch.ones(2), rank=2, mode="mean")


# ---- Subspace Selective Activation

@pytest.mark.parametrize("mode", ["softmax", "argmax", "cosine"])
def test_gate_rows_sum_to_one(mode):
    queries, tokens = torch.randn(5, D, generator=gen(1)), torch.randn(3, D, generator=gen(2))
    gate = activation_weights(queries, tokens, temperature=0.05, mode=mode)
    assert gate.shape == (5, 3) and gate.dtype == torch.float32
    torch.testing.assert_close(gate.sum(-1), torch.ones(5))


def test_concat_gate_is_all_ones():
    gate = activation_weights(torch.randn(5, D), torch.randn(3, D), temperature=0.05, mode="concat")
    assert torch.equal(gate, torch.ones(5, 3))


@pytest.mark.parametrize("mode", ["softmax", "argmax", "cosine"])
def test_a_question_equal_to_a_token_recovers_its_subspace(mode):
    tokens = torch.randn(4, D, generator=gen(3))
    gate = activation_weights(tokens, tokens, temperature=0.05, mode=mode)
    assert torch.equal(gate.argmax(-1), torch.arange(4))


def test_softmax_with_separated_tokens_is_nearly_one_hot():
    tokens = torch.eye(D)[:4]
    gate = activation_weights(tokens, tokens, temperature=0.05)
    assert torch.all(gate.diagonal() > 0.99)
    # cos = 1 to its own token, 0 to the 3 others: a_own = e^(1/eps) / (e^(1/eps) + 3)
    own = math.exp(1 / 0.05) / (math.exp(1 / 0.05) + 3)
    torch.testing.assert_close(gate.diagonal(), torch.full((4,), own))


def test_argmax_gate_is_one_hot():
    gate = activation_weights(torch.randn(6, D, generator=gen(4)), torch.randn(3, D, generator=gen(5)),
                              temperature=0.05, mode="argmax")
    assert torch.all((gate == 0) | (gate == 1)) and torch.all(gate.sum(-1) == 1)
    cos = cosine_similarity(torch.randn(6, D, generator=gen(4)), torch.randn(3, D, generator=gen(5)))
    assert torch.equal(gate.argmax(-1), cos.argmax(-1))                      # the one sits on the nearest token


def test_no_subspace_gives_an_empty_gate():
    gate = activation_weights(torch.randn(3, D), torch.zeros(0, D), temperature=0.05)
    assert gate.shape == (3, 0)
    assert torch.equal(pad_gate(gate, 4), torch.zeros(3, 4))                 # every subspace off: the base model


def test_smaller_temperature_is_sharper():
    queries, tokens = torch.randn(5, D, generator=gen(6)), torch.randn(3, D, generator=gen(7))
    soft = activation_weights(queries, tokens, temperature=0.5)
    sharp = activation_weights(queries, tokens, temperature=0.05)
    assert torch.all(sharp.max(-1).values > soft.max(-1).values)
    # log(a_j / a_k) = (s_j - s_k) / eps: the log-odds scale exactly with 1 / eps
    s = cosine_similarity(queries, tokens)
    for eps, gate in ((0.5, soft), (0.05, sharp)):
        torch.testing.assert_close((gate[:, 0] / gate[:, 1]).log(), (s[:, 0] - s[:, 1]) / eps, atol=1e-4, rtol=1e-4)


def test_unknown_activation_mode_is_an_error():
    with pytest.raises(ValueError, match="'mean'"):
        activation_weights(torch.randn(2, D), torch.randn(2, D), temperature=0.05, mode="mean")


def test_pad_gate_adds_zero_subspaces():
    gate = torch.rand(3, 2)
    padded = pad_gate(gate, 5)
    assert padded.shape == (3, 5) and torch.equal(padded[:, :2], gate) and torch.all(padded[:, 2:] == 0)
    assert pad_gate(torch.zeros(3, 0), 4).shape == (3, 4)


def test_pad_gate_refuses_more_subspaces_than_the_layers_hold():
    with pytest.raises(ValueError, match="3 subspaces, the layers only 2"):
        pad_gate(torch.rand(1, 3), 2)


# ---- DiscoConfig

def test_disco_config_holds_no_subspace_cap_and_no_aggregation_mode():
    # K_max is the number of subspaces the LoRA layers hold, the aggregation mode is the federated config's
    assert {f.name for f in dataclasses.fields(DiscoConfig)} == {"threshold", "temperature", "activation", "identity",
                                                                     "open"}


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.9, 1.0])
def test_disco_config_accepts_every_cosine_as_threshold(threshold):
    assert DiscoConfig(threshold=threshold).threshold == threshold


@pytest.mark.parametrize("threshold", [-1.01, 1.5, math.nan])
def test_disco_config_refuses_a_threshold_outside_minus_one_one(threshold):
    with pytest.raises(ValueError, match=r"--threshold is a cosine: it must be in \[-1, 1\]"):
        DiscoConfig(threshold=threshold)


@pytest.mark.parametrize("temperature", [0.0, -0.05, math.inf, math.nan])
def test_disco_config_refuses_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        DiscoConfig(temperature=temperature)


@pytest.mark.parametrize("field, value", [("activation", "mean"), ("identity", "audio")])
def test_disco_config_refuses_unknown_modes(field, value):
    with pytest.raises(ValueError, match=f"{field} '{value}' is not one of"):
        DiscoConfig(**{field: value})
