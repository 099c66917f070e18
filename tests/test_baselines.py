"""Tests for baselines/: one defining property of each method (EWC, LwF, O-LoRA, MoELoRA) on a tiny Llama with
LoRA, the method registry, the equal budget, and resuming each stateful method after a crash.
Run: python -m pytest -q tests/test_baselines.py"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import baselines
import train
from baselines.ewc import EWC, ewc_penalty, fisher_diagonal
from baselines.lwf import distillation_loss, lwf_loss
from baselines.moelora import MoELoRA, MoELoRALinear
from baselines.olora import OLoRA, orthogonality_loss
from config.run import METHODS
from fcit import fedavg
from federated import Disco, FedConfig, client_state
from lora import LoRAConfig, LoRALinear, add_lora, gated, lora_modules, split_factor
from model import answer_loss

# B batch, T tokens, V vocabulary, D_in / D_out widths, R rank, K subspaces (E experts)
B, T, V = 2, 7, 50


def tiny_llama(*, K=1, R=2, dropout=0.0, seed=0, moe=False):
    """A 2-layer Llama with LoRA (or MoELoRA) on its FFN; only the LoRA factors (and routers) train."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, LoRAConfig(num_subspaces=K, rank=R, alpha=4.0, dropout=dropout),
             generator=torch.Generator().manual_seed(seed), layer=MoELoRALinear if moe else LoRALinear)
    with torch.no_grad():  # B != 0, so every factor is reached by the loss
        for m in lora_modules(model).values():
            m.B.normal_(0, 0.1)
    return model.eval()


def make_batch(seed=0, n=B):
    """Token ids with labels on the last 3 tokens only (the 'answer'), as model.collate builds them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)  # (B, T)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------------------- EWC
def test_ewc_penalty_is_zero_at_the_anchor_and_positive_away():
    model = tiny_llama()
    anchor = client_state(model)
    fisher = {k: torch.rand_like(v) + 0.1 for k, v in anchor.items()}
    penalty = ewc_penalty(fisher, anchor, lam=100.0)
    assert penalty(model, None).item() == 0.0
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.add_(0.01)
    # (lambda / 2) sum_i F_i (theta_i - theta*_i)^2 with theta - theta* = 0.01 on one parameter
    expected = 0.5 * 100.0 * (fisher[name] * 0.01 ** 2).sum()
    assert penalty(model, None).item() > 0
    torch.testing.assert_close(penalty(model, None), expected, rtol=1e-4, atol=0)


def test_ewc_says_its_penalty_once_per_client_at_the_first_local_step():
    model, detail = tiny_llama(), []
    ewc = EWC(model, None, FedConfig(aggregate="ab"), detail=detail.append)
    ewc.anchor = client_state(model)
    ewc.fisher = {k: torch.ones_like(v) for k, v in ewc.anchor.items()}
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(0.1)
    expected = ewc_penalty(ewc.fisher, ewc.anchor, lam=ewc.hp.lam)(model, None).item()
    batch = make_batch()
    for _ in range(2):                                           # two clients: the loop asks once per client
        loss = ewc.extra_loss(1)
        for _ in range(3):                                       # three local steps
            loss(model, batch, model(**batch))
    assert len(detail) == 2 and all(f"first local step {expected:.4g} (task loss" in line for line in detail)


def test_fisher_is_the_sample_weighted_mean_of_the_clients_fishers():
    model = tiny_llama()
    examples = [make_batch(seed=i, n=1) for i in range(5)]  # one example per batch: the empirical Fisher
    F_a, n_a = fisher_diagonal(model, examples[:2])
    F_b, n_b = fisher_diagonal(model, examples[2:])
    server = fedavg([F_a, F_b], [n_a, n_b])  # what EWC's server does with its clients' Fishers
    F_all, _ = fisher_diagonal(model, examples)  # the Fisher of all 5 examples in one place
    for k in F_all:
        torch.testing.assert_close(server[k], F_all[k], rtol=1e-5, atol=1e-12)
    # and F is a mean of squared gradients: check one parameter by hand
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    by_hand = torch.stack([torch.autograd.grad(answer_loss(model, b), param)[0].square() for b in examples]).mean(0)
    torch.testing.assert_close(F_all[name], by_hand, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------- LwF
def test_lwf_term_is_zero_when_the_teacher_is_the_student():
    model = tiny_llama()
    batch = make_batch()
    term = lwf_loss(client_state(model), lam=1.0, temperature=2.0)(model, batch)
    assert term.item() == 0.0
    # so the local loss is the plain cross-entropy on the answer tokens
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(answer_loss(model, batch) + term, ce)


def test_distillation_counts_answer_positions_only():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = make_batch()["labels"]
    before = distillation_loss(student, teacher, labels, temperature=2.0)
    assert before.item() > 0
    # T^2 KL(p_old || p) by hand, over the 3 positions whose next token is an answer token (t = T-4 .. T-2)
    T2, kl = 4.0, []
    for b in range(B):
        for t in range(T - 4, T - 1):
            p_old, p = torch.softmax(teacher[b, t] / 2.0, -1), torch.softmax(student[b, t] / 2.0, -1)
            kl.append((p_old * (p_old.log() - p.log())).sum())
    torch.testing.assert_close(before, T2 * torch.stack(kl).mean())
    # logits at t predict token t + 1: positions 0..T-5 predict prompt tokens and must not count
    student2 = student.clone()
    student2[:, :T - 4] = torch.randn(B, T - 4, V, generator=g)
    torch.testing.assert_close(distillation_loss(student2, teacher, labels, temperature=2.0), before)


def test_lwf_teacher_pass_writes_no_parameter_and_keeps_the_task_graph_valid():
    model = tiny_llama().train()
    teacher = {k: v + 0.05 for k, v in client_state(model).items()}
    before = client_state(model)
    batch = make_batch()
    loss = answer_loss(model, batch)  # the task loss first, as local_train computes it
    loss = loss + lwf_loss(teacher, lam=1.0, temperature=2.0)(model, batch)
    loss.backward()  # an in-place swap of the parameters would make this raise
    after = client_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


# ---------------------------------------------------------------------------- O-LoRA
def test_olora_old_subspaces_are_on_but_receive_exactly_zero_gradient():
    K, stage = 3, 1
    model = tiny_llama(K=K).train()
    for m in lora_modules(model).values():  # old subspaces with a nonzero update, so that they shape the forward
        torch.nn.init.normal_(m.B, std=0.1)
    strategy = OLoRA(model, None, FedConfig())
    k = strategy.assign(stage, 0, [None])[0]
    gate = strategy.train_gate(k)
    assert gate.tolist() == [1.0, 1.0, 0.0]  # old on, new on, later off
    with gated(model, gate):
        loss = answer_loss(model, make_batch())
    (loss + strategy.extra_loss(stage)(model, None)).backward()
    for m in lora_modules(model).values():
        assert torch.count_nonzero(m.A.grad[:k]) == 0 and torch.count_nonzero(m.B.grad[:k]) == 0
        assert m.A.grad[k].abs().sum() > 0 and m.B.grad[k].abs().sum() > 0
    # the old subspace is on: switching it off changes the loss the new one is trained on
    with torch.no_grad(), gated(model, torch.tensor([0.0, 1.0, 0.0])):
        assert not torch.isclose(answer_loss(model, make_batch()), loss)
    strategy.assign(2, 0, [None])  # the next stage freezes subspace 1 too, and only then
    model.zero_grad()
    with gated(model, strategy.train_gate(2)):
        answer_loss(model, make_batch()).backward()
    for m in lora_modules(model).values():
        assert torch.count_nonzero(m.B.grad[:2]) == 0 and m.B.grad[2].abs().sum() > 0


def test_orthogonality_loss_is_zero_for_orthogonal_subspaces():
    K, R, D = 3, 2, 8
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0].T  # orthonormal rows
    A = (3.0 * basis[:K * R]).reshape(K, R, D)  # (K, R, D): disjoint sets of orthogonal directions
    assert orthogonality_loss(A, 2).item() == pytest.approx(0.0, abs=1e-5)
    A[2, 0] = A[2, 0] + A[0, 1]  # the new subspace leans into an old one
    # ||A_2 A_0^T||_1 picks up <A_0[1], A_0[1]> = 9; A_1 stays orthogonal
    assert orthogonality_loss(A, 2).item() == pytest.approx(9.0, abs=1e-4)
    assert orthogonality_loss(A, 0).item() == 0.0


def test_olora_stage_t_trains_subspace_t_and_the_last_subspace_after_that():
    model = tiny_llama(K=3)
    strategy = OLoRA(model, None, FedConfig())
    assert [strategy.stage_subspace(t) for t in range(5)] == [0, 1, 2, 2, 2]
    assert [strategy.assign(t, 0, [None, None]) for t in range(5)] == [[0, 0], [1, 1], [2, 2], [2, 2], [2, 2]]
    assert strategy.eval_gate([None]) is None  # inference sums every subspace


def test_olora_opens_one_subspace_per_stage_at_the_same_total_rank():
    assert OLoRA.lora_layout(rank=16, subspace_rank=2, num_stages=8) == (8, 2)
    assert OLoRA.lora_layout(rank=16, subspace_rank=2, num_stages=4) == (4, 4)
    with pytest.raises(ValueError, match="olora: rank 10 is not a multiple of the 4 stages"):
        OLoRA.lora_layout(rank=10, subspace_rank=2, num_stages=4)


# ---------------------------------------------------------------------------- MoELoRA
def moe_layer(E, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(6, 5), num_subspaces=E, rank=2, alpha=4.0, generator=g)
    with torch.no_grad():
        layer.B.normal_(0, 0.5, generator=g)
        layer.router.normal_(0, 1.0, generator=g)
    return layer


def test_router_weights_sum_to_one_per_token():
    layer = moe_layer(4)
    x = torch.randn(B, T, 6)
    a = layer.router_weights(x)  # (B, T, E)
    assert a.shape == (B, T, 4) and bool((a > 0).all())
    torch.testing.assert_close(a.sum(-1), torch.ones(B, T))
    assert not torch.allclose(a[0, 0], a[0, 1])  # per token, not per sequence


def test_moelora_with_one_expert_equals_plain_lora():
    moe = moe_layer(1)
    plain = LoRALinear(moe.base, num_subspaces=1, rank=2, alpha=4.0)
    with torch.no_grad():
        plain.A.copy_(moe.A), plain.B.copy_(moe.B)
    x = torch.randn(B, T, 6)
    torch.testing.assert_close(moe(x), plain(x))


def test_moelora_outer_zero_gate_is_the_base_model():
    layer = moe_layer(3)
    x = torch.randn(B, T, 6)
    layer.gate = torch.zeros(3)
    torch.testing.assert_close(layer(x), layer.base(x))


def test_add_lora_with_the_moelora_layer_wraps_every_target_and_trains_the_router():
    model = tiny_llama(K=4, moe=True)
    layers = lora_modules(model)
    assert len(layers) == 2 * 3 and all(isinstance(m, MoELoRALinear) for m in layers.values())
    assert sum(k.endswith(".router") for k in client_state(model)) == len(layers)
    # the routers travel with the client state but are no LoRA factors: they are FedAvg-ed whole
    assert {k for k in client_state(model) if not split_factor(k)} == {f"{n}.router" for n in layers}


def test_moelora_has_disco_s_layout_and_aggregates_every_expert_over_all_clients():
    assert MoELoRA.lora_layout(rank=16, subspace_rank=2, num_stages=8) == Disco.lora_layout(
        rank=16, subspace_rank=2, num_stages=8) == (8, 2)
    with pytest.raises(ValueError, match="multiple of subspace_rank"):
        MoELoRA.lora_layout(rank=10, subspace_rank=4, num_stages=8)
    model = tiny_llama(K=4, moe=True)
    strategy = MoELoRA(model, None, FedConfig(aggregate="ab"))
    assert strategy.train_gate(0) is None and strategy.trained_subspaces([0, 0]) == {0, 1, 2, 3}
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(v.shape, generator=g) for k, v in client_state(model).items()} for _ in range(3)]
    new = strategy.aggregate(client_state(model), states, [1, 2, 5], [0, 0, 0])
    # with 'ab' every expert's factors, the routers and all: the sample-weighted mean of the clients
    expected = fedavg(states, [1, 2, 5])
    assert new.keys() == expected.keys()
    for k in new:
        torch.testing.assert_close(new[k], expected[k])


# ---------------------------------------------------------------------------- the registry
def test_every_baseline_is_registered_with_its_name_and_its_config_field():
    assert set(baselines.METHODS) == {"ewc", "lwf", "olora", "moelora"}
    for name, (cls, hp) in baselines.METHODS.items():
        assert cls.name == name and train.STRATEGIES[name] == (cls, hp)
        # the hyperparameters of a method are the RunConfig field named after it
        assert hp is None or type(getattr(train.RunConfig(), name)) is hp


# ---------------------------------------------------------------------------- equal budget, resuming
@pytest.mark.parametrize("setting", ["task-hom", "task-het", "cap-hom", "cap-het"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_the_same_total_lora_rank(setting, method):
    cfg = train.resolve(train.parse_args(["--preset", "tiny", "--setting", setting, "--method", method]))
    K, R = train.lora_layout(cfg)
    assert K * R == cfg.rank
    if method == "olora":
        assert K == train.get_setting(setting).num_stages


@pytest.mark.parametrize("method", ["finetune", "disco", "olora", "moelora"])
def test_the_built_model_has_the_methods_lora_layout(tiny_cache, method):
    cfg = train.resolve(train.parse_args(["--preset", "tiny", "--setting", "cap-het", "--method", method]))
    _, base = train.prepare(cfg, log=lambda *a: None)
    model, _ = train.build_model(base, cfg)
    layers = lora_modules(model)
    cls = train.STRATEGIES[method][0]
    assert layers and all(type(m) is cls.layer for m in layers.values())
    assert {(m.num_subspaces, m.rank) for m in layers.values()} == {train.lora_layout(cfg)}
    # what trains: the LoRA factors (and MoELoRA's routers) and the projector, nothing of the base
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n in trains if split_factor(n) or ".router" in n or "multi_modal_projector" in n}
    assert {n for n in trains if split_factor(n)} == {f"{name}.{p}" for name in layers for p in "AB"}


@pytest.mark.parametrize("flags, crash_at, died_at", [
    pytest.param(["--method", "ewc"], 2, (0, 2), id="ewc-before-end_stage"),           # (next stage, next round)
    pytest.param(["--method", "ewc"], 3, (1, 0), id="ewc-after-stage-1"),
    pytest.param(["--method", "lwf"], 2, (0, 2), id="lwf-before-end_stage"),
    pytest.param(["--method", "olora"], 3, (1, 0), id="olora"),
    pytest.param(["--method", "moelora"], 3, (1, 0), id="moelora"),
    pytest.param(["--method", "disco", "--server", "fedadam", "--aggregate", "ab"], 3, (1, 0), id="disco-fedadam"),
])
def test_resume_after_a_crash_gives_the_same_results(tiny_run, crash_and_resume, tmp_path, flags, crash_at, died_at):
    """crash_at 2: after the stage's last round, before end_stage (EWC's Fisher must be in the checkpoint);
    3: after the end of stage 1 (a server's moments must be in the checkpoint)."""
    flags = ["--setting", "task-hom", "--rounds", "2", *flags]
    full = tiny_run(*flags)                        # test_train.py's run of the method (test_server.py's for fedadam)
    resumed, died = crash_and_resume(flags, crash_at=crash_at, out=tmp_path / "crash")
    assert died == died_at
    assert sum(line.startswith("resuming from") for line in resumed.lines) == 1
    assert resumed.progress() == (8, 0)
    assert resumed.res["acc"] == full.res["acc"]
    # the final global model and the strategy's state (Fisher, anchor, teacher, moments) are bit-identical
    a, b = (load_file(run.out / "checkpoint.safetensors") for run in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and that state is there: what each method must carry across the crash
    must = {"ewc": ("ewc.fisher.", "ewc.anchor."), "lwf": ("lwf.",), "disco": ("disco.tokens", "server.m.")}
    for prefix in must.get(flags[flags.index("--method") + 1], ()):
        assert any(k.startswith(prefix) for k in b), prefix
