"""Tests for model.py and embedded/base.py on a tiny LLaVA (1 layer, width 32): the word-level tokenizer, the vicuna_v1
prompt, the answer-only labels and the padding sides of `collate`, the frozen instruction features, greedy
generation, the save_pretrained / load_llava round trip, and the official pad-to-square of images.
Run: python -m pytest -q tests/test_model.py"""
import re

import pytest
import torch
from PIL import Image

from embedded.base import BaseConfig, build_processor, build_tiny_llava, build_tokenizer
from model import collate, expand_to_square, generate, instruction_features, load_llava, prompt

# B batch, T tokens, D width, P image tokens
SYSTEM = "a chat between a human and an assistant ."
TEXTS = ["how many dots are on the icon ?", "what is the genre of this book ?", "romance", "3",
         "please give the bounding box of the red circle .", "[0.00, 0.50, 0.50, 1.00]", SYSTEM, "user : assistant :"]
CFG = BaseConfig(width=32, layers=1, heads=4, ffn=64, vision_width=32, vision_layers=1)
P = (CFG.image_size // CFG.patch_size) ** 2                 # image tokens per image: one per patch, no CLS


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer(TEXTS)
    return build_tiny_llava(tokenizer, CFG).eval(), build_processor(tokenizer, CFG)


def images(n):
    return [Image.new("RGB", (32, 32), (40 * i, 100, 200)) for i in range(n)]


# ---------------------------------------------------------------------------- tokenizer and prompt
def test_tokenizer_round_trips_words():
    tok = build_tokenizer(TEXTS)
    for text in TEXTS[:5]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_tokenizer_keeps_image_as_one_special_token():
    tok = build_tokenizer(TEXTS)
    ids = tok("<image>\nhow many dots ?", add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id != tok.unk_token_id and "<image>" in tok.all_special_tokens
    assert ids[0] == image_id and ids.count(image_id) == 1
    assert tok.convert_ids_to_tokens(ids) == ["<image>", "how", "many", "dots", "?"]


def test_tokenizer_lower_cases():
    tok = build_tokenizer(["What IS the Genre ?"])
    assert tok("WHAT is THE genre ?")["input_ids"] == tok("what is the genre ?")["input_ids"]
    assert tok.unk_token_id not in tok("what is the genre ?", add_special_tokens=False)["input_ids"]


def test_prompt_is_vicuna_v1():
    assert prompt("how many dots ?", "sys .") == "sys . USER: <image>\nhow many dots ? ASSISTANT:"
    assert prompt("<image>\nhow many dots ?", "sys .") == "sys . USER: <image>\nhow many dots ? ASSISTANT:"


# ---------------------------------------------------------------------------- collate
QUESTIONS = ["<image>\nhow many dots are on the icon ?", "<image>\nwhat is the genre of this book ?"]
ANSWERS = ["3", "[0.00, 0.50, 0.50, 1.00]"]


def test_collate_labels_exactly_the_answer_tokens_and_eos(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    b = collate(processor, images(2), QUESTIONS, ANSWERS, system=SYSTEM)
    for i, a in enumerate(ANSWERS):
        target = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        on = (b["labels"][i] != -100).nonzero().flatten()                             # labelled positions
        assert b["labels"][i, on].tolist() == target and b["input_ids"][i, on].tolist() == target
        assert on.tolist() == list(range(on[0], on[0] + len(target)))               # contiguous
        assert int(on[-1]) + 1 == int(b["attention_mask"][i].sum())                 # eos is the last real token


def test_collate_labels_every_answer_of_a_multi_turn_record_in_vicuna_form(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    later = [(("what is the genre of this book ?", "romance"),), ()]
    b = collate(processor, images(2), QUESTIONS, ANSWERS, system=SYSTEM, later=later)
    one = collate(processor, images(2), QUESTIONS, ANSWERS, system=SYSTEM)
    n = int(one["attention_mask"][0].sum())                              # the first turn is as before, then
    assert torch.equal(b["input_ids"][0, :n], one["input_ids"][0, :n])   # "USER: q2 ASSISTANT: a2</s>"
    user = tok("USER: what is the genre of this book ? ASSISTANT:", add_special_tokens=False)["input_ids"]
    reply = tok(" romance", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b["input_ids"][0, n:n + len(user) + len(reply)].tolist() == user + reply
    first = tok(" " + ANSWERS[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b["labels"][0][b["labels"][0] != -100].tolist() == first + reply   # both answers, no question
    assert torch.equal(b["labels"][1, :int(one["attention_mask"][1].sum())],
                       one["labels"][1, :int(one["attention_mask"][1].sum())])   # a one-turn row is unchanged


def test_collate_right_pads_for_training(tiny):
    _, processor = tiny
    b = collate(processor, images(2), QUESTIONS, ANSWERS, system=SYSTEM)
    for ids, mask in zip(b["input_ids"], b["attention_mask"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == processor.tokenizer.pad_token_id).all()
    assert not b["attention_mask"].all()                                            # the answers differ in length


def test_collate_left_pads_for_generation(tiny):
    _, processor = tiny
    b = collate(processor, images(2), ["how many dots ?", "what is the genre of this book ?"], system=SYSTEM)
    assert (b["labels"] == -100).all()
    for ids, mask in zip(b["input_ids"], b["attention_mask"]):
        pad = len(mask) - int(mask.sum())
        assert not mask[:pad].any() and mask[pad:].all()
        assert (ids[:pad] == processor.tokenizer.pad_token_id).all()
    assert not b["attention_mask"][:, 0].all() and b["attention_mask"][:, -1].all()


def test_collate_expands_image_to_one_token_per_patch(tiny):
    model, processor = tiny
    b = collate(processor, images(2), QUESTIONS, ANSWERS, system=SYSTEM)
    image_id = model.config.image_token_index
    assert ((b["input_ids"] == image_id).sum(1) == P).all()
    assert b["pixel_values"].shape == (2, 3, CFG.image_size, CFG.image_size)


# ---------------------------------------------------------------------------- instruction features
@pytest.mark.parametrize("side", ["right", "left"])
def test_instruction_features_ignore_padding_and_the_image_token(tiny, side):
    model, processor = tiny
    short, long = "<image>\nhow many dots ?", "<image>\nplease give the bounding box of the red circle ."
    old, processor.tokenizer.padding_side = processor.tokenizer.padding_side, side
    try:
        alone = instruction_features(model, processor, [short])                     # (1, D)
        batched = instruction_features(model, processor, [long, short])              # (2, D)
        plain = instruction_features(model, processor, ["how many dots ?"])
    finally:
        processor.tokenizer.padding_side = old
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain, alone, rtol=0, atol=0)


def test_instruction_features_are_deterministic_with_shape_n_by_d(tiny):
    model, processor = tiny
    qs = QUESTIONS + ["romance"]
    a, b = instruction_features(model, processor, qs), instruction_features(model, processor, qs)
    assert a.shape == (3, CFG.width) and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    # the mean of the question's word embeddings, each scaled to unit length (no image token, no template)
    ids = processor.tokenizer("how many dots are on the icon ?", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8
    words = torch.nn.functional.normalize(model.get_input_embeddings().weight[ids], dim=-1)        # (8, D)
    torch.testing.assert_close(a[0], words.mean(0), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- generation and loading
def greedy_by_hand(model, processor, image, question, steps):
    """argmax of the next-token logits, one token at a time, for one unpadded input."""
    batch = collate(processor, [image], [question], system=SYSTEM)
    ids, pixels, out = batch["input_ids"], batch["pixel_values"], []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[0, -1].argmax())
            if nxt == processor.tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return processor.tokenizer.decode(out, skip_special_tokens=True)


def test_generate_returns_one_string_per_input(tiny):
    model, processor = tiny
    questions = ["how many dots ?", "what is the genre of this book ?", "3"]
    out = generate(model, processor, images(3), questions, system=SYSTEM, max_new_tokens=3)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    # greedy decoding, and left padding makes a batched answer the answer the input gets alone
    assert out == [greedy_by_hand(model, processor, img, q, 3) for img, q in zip(images(3), questions)]


def test_save_pretrained_then_load_llava_gives_identical_logits(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_llava(str(tmp_path))
    questions = ["<image>\nHOW many DOTS are on the icon ?", QUESTIONS[1]]          # lower-casing survives too
    b = collate(processor, images(2), questions, ANSWERS, system=SYSTEM)
    b2 = collate(loaded_processor, images(2), questions, ANSWERS, system=SYSTEM)
    assert all(torch.equal(b[k], b2[k]) for k in b)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, loaded.eval()(**b2).logits)


def test_load_llava_without_config_names_the_folder_and_the_file(tmp_path):
    folder = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(folder) + r".*config\.json"):
        load_llava(folder)


# ---------------------------------------------------------------------------- images padded to a square
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]                  # CLIP's image processor, as LLaVA-1.5 ships it


class Processor:                                                 # what expand_to_square reads of a processor
    class image_processor:
        image_mean = CLIP_MEAN


@pytest.mark.parametrize("size,offset", [((60, 30), (0, 15)), ((30, 60), (15, 0))])
def test_a_box_normalized_to_the_padded_square_lands_on_its_object(size, offset):
    w, h = size
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((255, 0, 0), (4, 6, 14, 20))                     # the object: x 4..13, y 6..19 of the original
    # the release normalizes a Grounding box to the square the official code pads to: side max(w, h), the image
    # centred on it, so the box is ((x + dx) / side, (y + dy) / side)
    side, (dx, dy) = max(w, h), offset
    box = [(4 + dx) / side, (6 + dy) / side, (14 + dx) / side, (20 + dy) / side]
    square = expand_to_square(image, Processor)
    assert square.size == (side, side)
    red = [(x, y) for x in range(side) for y in range(side) if square.getpixel((x, y)) == (255, 0, 0)]
    xs, ys = [x for x, _ in red], [y for _, y in red]
    assert [min(xs) / side, min(ys) / side, (max(xs) + 1) / side, (max(ys) + 1) / side] == box
    # both bands of padding (top and bottom, or left and right) are the processor's mean color, int(255 * mean)
    assert square.getpixel((0, 0)) == square.getpixel((side - 1, side - 1)) == (122, 116, 104)


def test_a_square_image_is_not_padded():
    image = Image.new("RGB", (32, 32), (1, 2, 3))
    assert expand_to_square(image, Processor) is image

