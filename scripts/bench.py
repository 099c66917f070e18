"""Measurements that back the claims of the README and RESULTS.md (printed figures, never timed tests).

    python -m scripts.bench speed       # a local step against the machine's matmul rate, the phases of a round,
                                        # gated vs plain and hand vs reference LoRA (OMP_NUM_THREADS sets threads)
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


def gpu(args):
    """Local training and evaluation on a model of LLaVA-1.5-7B's shapes (random weights: no download), with the
    paper preset's settings: bf16 base, fp32 LoRA (8 subspaces of rank 8 on the FFN), global batch 128 through
    micro-batches, an optimizer over LoRA and projector only. For every attention implementation x gradient
    checkpointing x micro-batch asked for: tokens/s, the achieved model FLOP/s against the chip's bf16 peak (MFU)
    and against its measured matmul rate, and peak memory; then gated evaluation batches (SSA, a different gate per
    row). Model FLOPs: one micro-batch's forward + backward counted by torch's FlopCounterMode without
    checkpointing (its recomputation is not useful work), per processed token, times the epoch's tokens.
    --tiny runs the same code on small shapes (a CPU check of the script)."""
    import json
    import tempfile

    from torch.utils.flop_counter import FlopCounterMode

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
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report = open(args.out, "a") if args.out else None

    def emit(record):
        print(json.dumps(record), flush=True)
        if report:
            report.write(json.dumps(record) + "\n")
            report.flush()
    # the chip: a large bf16 GEMM (the ceiling this code can hope for) and the datasheet's dense bf16 peak
    n = 8192 if device == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul = 2 * n ** 3 / timeit(lambda: (a @ b, sync()), repeat=10)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = 989.4e12 if any(h in name for h in ("H100", "H200")) else None     # SXM, dense bf16 (NVIDIA)
    emit({"device": name, "matmul_TFLOPs": round(matmul / 1e12, 1), "datasheet_TFLOPs": peak and peak / 1e12})
    del a, b
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
    model.eval()
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"built on {device} in {time.perf_counter() - t0:.0f}s: {n_base / 1e9:.2f} B frozen ({dtype}), "
          f"{n_train / 1e6:.1f} M trainable (LoRA fp32 + projector)", flush=True)
    root = benchmark.write_release(tempfile.mkdtemp(), seed=0, sizes=benchmark.Sizes(args.examples,
                                                                                     max(args.eval_batch)))
    examples = load_dataset(root, "CLEVR-Math", "train")
    run = train.RunConfig(system=M.VICUNA_SYSTEM, device=device, fed=FedConfig())
    harness = train.make_harness(model, processor, {}, run, log=None)
    harness.encode_text = lambda qs: torch.randn(len(qs), 128)     # random identity features: no encoder to load
    tokens = sum(int(M.collate(processor, [Image.new("RGB", (size, size))], [e.question], [e.answer],
                               system=run.system)["attention_mask"].sum()) for e in examples)
    gate = torch.nn.functional.one_hot(torch.tensor(3), 8).float()
    # evaluation first, while LoRA's B = 0 and the base is random: no row stops early, every question decodes all
    # new_tokens. Batched greedy decoding, each row gated by its own softmax over 8 subspaces (SSA)
    strategy = Disco(model, harness, FedConfig())
    strategy.cache = TokenCache(torch.nn.functional.normalize(torch.randn(8, 128), dim=-1), torch.full((8,), 100))
    test = load_dataset(root, "CLEVR-Math", "test")
    metrics.evaluate_dataset(train.answerer(model, processor, run), strategy.eval_gate, "exact", test[:4], batch=4)
    for new_tokens in args.new_tokens:
        answer = train.answerer(model, processor, train.RunConfig(system=M.VICUNA_SYSTEM, device=device,
                                                                  fed=FedConfig(max_new_tokens=new_tokens)))
        for eb in args.eval_batch:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            metrics.evaluate_dataset(answer, strategy.eval_gate, "exact", test[:eb], batch=eb)
            sync()
            s = time.perf_counter() - t0
            emit({"eval_batch": eb, "new_tokens": new_tokens, "seconds": round(s, 2),
                  "ms_per_question": round(1e3 * s / eb, 1),
                  "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None})
    # model FLOPs per processed token: one micro-batch, forward + backward, no checkpointing (also the warm-up)
    batch = harness.make_batch(examples[:min(args.micro_batch)])
    model.train()
    with train.gated(model, gate), FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    per_token = counter.get_total_flops() / batch["input_ids"].numel()
    emit({"examples": len(examples), "tokens": tokens, "model_GFLOP_per_token": round(per_token / 1e9, 2),
          "frozen_B": round(n_base / 1e9, 2), "trainable_M": round(n_train / 1e6, 1)})
    for attn in args.attn:
        model.set_attn_implementation(attn)
        for ckpt in args.checkpointing:
            if ckpt == "on":
                M.checkpoint_activations(model)
            else:
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
            for mb in args.micro_batch:
                row = {"attn": attn, "checkpointing": ckpt, "micro_batch": mb}
                if time.perf_counter() - start > args.budget:
                    emit({**row, "skipped": "over --budget"})
                    continue
                cfg = FedConfig(lr=2e-4, projector_lr=2e-5, batch_size=args.batch, micro_batch=mb)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                try:
                    _, loss = local_train(model, harness, examples, gate=gate, cfg=cfg, rng=np.random.default_rng(0))
                except torch.OutOfMemoryError:
                    model.zero_grad(set_to_none=True)
                    emit({**row, "out_of_memory": True})
                    continue
                sync()
                s = time.perf_counter() - t0
                achieved = per_token * tokens / s
                emit({**row, "seconds": round(s, 1), "tokens_per_s": round(tokens / s),
                      "model_TFLOPs": round(achieved / 1e12, 1), "MFU": peak and round(achieved / peak, 3),
                      "of_matmul": round(achieved / matmul, 3), "loss": round(loss, 3),
                      "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None})
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


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
    g = sub.add_parser("gpu")
    g.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    g.add_argument("--examples", type=int, default=256, help="the client's examples (one local epoch)")
    g.add_argument("--batch", type=int, default=128)
    g.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16, 32])
    g.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations: sdpa, eager, ...")
    g.add_argument("--checkpointing", nargs="+", default=["on"], choices=["on", "off"])
    g.add_argument("--eval-batch", type=int, nargs="+", default=[16, 32, 64])
    g.add_argument("--new-tokens", type=int, nargs="+", default=[16],
                   help="generated per question (random weights never stop early: all of them)")
    g.add_argument("--budget", type=float, default=1e9, help="seconds after which no further training row starts")
    g.add_argument("--out", help="also append each JSON line to this file")
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
    {"speed": speed, "similarity": similarity, "gpu": gpu, "distributed": distributed, "stragglers": stragglers}[a.cmd](a)
