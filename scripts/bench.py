"""Measurements that back the claims of the README and RESULTS.md (printed figures, never timed tests).

    python -m scripts.bench speed       # gated K-subspace LoRA vs plain LoRA of the same total rank; routing and
                                        # aggregation time as a share of a round
    python -m scripts.bench similarity  # identity-token cosine structure on the embedded benchmark: same-dataset
                                        # clients vs different datasets, against the DKO threshold
    python -m scripts.bench gpu         # one client's local epoch + a gated evaluation batch on LLaVA-7B shapes
    python -m scripts.bench distributed # one short run at 1, 2, ... torchrun processes: wall time, clients/s
    python -m scripts.bench stragglers  # simulated speed-up of one client a process, from real client sizes
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
    with gated(layer, gate):
        return layer(x)


def similarity(args):
    """The identity-token structure DKO relies on, with the encoder train.py uses (model.instruction_features):
    cosine between clients of the same dataset and of different datasets, against tau; then, per dataset, the
    SSA gate its test questions put on their own dataset's token (task-related datasets, eps = 0.05)."""
    import model as M
    from data import TASK_ORDER, load_dataset
    from embedded import benchmark, pretraining
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


def gpu(args):
    """One client's local epoch and one evaluation batch on a model of LLaVA-1.5-7B's shapes (random weights: no
    download), with the paper preset's settings: bf16 base, fp32 LoRA (8 subspaces of rank 8 on the FFN), global
    batch 128 through micro-batches, gradient checkpointing, an optimizer over LoRA and projector only. Prints
    tokens per second and peak memory. --tiny runs the same code on small shapes (a CPU check of the script)."""
    import json
    import tempfile

    import model as M
    import train
    from data import load_dataset
    from embedded import benchmark, pretraining
    from embedded.base import build_tokenizer
    import metrics
    from federated import Disco, FedConfig, local_train
    from fcit import TokenCache
    from lora import LoRAConfig, add_lora
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = build_tokenizer(pretraining.corpus(0) + [M.VICUNA_SYSTEM, "user : assistant :"])
    size, patch = (336, 14) if not args.tiny else (28, 14)
    vision = CLIPVisionConfig(**(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, projection_dim=768) if not args.tiny else
                                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
                              image_size=size, patch_size=patch)
    text = LlamaConfig(**(dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32) if not args.tiny else
                          dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2)),
                       vocab_size=32064, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=(size // patch) ** 2)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                  crop_size={"height": size, "width": size}),
                               tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)                       # build the 7B base directly in bf16: half the memory
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, LoRAConfig(num_subspaces=8, rank=8, alpha=128.0), generator=torch.Generator().manual_seed(0))
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"built on {device} in {time.perf_counter() - t0:.0f}s: {n_base / 1e9:.2f} B frozen ({dtype}), "
          f"{n_train / 1e6:.1f} M trainable (LoRA fp32 + projector)", flush=True)
    root = benchmark.write_release(tempfile.mkdtemp(), seed=0, sizes=benchmark.Sizes(args.examples, 32))
    examples = load_dataset(root, "CLEVR-Math", "train")
    cfg = FedConfig(lr=2e-4, projector_lr=2e-5, batch_size=args.batch, micro_batch=args.micro_batch,
                    eval_batch=args.eval_batch, max_new_tokens=16)
    run = train.RunConfig(system=M.VICUNA_SYSTEM, device=device, fed=cfg)
    harness = train.make_harness(model, processor, {}, run, log=None)
    harness.encode_text = lambda qs: torch.randn(len(qs), 128)     # random identity features: no encoder to load
    tokens = sum(int(M.collate(processor, [Image.new("RGB", (size, size))], [e.question], [e.answer],
                               system=run.system)["attention_mask"].sum()) for e in examples)
    gate = torch.nn.functional.one_hot(torch.tensor(3), 8).float()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, loss = local_train(model, harness, examples, gate=gate, cfg=cfg, rng=np.random.default_rng(0))
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    # evaluation: batched greedy decoding, each row gated by its own softmax over 8 subspaces (SSA)
    strategy = Disco(model, harness, cfg)
    strategy.cache = TokenCache(torch.nn.functional.normalize(torch.randn(8, 128), dim=-1), torch.full((8,), 100))
    test = load_dataset(root, "CLEVR-Math", "test")[:args.eval_batch]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics.evaluate_dataset(train.answerer(model, processor, run), strategy.eval_gate, "exact", test,
                             batch=cfg.eval_batch)
    if device == "cuda":
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - t0
    eval_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "examples": len(examples),
           "tokens": tokens, "train_seconds": round(train_s, 1), "train_tokens_per_s": round(tokens / train_s),
           "train_peak_GiB": round(peak, 1), "loss": round(loss, 3), "eval_batch": len(test),
           "eval_seconds": round(eval_s, 1), "eval_peak_GiB": round(eval_peak, 1),
           "batch": cfg.batch_size, "micro_batch": cfg.micro_batch}
    print(json.dumps(out), flush=True)


def distributed(args):
    """The same short run of train.py in 1, 2, ... processes (torchrun, one thread each): wall seconds, clients
    trained per second of the whole run (evaluation included), and whether the results are the same."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    flags = ["--setting", args.setting, "--rounds", str(args.rounds), "--train-limit", str(args.train_limit),
             "--test-limit", str(args.test_limit), "--fresh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen = None
    for n in args.processes:
        out = tempfile.mkdtemp()
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
                                     if n > 1 else [])
        done = subprocess.run([*launch, "train.py", *flags, "--out", out], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{n} process(es): train.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        res = json.load(open(os.path.join(out, "results.json")))
        clients = res["config"]["fed"]["clients_per_round"] * args.rounds * len(res["tasks"])
        same = "" if seen is None else f", results {'the same' if res['acc'] == seen else 'DIFFERENT'}"
        seen = seen or res["acc"]
        print(f"{n} process(es): {res['wall_seconds']:.1f} s, {clients / res['wall_seconds']:.2f} clients/s "
              f"(Last {res['last']:.2f}{same})", flush=True)


def stragglers(args):
    """Simulated training speed-up of one client per process, from the partition's real client sizes: a round's
    time is its most loaded process's examples (clients placed by parallel.world.balance), over 8 task-related
    stages x 10 rounds x 5 clients of 4,000-example tasks (the default run), against one process."""
    from data import dirichlet_partition
    from federated import sample_clients
    from parallel.world import balance
    for beta in (0.5, 1.0, 5.0):
        line = []
        for g in args.processes:
            one = many = 0
            for seed in range(3):
                rng = np.random.default_rng([seed, 2])
                sizes = [[len(c) for c in dirichlet_partition(4000, 50, beta=beta, min_size=4, rng=rng)]
                         for _ in range(8)]
                for t in range(8):
                    for r in range(10):
                        picked = sample_clients(50, 5, np.random.default_rng([seed, t, r]))
                        work = [sizes[t][c] for c in picked]
                        one += sum(work)
                        many += max(sum(work[i] for i in b) for b in balance(work, g))
            line.append(f"{g} processes {one / many:.2f}x")
        print(f"beta {beta}: " + ", ".join(line), flush=True)


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
    g = sub.add_parser("gpu")
    g.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    g.add_argument("--examples", type=int, default=256, help="the client's examples (one local epoch)")
    g.add_argument("--batch", type=int, default=128)
    g.add_argument("--micro-batch", type=int, default=8)
    g.add_argument("--eval-batch", type=int, default=16)
    d = sub.add_parser("distributed")
    d.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    d.add_argument("--setting", default="task-hom")
    d.add_argument("--rounds", type=int, default=2)
    d.add_argument("--train-limit", type=int, default=400)
    d.add_argument("--test-limit", type=int, default=20)
    t = sub.add_parser("stragglers")
    t.add_argument("--processes", type=int, nargs="+", default=[2, 5])
    a = ap.parse_args()
    {"speed": speed, "similarity": similarity, "gpu": gpu, "distributed": distributed, "stragglers": stragglers}[a.cmd](a)
