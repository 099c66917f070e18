"""The model: a LLaVA-style model (vision tower + projector + language model) as transformers builds it, tiny or real.

One API for all: `load_model(dir)` reads a folder that `save_pretrained` wrote: the embedded benchmark's tiny base
(embedded/base.py) or a real `llava-hf/llava-1.5-7b-hf` (`load_llava`), or a Qwen2.5-VL checkpoint (`load_chat`).
LLaVA-1.5's prompts follow vicuna_v1 (notes 1.5), the other families' their own chat template (`ChatProcessor`):
    "{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>"      loss on the answer tokens only.
Batches (`collate`), the loss, greedy generation, and DISCO's frozen encoders of identity tokens live here too: the
tiny base's own word embeddings (instruction_features), CLIP's pooled text output for the real benchmark
(clip_text_features, as the paper's code), and the vision tower's mean patch feature (image_features, the ablation).
train.py hands them to the federated loop (federated.Harness); federated.py never imports this file.

Tests: python -m pytest tests/test_model.py tests/test_real_path.py
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          CLIPTextModel, LlavaForConditionalGeneration)

# B batch, T tokens, D width, P image tokens


# vicuna_v1's system line, what LLaVA-1.5 was instruction-tuned with (the real benchmark's prompt)
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# ---------------------------------------------------------------------------- the prompt
def prompt(question: str, system: str) -> str:
    """vicuna_v1 up to the answer; the data's question already starts with '<image>\\n' (LLaVA format)."""
    if "<image>" not in question:
        question = "<image>\n" + question
    return f"{system} USER: {question} ASSISTANT:"


# ---------------------------------------------------------------------------- building and loading
# what from_pretrained reads, in its order of preference; a sharded checkpoint's index lists its shards
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZERS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))   # fast | sentencepiece | BPE
PROCESSORS = ("processor_config.json", "preprocessor_config.json")   # transformers 5 | 4 saves the image processor


def weight_files(path):
    """The weight files from_pretrained will read: the single file, or every shard its index names ([] if none)."""
    found = [os.path.join(path, n) for n in WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if not found or not found[0].endswith(".index.json"):
        return found[:1]
    index = found[0]
    try:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a weight index {{'weight_map': {{name: shard}}}} ({e}); download it "
                         f"again") from None
    missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if missing:
        raise FileNotFoundError(f"{index} names {len(missing)} missing shard{'s' * (len(missing) > 1)}: "
                                f"{', '.join(missing)}; download them again")
    return [os.path.join(path, s) for s in shards]


def require_folder(path, what, *, processor=False):
    """A local model folder with every file from_pretrained reads, or one error naming what is missing (nothing is
    ever downloaded). Each safetensors file's header is read: a truncated download fails here, named, instead of
    inside from_pretrained. Cheap: headers only, no weights."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder; expected a {what} folder as save_pretrained writes it "
                                f"(config.json, model.safetensors, tokenizer.json, ...)")
    has = lambda *names: all(os.path.isfile(os.path.join(path, n)) for n in names)
    weights, missing = weight_files(path), []
    if not has("config.json"):
        missing.append("config.json")
    if not weights:
        missing.append("model.safetensors or pytorch_model.bin (or an .index.json with its shards)")
    if not any(has(*names) for names in TOKENIZERS):
        missing.append("tokenizer.json or tokenizer.model or vocab.json + merges.txt")
    if processor and not any(has(name) for name in PROCESSORS):
        missing.append(" or ".join(PROCESSORS))
    if missing:
        raise FileNotFoundError(f"{path}: not a complete {what} folder, missing {'; '.join(missing)}; expected the "
                                f"files that save_pretrained writes")
    for w in (w for w in weights if w.endswith(".safetensors")):
        try:
            with safe_open(w, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:                   # a truncated file: "incomplete metadata"
            raise ValueError(f"{w}: not a readable safetensors file ({e}): truncated or corrupt; download it "
                             f"again") from None


def load_llava(path, *, dtype=torch.float32, device="cpu"):
    """(model, processor) from a folder in the llava-hf layout (e.g. llava-hf/llava-1.5-7b-hf), or the tiny base."""
    require_folder(path, "LLaVA checkpoint", processor=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    processor.tokenizer.padding_side = "left"
    return model, processor


class ChatProcessor:
    """A family's processor from its parts, for the families prompted through their own chat template: the
    tokenizer, the image processor and the template (the checkpoint's chat_template.jinja / .json, else the
    tokenizer's). Built by hand because these families' AutoProcessor needs torchvision for its video part, which
    this project's CPU torch cannot load beside it (issue 14). What each family's processor does for an image, in
    one place (`__call__`): Qwen2.5-VL's pixel_values are flattened patches with image_grid_thw (t, h, w), its one
    image placeholder becoming t*h*w / merge^2 tokens, one per merged patch; InternVL tiles an image into
    num_patches tiles (and a thumbnail) of `tokens_per_tile` tokens each, between <img> and </img>."""
    chat = True

    def __init__(self, tokenizer, image_processor, template, *, kind, tokens_per_tile=None):
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.kind, self.tokens_per_tile = kind, tokens_per_tile
        # the token the template closes an assistant turn with (<|im_end|> for both), read from the template itself
        # rather than trusted to the tokenizer's eos: it ends every answer's labels and every generation
        mark = "answer-mark"
        turn = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}],
                                             chat_template=template, tokenize=False)
        after = tokenizer(turn[turn.index(mark) + len(mark):], add_special_tokens=False)["input_ids"]
        self.end_of_turn = after[0] if after else tokenizer.eos_token_id

    def prompts(self, questions):
        """The template's user turn (the image, then the question without the release's "<image>\\n") and the
        assistant's opening: the answer follows directly, then the template's end of turn (the tokenizer's eos)."""
        return [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.replace("<image>", "").strip()}]}],
            chat_template=self.template, add_generation_prompt=True, tokenize=False) for q in questions]

    def __call__(self, *, text, images):
        placeholder = CHAT_FAMILIES[self.kind]
        if self.kind == "qwen2_5_vl":
            enc = dict(self.image_processor(images, return_tensors="pt"))    # (sum patches, D), grid (B, 3)
            n = enc["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2
            tokens = [placeholder * int(k) for k in n]
        else:                                                             # internvl: (sum tiles, 3, H, W)
            enc = dict(self.image_processor(images, return_tensors="pt", crop_to_patches=True))
            tokens = [f"<img>{placeholder * (self.tokens_per_tile * int(k))}</img>" for k in enc.pop("num_patches")]
        text = [t.replace(placeholder, k, 1) for t, k in zip(text, tokens)]
        return {"input_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"], **enc}


CHAT_FAMILIES = {"qwen2_5_vl": "<|image_pad|>", "internvl": "<IMG_CONTEXT>"}   # model_type -> its image placeholder


def load_model(path, *, dtype=torch.float32, device="cpu"):
    """(model, processor) of any supported family, by the folder's config.json model_type."""
    require_folder(path, "model checkpoint", processor=True)
    kind = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if kind == "llava":
        return load_llava(path, dtype=dtype, device=device)
    if kind in CHAT_FAMILIES:
        return load_chat(path, kind, dtype=dtype, device=device)
    raise ValueError(f"{path}: a {kind!r} checkpoint; supported families: llava, {', '.join(CHAT_FAMILIES)}")


def load_chat(path, kind, *, dtype=torch.float32, device="cpu"):
    """A chat-template family through transformers' auto classes, its processor built from its parts."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    images = AutoImageProcessor.from_pretrained(path, local_files_only=True)   # the PIL backend without torchvision
    template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                template = f.read() if name.endswith(".jinja") else json.load(f)["chat_template"]
            break
    if not template:
        raise FileNotFoundError(f"{path}: no chat template (chat_template.jinja, chat_template.json or the "
                                f"tokenizer's); a {kind} checkpoint ships one")
    config, tiles = model.config, None
    if kind == "internvl":                    # tokens a tile: (image / patch)^2 patches, shrunk by the pixel shuffle
        tiles = int((config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2
                    * config.downsample_ratio ** 2)
    return model, ChatProcessor(tokenizer, images, template, kind=kind, tokens_per_tile=tiles)


def checkpoint_activations(model, on=True):
    """Gradient checkpointing on or off (non-reentrant: the recomputed forward replays the same dropout draws, so
    no number changes). transformers 5.17 (the GPU machine's) names it gradient_checkpointing_*; 5.25 adds
    activation_checkpointing_* and deprecates the old names: use the new ones where they exist."""
    new = hasattr(model, "activation_checkpointing_enable")
    if not on:
        return model.activation_checkpointing_disable() if new else model.gradient_checkpointing_disable()
    if new:
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_text_encoder(path, *, device="cpu"):
    """(CLIPTextModel, tokenizer) from a local folder, e.g. openai/clip-vit-large-patch14-336: DISCO's frozen text
    encoder on the real benchmark (the official code's CLIPTextTower)."""
    require_folder(path, "CLIP text encoder")
    encoder = CLIPTextModel.from_pretrained(path, local_files_only=True).to(device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------- images
def expand_to_square(image, processor):
    """The official `--image_aspect_ratio pad`: a non-square image centred on a square of the image processor's mean
    color before the processor resizes it, so nothing is cropped; the release's Grounding boxes are normalized to
    this padded square. A square image (every embedded one) is returned as it is."""
    w, h = image.size
    if w == h:
        return image
    mean = tuple(int(c * 255) for c in processor.image_processor.image_mean)
    square = Image.new(image.mode, (max(w, h), max(w, h)), mean)
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


# ---------------------------------------------------------------------------- batches, loss, generation
def collate(processor, images, questions, answers=None, *, system, later=None):
    """Token ids with the image placeholder expanded, pixel values, and labels on the answers (+ eos) only.
    later[i]: example i's turns after the first, ((question, answer), ...), appended in vicuna_v1's multi-turn
    form "... ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>" with every answer labelled, as the official trainer.
    Without answers: left-padded prompts for generation."""
    tok, chat = processor.tokenizer, getattr(processor, "chat", False)
    texts = processor.prompts(questions) if chat else [prompt(q, system) for q in questions]
    enc = processor(text=texts, images=images)
    prompts = enc["input_ids"]                                             # list of lists (prompt only)
    if chat and any(later or []):
        raise ValueError("multi-turn records are trained in LLaVA-1.5's vicuna_v1 form only; with a chat-template "
                         "family, give one human and one gpt turn per training record")
    if answers is None:
        seqs, labels = prompts, [[-100] * len(p) for p in prompts]
    else:
        ans = tok([a if chat else " " + a for a in answers], add_special_tokens=False)["input_ids"]
        eos = processor.end_of_turn if chat else tok.eos_token_id
        seqs = [p + a + [eos] for p, a in zip(prompts, ans)]
        labels = [[-100] * len(p) + a + [eos] for p, a in zip(prompts, ans)]
        for i, turns in enumerate(later or []):
            for q, a in turns:
                user = tok(f"USER: {q} ASSISTANT:", add_special_tokens=False)["input_ids"]
                reply = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                seqs[i] = seqs[i] + user + reply
                labels[i] = labels[i] + [-100] * len(user) + reply
    T = max(len(s) for s in seqs)
    left = answers is None                                                 # generation continues on the right
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)   # (B, T)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], lab[i, sl], mask[i, sl] = torch.tensor(s), torch.tensor(l), 1
    # LLaVA: (B, 3, H, W); Qwen2.5-VL: (sum patches, D) with image_grid_thw (B, 3), passed on as the family gives it
    extra = {k: torch.as_tensor(np.asarray(v)) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return {"input_ids": ids, "attention_mask": mask, **extra, "labels": lab}


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
    eos = processor.end_of_turn if getattr(processor, "chat", False) else processor.tokenizer.eos_token_id
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=eos)
    return processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def instruction_features(model, processor, questions, *, batch_size=256):
    """The embedded benchmark's frozen text encoder: the mean of the base's input word embeddings, each scaled to
    unit length, over the question (no image token, no template, no answer). DISCO's identity tokens are means of
    these; LoRA never touches the embeddings, so the encoder stays frozen. Measured on the tiny base
    (python -m scripts.bench similarity): clients of one dataset >= 0.94 apart from clients of another <= 0.79, so
    tau = 0.9 separates them; the test questions of 7 of the 8 task-related datasets put 0.90-1.00 of their SSA gate
    on their own dataset, IconQA's 0.81 (its counting questions are close to CLEVR-Math's, cosine 0.72), while
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
    if model.config.model_type != "llava":
        raise ValueError(f"--identity image (the image-token ablation) is built for LLaVA's vision tower; "
                         f"{type(model).__name__} has none")
    feats = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        h = model.model.vision_tower(pixels.to(model.device, model.dtype)).last_hidden_state   # (B, 1 + P, D)
        feats.append(h[:, 1:].mean(1).float().cpu())                                          # (B, D)
    return torch.cat(feats)


