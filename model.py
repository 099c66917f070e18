"""The model: a LLaVA (vision tower + projector + language model) as transformers builds it, tiny or real.

The embedded benchmark uses a tiny `LlavaForConditionalGeneration` (a CLIP vision tower on 32x32 images with
8x8 patches, a 2-layer GELU projector, a 4-layer Llama) and a word-level tokenizer built from the benchmark's
vocabulary. Like LLaVA-1.5 before instruction tuning, the base is pretrained (all weights) on generic image-text
data (synthetic.pretraining_mixture) and saved with `save_pretrained`, so the very same `load_llava(dir)` reads
it or a real `llava-hf/llava-1.5-7b-hf` folder. Prompts follow vicuna_v1 (notes 1.5):
    "{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>"      loss on the answer tokens only.
DISCO's frozen text encoders live here too: the tiny base's own word embeddings (instruction_features) and, for the
real benchmark, CLIP's pooled text output (clip_text_features), as the paper's code.

    python model.py --out .cache/fcit/base-v7-seed0-57600   # pretrain the tiny base (~3 minutes on 2 cores)
    python model.py --out DIR --probe                       # its greedy accuracy on held-out pretraining questions
Tests: python -m pytest tests/test_model.py
"""
import argparse
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (AutoProcessor, AutoTokenizer, CLIPImageProcessorPil, CLIPTextModel, CLIPVisionConfig,
                          LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)

# B batch, T tokens, D width, P image tokens


@dataclass
class ModelConfig:
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
    pretrain_examples: int = 57600  # generic image-text pairs seen once by the base (1800 steps, ~2.5 min)
    pretrain_batch: int = 32
    pretrain_lr: float = 5e-4       # measured: 2e-3 stalls at the answer prior (loss 0.8), 5e-4 reaches 0.22
    seed: int = 0


# vicuna_v1's system line, what LLaVA-1.5 was instruction-tuned with (the real benchmark's prompt)
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# ---------------------------------------------------------------------------- tokenizer, processor, prompt
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


def build_processor(tokenizer, cfg: ModelConfig) -> LlavaProcessor:
    size = cfg.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=Image.NEAREST)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def prompt(question: str, system: str) -> str:
    """vicuna_v1 up to the answer; the data's question already starts with '<image>\\n' (LLaVA format)."""
    if "<image>" not in question:
        question = "<image>\n" + question
    return f"{system} USER: {question} ASSISTANT:"


# ---------------------------------------------------------------------------- building and loading
def build_tiny_llava(tokenizer, cfg: ModelConfig) -> LlavaForConditionalGeneration:
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


def require_folder(path, what, files):
    """A local model folder or a clear error: nothing is ever downloaded."""
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path}: not a {what} folder, missing {', '.join(missing)}; expected the files that "
                                f"save_pretrained writes (config.json, *.safetensors, tokenizer and processor files)")


def load_llava(path, *, dtype=torch.float32, device="cpu"):
    """(model, processor) from a folder in the llava-hf layout (e.g. llava-hf/llava-1.5-7b-hf), or the tiny base."""
    require_folder(path, "LLaVA checkpoint", ["config.json"])
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    processor.tokenizer.padding_side = "left"
    return model, processor


def load_text_encoder(path, *, device="cpu"):
    """(CLIPTextModel, tokenizer) from a local folder, e.g. openai/clip-vit-large-patch14-336: DISCO's frozen text
    encoder on the real benchmark (the official code's CLIPTextTower)."""
    require_folder(path, "CLIP text encoder", ["config.json"])
    encoder = CLIPTextModel.from_pretrained(path, local_files_only=True).to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------- batches, loss, generation
def collate(processor, images, questions, answers=None, *, system):
    """Token ids with the image placeholder expanded, pixel values, and labels on the answer (+ eos) only.
    Without answers: left-padded prompts for generation."""
    tok = processor.tokenizer
    enc = processor(text=[prompt(q, system) for q in questions], images=images)
    prompts = enc["input_ids"]                                             # list of lists (prompt only)
    if answers is None:
        seqs, labels = prompts, [[-100] * len(p) for p in prompts]
    else:
        ans = tok([" " + a for a in answers], add_special_tokens=False)["input_ids"]
        seqs = [p + a + [tok.eos_token_id] for p, a in zip(prompts, ans)]
        labels = [[-100] * len(p) + a + [tok.eos_token_id] for p, a in zip(prompts, ans)]
    T = max(len(s) for s in seqs)
    left = answers is None                                                 # generation continues on the right
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)   # (B, T)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], lab[i, sl], mask[i, sl] = torch.tensor(s), torch.tensor(l), 1
    pixels = torch.as_tensor(np.asarray(enc["pixel_values"]))              # (B, 3, H, W)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": lab}


def to_device(batch, device, dtype=None):
    out = {k: v.to(device) for k, v in batch.items()}
    if dtype is not None:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def answer_loss(model, batch):
    """Mean cross-entropy over answer tokens (labels -100 elsewhere); transformers shifts the labels."""
    return model(**batch).loss


@torch.no_grad()
def generate(model, processor, images, questions, *, system, max_new_tokens=16):
    """Greedy answers for a batch (decoded, special tokens removed)."""
    batch = collate(processor, images, questions, system=system)
    batch.pop("labels")
    batch = to_device(batch, model.device, model.dtype)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    return processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def instruction_features(model, processor, questions, *, batch_size=256):
    """The embedded benchmark's frozen text encoder: the mean of the base's input word embeddings, each scaled to
    unit length, over the question (no image token, no template, no answer). DISCO's identity tokens are means of
    these; LoRA never touches the embeddings, so the encoder stays frozen. Measured on the tiny base (bench.py
    similarity): clients of one dataset >= 0.96 apart from clients of another <= 0.84, so tau = 0.9 separates them,
    and every test question of the 8 task-related datasets puts >= 0.96 of its SSA gate on its own dataset, while
    mean-pooled hidden states of the language model blur datasets together (different datasets up to 0.95).
    Unit length keeps frequent function words from dominating. The real benchmark uses CLIP's text encoder."""
    tok, embed = processor.tokenizer, model.get_input_embeddings()
    feats = []
    for i in range(0, len(questions), batch_size):
        qs = [q.replace("<image>", "").strip() for q in questions[i:i + batch_size]]
        enc = tok(qs, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        h = torch.nn.functional.normalize(embed(enc["input_ids"]).float(), dim=-1)               # (B, T, D)
        m = enc["attention_mask"].unsqueeze(-1).float()                                        # (B, T, 1)
        feats.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu())                           # (B, D)
    return torch.cat(feats)


@torch.no_grad()
def clip_text_features(encoder, tokenizer, questions, *, batch_size=256):
    """CLIP's pooled output (the final hidden state at the end-of-text token, no projection) of each question
    without the image token: the identity feature of the paper and its code (77 tokens at most)."""
    feats = []
    for i in range(0, len(questions), batch_size):
        qs = [q.replace("<image>", "").strip() for q in questions[i:i + batch_size]]
        enc = tokenizer(qs, padding=True, truncation=True, max_length=77, return_tensors="pt").to(encoder.device)
        feats.append(encoder(**enc).pooler_output.float().cpu())                               # (B, D)
    return torch.cat(feats)


@torch.no_grad()
def image_features(model, processor, images, *, batch_size=256):
    """A frozen image feature per image: the vision tower's patch features averaged (for the paper's ablation of
    image identity tokens; the vision tower is never trained, so this encoder is frozen too)."""
    feats = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        h = model.model.vision_tower(pixels.to(model.device, model.dtype)).last_hidden_state   # (B, 1 + P, D)
        feats.append(h[:, 1:].mean(1).float().cpu())                                          # (B, D)
    return torch.cat(feats)


# ---------------------------------------------------------------------------- pretraining the tiny base
def cosine_lr(step, total, warmup):
    """Linear warmup then cosine decay to 0, as a multiplier of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_base(out_dir, cfg: ModelConfig, *, log=print):
    """Build the tokenizer, processor and tiny LLaVA; train all weights on the generic mixture; save to out_dir."""
    import synthetic                                                      # only the embedded path needs it
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(synthetic.corpus(cfg.seed) + [cfg.system, "user : assistant :"])
    processor = build_processor(tokenizer, cfg)
    model = build_tiny_llava(tokenizer, cfg)
    data = synthetic.pretraining_mixture(cfg.pretrain_examples, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    steps = len(data) // cfg.pretrain_batch
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
        if step % 100 == 0 or step == steps - 1:
            log(f"pretrain step {step + 1}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s")
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, out_dir)                                              # atomic: a crash leaves no half base
    return out_dir


def probe_base(path, *, n=400, seed=1, log=print):
    """Greedy accuracy of a base on held-out pretraining questions, per skill (the first word of the question)."""
    import synthetic
    model, processor = load_llava(path)
    items = synthetic.pretraining_mixture(n, seed)
    preds = []
    for i in range(0, n, 100):
        chunk = items[i:i + 100]
        preds += generate(model, processor, [c[0] for c in chunk], [c[1] for c in chunk], system=ModelConfig.system)
    skills = {}
    for (_, q, a), p in zip(items, preds):
        skills.setdefault(" ".join(q.split()[:3]), []).append(p.strip() == a)
    for k, v in sorted(skills.items()):
        log(f"{k:>20}: {100 * np.mean(v):5.1f}% of {len(v)}")
    return {k: float(np.mean(v)) for k, v in skills.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Pretrain the tiny LLaVA base of the embedded benchmark.")
    ap.add_argument("--out", default=".cache/fcit/base-seed0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=ModelConfig.pretrain_examples)
    ap.add_argument("--probe", action="store_true", help="only report the base's accuracy per pretraining skill")
    a = ap.parse_args()
    if a.probe:
        probe_base(a.out)
    else:
        pretrain_base(a.out, ModelConfig(seed=a.seed, pretrain_examples=a.examples))
