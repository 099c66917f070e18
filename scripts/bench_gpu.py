"""GPU throughput, MFU and memory of local training and evaluation at LLaVA-1.5-7B's shapes (random weights: no
download), the figures of the README's real-benchmark section and of `--preset paper`'s batch choices.

    python -m scripts.bench_gpu                                            # sdpa, checkpointing on, micro-batch 8 16 32
    python -m scripts.bench_gpu --examples 128 --micro-batch 4 8 16 32 --attn sdpa eager --checkpointing on off
    python -m scripts.bench_gpu --tiny                                     # the same code on small shapes, on a CPU
Prints one JSON line a figure (--out FILE appends them to FILE too).
"""
import argparse
import time

import numpy as np
import torch

from scripts.bench import timeit


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
    building, make_batch = [0.0], harness.make_batch

    def timed_batch(chunk):                      # decoding, the image processor, tokenizing, the copy to the device:
        t = time.perf_counter()                  # CPU work in the step, while the GPU waits (local_train builds a
        batch = make_batch(chunk)                # step's micro-batches before its first forward)
        building[0] += time.perf_counter() - t
        return batch
    harness.make_batch = timed_batch
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
            M.checkpoint_activations(model, on=ckpt == "on")
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
                t0, building[0] = time.perf_counter(), 0.0
                try:
                    _, loss = local_train(model, harness, examples, gate=gate, cfg=cfg, rng=np.random.default_rng(0))
                except torch.OutOfMemoryError:
                    model.zero_grad(set_to_none=True)
                    emit({**row, "out_of_memory": True})
                    continue
                sync()
                s = time.perf_counter() - t0
                achieved = per_token * tokens / s
                emit({**row, "seconds": round(s, 1), "batch_building": round(building[0] / s, 3),
                      "tokens_per_s": round(tokens / s),
                      "model_TFLOPs": round(achieved / 1e12, 1), "MFU": peak and round(achieved / peak, 3),
                      "of_matmul": round(achieved / matmul, 3), "loss": round(loss, 3),
                      "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None})
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    ap.add_argument("--examples", type=int, default=256, help="the client's examples (one local epoch)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations: sdpa, eager, ...")
    ap.add_argument("--checkpointing", nargs="+", default=["on"], choices=["on", "off"])
    ap.add_argument("--eval-batch", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[16],
                    help="generated per question (random weights never stop early: all of them)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which no further training row starts")
    ap.add_argument("--out", help="also append each JSON line to this file")
    gpu(ap.parse_args())
