"""Measurements that back the claims of the README (printed figures, never timed tests).

    python bench.py speed        # gated K-subspace LoRA vs plain LoRA of the same total rank; routing + aggregation
                                 # time as a share of a round
    python bench.py similarity   # identity-token cosine structure on the embedded benchmark: same-dataset clients
                                 # vs different datasets, against the DKO threshold
"""
import argparse
import time

import numpy as np
import torch

import fcit
from lora import LoRALinear


def timeit(fn, repeat=20):
    fn()                                                                   # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def speed(args):
    torch.manual_seed(0)
    B, T, I, O, K, r = args.batch, args.tokens, args.width, args.ffn, args.subspaces, args.rank
    base = torch.nn.Linear(I, O)
    plain = LoRALinear(base, num_subspaces=1, rank=K * r, alpha=2.0 * K * r)
    multi = LoRALinear(base, num_subspaces=K, rank=r, alpha=2.0 * K * r)
    x = torch.randn(B, T, I)
    gate = torch.softmax(torch.randn(B, K), -1)                           # (B, K): one gate row per sample
    with torch.no_grad():
        t_plain, t_gated = timeit(lambda: plain(x)), timeit(lambda: multi_gated(multi, x, gate))
    print(f"LoRA forward, x {tuple(x.shape)}, total rank {K * r}: plain {1e3 * t_plain:.2f} ms, "
          f"{K} gated subspaces {1e3 * t_gated:.2f} ms, ratio {t_gated / t_plain:.2f}")
    # server work of one DISCO round: routing 5 clients and aggregating one subspace of every FFN layer
    D, C, L = 128, 5, 3 * args.layers
    cache = fcit.TokenCache(torch.nn.functional.normalize(torch.randn(K, D), dim=-1), torch.full((K,), 100))
    tokens = torch.nn.functional.normalize(torch.randn(C, D), dim=-1)
    t_route = timeit(lambda: fcit.route_clients(tokens, [40] * C, cache, threshold=0.9, max_subspaces=K))
    As, Bs = [torch.randn(r, I) for _ in range(C)], [torch.randn(O, r) for _ in range(C)]
    t_agg = L * timeit(lambda: fcit.svd_aggregate(As, Bs, torch.ones(C), rank=r))
    print(f"DKO routing of {C} clients: {1e3 * t_route:.2f} ms; SVD aggregation of {L} layers: {1e3 * t_agg:.1f} ms")
    if args.round_seconds:
        print(f"share of a {args.round_seconds:.1f} s round: {100 * (t_route + t_agg) / args.round_seconds:.2f}%")


def multi_gated(layer, x, gate):
    layer.gate = gate
    try:
        return layer(x)
    finally:
        layer.gate = None


def similarity(args):
    import model as M
    import synthetic
    from data import load_dataset
    from lora import LoRAConfig, add_lora, gated
    root = synthetic.write_release(args.data, seed=0) if args.data else None
    mdl, proc = M.load_llava(args.base)
    add_lora(mdl, LoRAConfig(num_subspaces=1, rank=1))
    names = list(synthetic.DATASETS)
    rng = np.random.default_rng(0)
    tokens, labels = [], []
    with gated(mdl, torch.zeros(1)):
        for name in names:
            qs = [e.question for e in load_dataset(root, name, "train")]
            for _ in range(args.clients):
                idx = rng.choice(len(qs), args.client_size, replace=False)
                tokens.append(fcit.identity_token(M.instruction_features(mdl, proc, [qs[i] for i in idx])))
                labels.append(name)
    S = fcit.cosine_similarity(torch.stack(tokens), torch.stack(tokens)).numpy()
    lab = np.array(labels)
    same = S[(lab[:, None] == lab[None]) & ~np.eye(len(lab), dtype=bool)]
    diff = S[lab[:, None] != lab[None]]
    print(f"clients of {args.client_size} instructions, {args.clients} per dataset")
    print(f"same dataset:      min {same.min():.3f}  mean {same.mean():.3f}")
    print(f"different dataset: max {diff.max():.3f}  mean {diff.mean():.3f}   (threshold tau = {args.threshold})")
    print("mean cosine between datasets' clients:")
    print(" " * 12 + " ".join(f"{n[:6]:>6}" for n in names))
    for i, n in enumerate(names):
        row = [S[np.ix_(lab == n, lab == m)].mean() for m in names]
        print(f"{n[:11]:>11} " + " ".join(f"{v:6.2f}" for v in row))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--tokens", type=int, default=48)
    s.add_argument("--width", type=int, default=128)
    s.add_argument("--ffn", type=int, default=384)
    s.add_argument("--subspaces", type=int, default=8)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--round-seconds", type=float, default=0.0, help="measured seconds of one round, for the share")
    m = sub.add_parser("similarity")
    m.add_argument("--base", required=True)
    m.add_argument("--data", required=True, help="embedded benchmark folder (written if missing)")
    m.add_argument("--clients", type=int, default=5)
    m.add_argument("--client-size", type=int, default=40)
    m.add_argument("--threshold", type=float, default=0.9)
    a = ap.parse_args()
    {"speed": speed, "similarity": similarity}[a.cmd](a)
