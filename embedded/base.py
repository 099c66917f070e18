"""The tiny base of the embedded benchmark: a LLaVA small enough to instruction-tune on a laptop CPU.

A `LlavaForConditionalGeneration` as transformers builds it (a CLIP vision tower on 32x32 images with 8x8 patches,
a 2-layer GELU projector, a 4-layer Llama) and a word-level tokenizer built from the benchmark's vocabulary. Like
LLaVA-1.5 before instruction tuning, the base is pretrained (all weights) on generic image-text pairs
(embedded/pretraining.py: what is in an image, none of the 12 datasets' instructions or answer forms) and
saved with `save_pretrained`, so `model.load_llava(dir)` reads it exactly as it reads a real llava-1.5-7b-hf folder.

    python -m embedded.base --out embedded/tiny-llava   # rebuild the shipped base (1 thread, ~5 minutes)
    python -m embedded.base --out DIR --probe           # its greedy accuracy on held-out pretraining questions
The repository ships the base (embedded/tiny-llava, its recipe.json and hash in the README): every user starts
from the same weights and a first run needs no pretraining. train.py pretrains into the cache ($FCIT_CACHE) only
a base of another recipe (the tiny test preset's, or after a change of the vocabulary or the mixture). Tests: python -m pytest tests/test_model.py
"""
import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from embedded import pretraining
from federated import cosine_lr
from model import answer_loss, collate, generate, load_llava

# B batch, T tokens, D width, P image tokens


@dataclass
class BaseConfig:
    image_size: int = 32
    patch_size: int = 8            # one patch per grid cell of the embedded images
    vision_width: int = 96
    vision_layers: int = 2
    width: int = 128               # language model hidden size
    layers: int = 4
    heads: int = 4
    ffn: int = 384                 # LlamaMLP intermediate size: where LoRA lives
    patch_init_scale: float = 4.0  # x CLIP's init of the patch embedding (see build_tiny_llava)
    system: str = "a chat between a human and an assistant ."  # vicuna_v1's system line, shortened for CPU speed
    pretrain_examples: int = 230400  # generic image-text pairs seen once (7200 steps, ~25 min at 1 thread); 1800
                                     # steps left descriptions 13-25% exact, MTL Last 53: the tasks were not learnable
    pretrain_batch: int = 32
    pretrain_lr: float = 5e-4       # measured: 2e-3 stalls at the answer prior (loss 0.8), 5e-4 reaches 0.22
    seed: int = 0
    threads: int = 1                # torch's intra-op threads while pretraining: float sums, and so the weights, depend on it


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-llava")   # the base in the repository


# ---------------------------------------------------------------------------- tokenizer and processor
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORD = r"\d+\.\d+|[a-z0-9]+|[^\sa-z0-9]"          # words, decimals (box coordinates) and single symbols


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word in `texts` (sorted: deterministic ids)."""
    splitter = pre_tokenizers.Split(Regex(WORD), behavior="isolated")
    words = sorted({w for t in texts for w, _ in splitter.pre_tokenize_str(t.lower())} - set(SPECIALS))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), splitter])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor(tokenizer, cfg: BaseConfig) -> LlavaProcessor:
    size = cfg.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=Image.NEAREST)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


# ---------------------------------------------------------------------------- the model
def build_tiny_llava(tokenizer, cfg: BaseConfig) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=cfg.vision_width, intermediate_size=2 * cfg.vision_width,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=4,
                              image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=cfg.ffn,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu",
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(cfg.image_size // cfg.patch_size) ** 2)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        # CLIP's init (std 0.02) makes a patch's content ~2% of its embedding next to the position embedding, and
        # the pre-LayerNorm keeps it there. Measured (2 cores, 600 steps): the shape of a one-cell object was
        # at chance with it and 98% after 150 steps with the patch embedding scaled up 4x.
        model.model.vision_tower.embeddings.patch_embedding.weight.mul_(cfg.patch_init_scale)
    return model


# ---------------------------------------------------------------------------- pretraining
def pretrain_base(out_dir, cfg: BaseConfig, *, log=print):
    """Build the tokenizer, processor and tiny LLaVA; train all weights on the generic mixture; save to out_dir with
    its recipe (recipe.json: the config and BASE_VERSION). Runs on cfg.threads threads whatever the caller's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(out_dir, cfg, log)
    finally:
        torch.set_num_threads(threads)


def recipe(cfg: BaseConfig):
    return {"base_version": pretraining.BASE_VERSION, **asdict(cfg)}


def shipped(cfg: BaseConfig):
    """The repository's base when it was made by this recipe (code version, config, threads), else None."""
    path = os.path.join(SHIPPED, "recipe.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) == recipe(cfg):
                return SHIPPED
    return None


def weights_sha256(folder, limit=1 << 28):
    """The sha256 of a base's weight files, in name order (results.json records it; the README gives the shipped
    base's); None above `limit` bytes (a 7B checkpoint: the run's fingerprint digests its headers instead)."""
    names = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin")))
    if not names or sum(os.path.getsize(os.path.join(folder, n)) for n in names) > limit:
        return None
    h = hashlib.sha256()
    for n in names:
        with open(os.path.join(folder, n), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _pretrain(out_dir, cfg: BaseConfig, log):
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(pretraining.corpus(cfg.seed) + [cfg.system, "user : assistant :"])
    processor = build_processor(tokenizer, cfg)
    model = build_tiny_llava(tokenizer, cfg)
    data = pretraining.pretraining_mixture(cfg.pretrain_examples, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    steps = len(data) // cfg.pretrain_batch
    every = max(1, steps // 10)                                           # ten progress lines, each with an ETA
    t0 = time.time()
    for step in range(steps):
        chunk = data[step * cfg.pretrain_batch:(step + 1) * cfg.pretrain_batch]
        batch = collate(processor, *map(list, zip(*chunk)), system=cfg.system)
        for g in opt.param_groups:
            g["lr"] = cfg.pretrain_lr * cosine_lr(step, steps, steps // 20)
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % every == 0 or step == steps - 1:
            elapsed = time.time() - t0
            log(f"pretrain step {step + 1}/{steps} loss {loss.item():.3f} | {elapsed:.0f}s elapsed, "
                f"ETA {elapsed / (step + 1) * (steps - step - 1):.0f}s")
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "recipe.json"), "w") as f:
        json.dump(recipe(cfg), f, indent=1)
    if os.path.isdir(out_dir):                                            # rebuilding the shipped base
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)                                              # atomic: a crash leaves no half base
    return out_dir


def probe_base(path, *, n=400, seed=1, log=print):
    """Greedy accuracy of a base on held-out pretraining questions, per skill (the first words of the question)."""
    model, processor = load_llava(path)
    items = pretraining.pretraining_mixture(n, seed)
    preds = []
    for i in range(0, n, 100):
        chunk = items[i:i + 100]
        preds += generate(model, processor, [c[0] for c in chunk], [c[1] for c in chunk], system=BaseConfig.system)
    skills = {}
    for (_, q, a), p in zip(items, preds):
        skills.setdefault(" ".join(q.split()[:3]), []).append(p.strip() == a)
    for k, v in sorted(skills.items()):
        log(f"{k:>20}: {100 * np.mean(v):5.1f}% of {len(v)}")
    return {k: float(np.mean(v)) for k, v in skills.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Pretrain the tiny LLaVA base of the embedded benchmark.")
    ap.add_argument("--out", required=True, help="the folder to write (save_pretrained layout)")
    ap.add_argument("--seed", type=int, default=BaseConfig.seed)
    ap.add_argument("--examples", type=int, default=BaseConfig.pretrain_examples)
    ap.add_argument("--probe", action="store_true", help="only report the base's accuracy per pretraining skill")
    a = ap.parse_args()
    if a.probe:
        probe_base(a.out)
    else:
        pretrain_base(a.out, BaseConfig(seed=a.seed, pretrain_examples=a.examples))
