"""Measurements that back the claims of the README and RESULTS.md (printed figures, never timed tests).

    python -m scripts.bench speed       # a local step against the machine's matmul rate, the phases of a round,
                                        # gated vs plain and hand vs reference LoRA (OMP_NUM_THREADS sets threads)
    python -m scripts.bench similarity  # identity-token cosine structure on the embedded benchmark: same-dataset
                                        # clients vs different datasets, against the DKO threshold
    python -m scripts.bench distributed # one short run at 1, 2, ... torchrun processes: wall time, clients/s
    python -m scripts.bench stragglers  # simulated speed-up of one client a process, from real client sizes
GPU figures (LLaVA-7B's shapes, MFU, memory): scripts/bench_gpu.py.
"""
import argparse
import time

import numpy as np
import torch

import fcit
from lora import LoRALinear, gated


def timeit(fn, repeat=20):
    fn()                                                                   # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def speed(args):
    """One run's local training, taken apart on this machine at torch's thread count: the machine's matmul rate at
    the model's own GEMM shapes, a local step's achieved rate against it, ms per example, the share of each phase
    of a round (batch building, forward, backward, optimizer, routing and aggregation), and two LoRA ratios:
    gated K-subspace vs plain, and this hand LoRA vs the reference formulation (nn.Linear factors, nn.Dropout)."""
    from torch.utils.flop_counter import FlopCounterMode

    import train
    from federated import batches, client_state, load_client_state, param_groups
    cfg = train.resolve(train.parse_args(["--setting", "task-hom"]))
    root, base = train.prepare(cfg, print)
    setting, data, _ = train.load_data(cfg, root)
    model, processor = train.build_model(base, cfg)
    harness = train.make_harness(model, processor, data, cfg, log=None)
    strategy = train.make_strategy(cfg, model, harness, log=lambda *a: None, detail=None)
    K, R = train.lora_layout(cfg)
    print(f"{torch.get_num_threads()} thread(s); the tiny LLaVA, {K} subspaces of rank {R}, batch {cfg.fed.batch_size}")
    # the machine: fp32 GEMM at the shapes a step multiplies (N = B*T tokens x the FFN and attention widths)
    N, D, F = cfg.fed.batch_size * 40, 128, 384
    shapes = [(N, D, F), (N, F, D), (N, D, D), (F, N, D), (2048, 2048, 2048)]
    rates = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2 * m * k * n / timeit(lambda: a @ b, repeat=50) / 1e9)
    model_rate = float(np.mean(rates[:-1]))
    print(f"matmul: {model_rate:.0f} GFLOP/s at the model's shapes, {rates[-1]:.0f} GFLOP/s at 2048^3")
    # one round of 5 clients, every phase timed
    jobs = train_jobs(setting, data, cfg)
    phases = dict.fromkeys(["batch", "forward", "backward", "optimizer", "routing", "aggregation"], 0.0)
    flops = steps = examples = 0                                         # flops: of one example's fwd + bwd
    start = client_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    t = time.perf_counter()
    subspaces = strategy.assign(0, 0, jobs)                              # DKO: identity tokens, routing
    phases["routing"] += time.perf_counter() - t
    gates, states = [strategy.train_gate(k) for k in subspaces], []
    for (_, _, ex), gate in zip(jobs, gates):
        opt = torch.optim.AdamW(param_groups(model, cfg.fed), weight_decay=0.0, fused=True)
        model.train()
        with train.gated(model, gate):
            for chunk in batches(ex, cfg.fed.batch_size, np.random.default_rng(0)):
                t0 = time.perf_counter()
                batch = harness.make_batch(chunk)
                phases["batch"] += time.perf_counter() - t0
                if not flops:                                          # counted once: the counter slows ops
                    with FlopCounterMode(display=False) as counter:
                        model(**batch).loss.backward()
                    flops = counter.get_total_flops() / len(chunk)
                    model.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                loss = model(**batch).loss
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                t4 = time.perf_counter()
                for name, dt in zip(["forward", "backward", "optimizer"], [t2 - t1, t3 - t2, t4 - t3]):
                    phases[name] += dt
                steps, examples = steps + 1, examples + len(chunk)
        model.eval()
        states.append(client_state(model))
        load_client_state(model, start)
    t = time.perf_counter()
    strategy.aggregate(start, states, [len(e) for _, _, e in jobs], subspaces)
    phases["aggregation"] += time.perf_counter() - t
    total = sum(phases.values())
    step_s = (phases["forward"] + phases["backward"] + phases["optimizer"]) / steps
    achieved = flops * examples / steps / step_s / 1e9
    print(f"local step: {flops * examples / steps / 1e9:.2f} GFLOP in {1e3 * step_s:.1f} ms = {achieved:.0f} GFLOP/s, "
          f"{100 * achieved / model_rate:.0f}% of the matmul rate; {1e3 * total / examples:.2f} ms per example")
    print("round: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in phases.items())
          + f" ({steps} steps, {len(jobs)} clients, {total:.1f} s)")
    lora_ratios(args)


def train_jobs(setting, data, cfg):
    """The default run's first round: 5 clients of the first stage's task, 80 examples each."""
    task = setting.tasks[0]
    return [(c, task, data[task].train[80 * c:80 * (c + 1)]) for c in range(cfg.fed.clients_per_round)]


def lora_ratios(args):
    """Forward + backward at one FFN projection of the tiny model (B 8, T 40, 128 -> 384, dropout 0.05): K = 8
    subspaces of rank 8 under a one-hot training gate and a soft (B, K) evaluation gate, against a plain LoRA of
    the same active rank; this hand LoRA against the reference formulation (loralib, PEFT: nn.Linear factors
    after nn.Dropout), whose eval outputs it must equal."""
    torch.manual_seed(0)
    B, T, I, O, K, r = args.batch, args.tokens, args.width, args.ffn, args.subspaces, args.rank
    base = torch.nn.Linear(I, O).requires_grad_(False)
    x = torch.randn(B, T, I, requires_grad=True)

    def fwd_bwd(layer, gate=None):
        with gated(layer, gate):
            layer(x).sum().backward()
    plain = LoRALinear(base, num_subspaces=1, rank=r, alpha=16.0, dropout=0.05).train()
    multi = LoRALinear(base, num_subspaces=K, rank=r, alpha=16.0 * K, dropout=0.05).train()
    wide = LoRALinear(base, num_subspaces=1, rank=K * r, alpha=16.0 * K, dropout=0.05).train()
    one_hot = torch.nn.functional.one_hot(torch.tensor(3), K).float()
    soft = torch.softmax(torch.randn(B, K), -1)
    t_plain, t_hot = timeit(lambda: fwd_bwd(plain), 50), timeit(lambda: fwd_bwd(multi, one_hot), 50)
    t_wide, t_soft = timeit(lambda: fwd_bwd(wide), 50), timeit(lambda: fwd_bwd(multi, soft), 50)
    print(f"LoRA fwd+bwd, x {tuple(x.shape)} -> {O}: one-hot gate over {K} subspaces / plain rank {r}: "
          f"{t_hot / t_plain:.2f}; soft gate / plain rank {K * r}: {t_soft / t_wide:.2f}")
    ref = Reference(base, r, 16.0 / r, 0.05)
    with torch.no_grad():
        ref.A.weight.copy_(plain.A[0]), ref.B.weight.copy_(plain.B[0] + 0.01)
        plain.B.copy_(ref.B.weight[None])
    same = torch.equal(plain.eval()(x), ref.eval()(x))
    plain.train(), ref.train()
    t_ref = timeit(lambda: ref(x).sum().backward(), 50)
    t_hand = timeit(lambda: fwd_bwd(plain), 50)
    print(f"hand LoRA / reference (nn.Linear + nn.Dropout), fwd+bwd: {t_hand / t_ref:.2f}; eval outputs "
          f"{'bitwise equal' if same else 'DIFFERENT'}")


class Reference(torch.nn.Module):
    """The textbook LoRA layer (loralib, PEFT): h = W0 x + s B(A(dropout(x)))."""

    def __init__(self, base, r, s, p):
        super().__init__()
        self.base, self.s, self.drop = base, s, torch.nn.Dropout(p)
        self.A = torch.nn.Linear(base.in_features, r, bias=False)
        self.B = torch.nn.Linear(r, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.s * self.B(self.A(self.drop(x)))


def similarity(args):
    """The identity-token structure DKO relies on, with the encoder train.py uses (model.instruction_features):
    cosine between clients of the same dataset and of different datasets, against tau; then, per dataset, the
    SSA gate its test questions put on their own dataset's token (task-related datasets, eps = 0.05)."""
    import model as M
    from data import TASK_ORDER, load_dataset
    from embedded import benchmark
    root = benchmark.write_release(args.data, seed=0)
    mdl, proc = M.load_llava(args.base)
    names, rng = list(benchmark.DATASETS), np.random.default_rng(0)
    train = {n: [e.question for e in load_dataset(root, n, "train")] for n in names}
    tokens, labels = [], []
    for name in names:
        for _ in range(args.clients):
            idx = rng.choice(len(train[name]), args.client_size, replace=False)
            tokens.append(fcit.identity_token(M.instruction_features(mdl, proc, [train[name][i] for i in idx])))
            labels.append(name)
    S = fcit.cosine_similarity(torch.stack(tokens), torch.stack(tokens)).numpy()
    lab = np.array(labels)
    same = S[(lab[:, None] == lab[None]) & ~np.eye(len(lab), dtype=bool)]
    diff = S[lab[:, None] != lab[None]]
    print(f"clients of {args.client_size} instructions, {args.clients} per dataset, {len(names)} datasets")
    print(f"same dataset:      min {same.min():.3f}  mean {same.mean():.3f}")
    print(f"different dataset: max {diff.max():.3f}  mean {diff.mean():.3f}   (threshold tau = {args.threshold})")
    print("mean cosine between datasets' clients:")
    print(" " * 12 + " ".join(f"{n[:6]:>6}" for n in names))
    for n in names:
        print(f"{n[:11]:>11} " + " ".join(f"{S[np.ix_(lab == n, lab == m)].mean():6.2f}" for m in names))
    g = torch.stack([fcit.identity_token(M.instruction_features(mdl, proc, train[n])) for n in TASK_ORDER])
    print("SSA gate of each task-related dataset's test questions on its own token (softmax, eps 0.05):")
    for k, n in enumerate(TASK_ORDER):
        q = M.instruction_features(mdl, proc, [e.question for e in load_dataset(root, n, "test")])
        a = fcit.activation_weights(q, g, temperature=0.05)
        print(f"{n:>12}: own {a[:, k].mean():.3f}  top-1 {100 * (a.argmax(1) == k).float().mean():.0f}%")


def distributed(args):
    """The same short run of train.py in 1, 2, ... processes (torchrun, one thread each), in both --parallel modes:
    wall seconds, clients trained per second of the whole run (evaluation included), and whether the results equal
    one process's (exact: bitwise; balanced: within rounding, see tests/test_parallel.py)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    flags = ["--setting", args.setting, "--rounds", str(args.rounds), "--train-limit", str(args.train_limit),
             "--test-limit", str(args.test_limit), "--lora-dropout", str(args.lora_dropout), "--fresh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen = None
    for n in args.processes:
        for mode in (["exact"] if n == 1 else ["exact", "balanced"]):
            out = tempfile.mkdtemp()
            launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
                                         if n > 1 else [])
            done = subprocess.run([*launch, "train.py", *flags, "--parallel", mode, "--out", out], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{n} process(es): train.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            res = json.load(open(os.path.join(out, "results.json")))
            clients = res["config"]["fed"]["clients_per_round"] * args.rounds * len(res["tasks"])
            same = "" if seen is None else f", accuracy matrix {'the same' if res['acc'] == seen else 'DIFFERENT'}"
            seen = seen or res["acc"]
            print(f"{n} process(es), {mode}: {res['wall_seconds']:.1f} s, {clients / res['wall_seconds']:.2f} "
                  f"clients/s (Last {res['last']:.2f}{same})", flush=True)


def stragglers(args):
    """Simulated training speed-up over one process, from the partition's real client sizes (8 task-related stages x
    10 rounds x 5 clients of 4,000-example tasks, 3 seeds), the work counted in examples: exact mode (one client a
    process, placed by parallel.world.balance) lasts as long as its most loaded process; balanced mode (every batch
    of --batch examples split over the processes) as long as the largest share of each step, ceil(b / G)."""
    from data import dirichlet_partition
    from federated import sample_clients
    from parallel.world import balance
    for beta in (0.5, 1.0, 5.0):
        line = []
        for g in args.processes:
            one = exact = balanced = 0
            for seed in range(3):
                rng = np.random.default_rng([seed, 2])
                sizes = [[len(c) for c in dirichlet_partition(4000, 50, beta=beta, min_size=4, rng=rng)]
                         for _ in range(8)]
                for t in range(8):
                    for r in range(10):
                        picked = sample_clients(50, 5, np.random.default_rng([seed, t, r]))
                        work = [sizes[t][c] for c in picked]
                        one += sum(work)
                        exact += max(sum(work[i] for i in b) for b in balance(work, g))
                        steps = [min(args.batch, n - s) for n in work for s in range(0, n, args.batch)]
                        balanced += sum(-(-b // g) for b in steps)
            line.append(f"{g} processes: exact {one / exact:.2f}x, balanced {one / balanced:.2f}x")
        print(f"beta {beta}, batch {args.batch}: " + "; ".join(line), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--tokens", type=int, default=40)
    s.add_argument("--width", type=int, default=128)
    s.add_argument("--ffn", type=int, default=384)
    s.add_argument("--subspaces", type=int, default=8)
    s.add_argument("--rank", type=int, default=8)
    m = sub.add_parser("similarity")
    m.add_argument("--base", required=True)
    m.add_argument("--data", required=True, help="embedded benchmark folder (written if missing)")
    m.add_argument("--clients", type=int, default=5)
    m.add_argument("--client-size", type=int, default=40)
    m.add_argument("--threshold", type=float, default=0.9)
    d = sub.add_parser("distributed")
    d.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    d.add_argument("--setting", default="task-hom")
    d.add_argument("--rounds", type=int, default=2)
    d.add_argument("--train-limit", type=int, default=400)
    d.add_argument("--test-limit", type=int, default=20)
    d.add_argument("--lora-dropout", type=float, default=0.05, help="0: balanced then differs by rounding only")
    t = sub.add_parser("stragglers")
    t.add_argument("--processes", type=int, nargs="+", default=[2, 5])
    t.add_argument("--batch", type=int, default=8, help="examples per local step (the paper preset's: 128)")
    a = ap.parse_args()
    {"speed": speed, "similarity": similarity, "distributed": distributed, "stragglers": stragglers}[a.cmd](a)
