"""Model families beyond LLaVA-1.5 through transformers' auto classes: a tiny random Qwen2.5-VL and InternVL (2 layers,
width 64) built from their config classes with an offline word-level tokenizer, their PIL image processors and a
chat template, saved with save_pretrained; the processor is built from those parts (model.ChatProcessor: the
families' AutoProcessor needs torchvision). Checked per family: the loss mask covers the answer and the end of turn
only, an image becomes the family's image tokens (Qwen's merged patches, InternVL's tiles), and
`train.py --data FIXTURE --model DIR` runs end to end.
Run: python -m pytest -q tests/test_families.py"""
import json

import pytest
import torch
from PIL import Image
from transformers import (InternVLConfig, InternVLForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import model as M
import train
from embedded.base import build_tokenizer
from release_fixture import write_release_fixture

# each family's template, cut to what an image question needs: a default system turn, the user's image and text
def template(image):
    return ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
            "you are a helpful assistant .<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")


IMAGE = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>\n"}
SPECIALS = {"qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
            "internvl": ["<img>", "</img>", "<IMG_CONTEXT>"]}
WORDS = "how many dots are on the icon ? question answer test and then a later turn you are helpful assistant ."
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build(kind, tok):
    """A tiny random model of the family and its image processor (each image: 4 tokens for the language model)."""
    ids = tok.convert_tokens_to_ids
    text = dict(TEXT, vocab_size=len(tok), bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id)
    if kind == "qwen2_5_vl":
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               fullatt_block_indexes=[1]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>")))
        return model, Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)     # 4x4 patches, merged 2x2
    model = InternVLForConditionalGeneration(InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[56, 56], patch_size=[14, 14]),
        text_config=dict(text, model_type="qwen2"), image_token_id=ids("<IMG_CONTEXT>"), downsample_ratio=0.5))
    # 56 px tiles of 4x4 patches, pixel-shuffled by 0.5: 4 tokens a tile; a square image is one tile
    return model, GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, max_patches=4)


@pytest.fixture(scope="module", params=list(M.CHAT_FAMILIES))
def family(request, tmp_path_factory):
    """(model_type, a folder holding a tiny random model of it as save_pretrained writes one, chat_template.jinja)."""
    kind, folder = request.param, tmp_path_factory.mktemp(request.param)
    tok = build_tokenizer([WORDS + " " + " ".join(map(str, range(10)))])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *SPECIALS[kind]]})
    # the tokenizer's eos stays "</s>": the end of an assistant turn is read from the template (<|im_end|>)
    model, images = build(kind, tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    images.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(template(IMAGE[kind]))
    return kind, folder


def test_a_family_loads_through_the_auto_classes_with_a_processor_built_from_its_parts(family):
    kind, folder = family
    model, processor = M.load_model(str(folder))
    assert model.config.model_type == kind and isinstance(processor, M.ChatProcessor)
    assert processor.prompts(["<image>\nhow many dots ?"])[0] == (
        "<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n<|im_start|>user\n"
        f"{IMAGE[kind]}how many dots ?<|im_end|>\n<|im_start|>assistant\n")


def test_the_labels_cover_the_answer_and_the_end_of_turn_only(family):
    kind, folder = family
    model, processor = M.load_model(str(folder))
    tok = processor.tokenizer
    images = [Image.new("RGB", (30, 30), (200, 0, 0)), Image.new("RGB", (30, 30), (0, 200, 0))]   # train pads
    b = M.collate(processor, images, ["<image>\nhow many dots ?", "<image>\nwhat is on the icon ?"], ["3", "a dot"],
                  system="")
    if kind == "qwen2_5_vl":
        assert b["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]] and b["pixel_values"].shape == (32, 1176)
    else:
        assert b["pixel_values"].shape == (2, 3, 56, 56) and "num_patches" not in b      # one tile a square image
    image = tok.convert_tokens_to_ids(M.CHAT_FAMILIES[kind])
    assert ((b["input_ids"] == image).sum(1) == 4).all()                 # 4 image tokens an image
    for i, a in enumerate(["3", "a dot"]):
        target = tok(a, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert processor.end_of_turn == target[-1] != tok.eos_token_id
        on = (b["labels"][i] != -100).nonzero().flatten()
        assert b["labels"][i, on].tolist() == target == b["input_ids"][i, on].tolist()
        assert int(on[-1]) + 1 == int(b["attention_mask"][i].sum())      # the end of turn is the last real token
    loss = model(**b).loss
    assert torch.isfinite(loss) and loss > 0
    answers = M.generate(model, processor, images, ["<image>\nhow many dots ?"] * 2, system="", max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_wide_image_is_tiled_by_internvl_and_kept_whole_by_qwen(family):
    kind, folder = family
    _, processor = M.load_model(str(folder))
    b = M.collate(processor, [Image.new("RGB", (112, 56))], ["<image>\nq ?"], ["a"], system="")
    image = processor.tokenizer.convert_tokens_to_ids(M.CHAT_FAMILIES[kind])
    if kind == "internvl":                                               # 2 tiles and a thumbnail, 4 tokens each
        assert b["pixel_values"].shape[0] == 3 and int((b["input_ids"] == image).sum()) == 12
    else:                                                                # patches that keep the aspect ratio
        t, h, w = b["image_grid_thw"][0].tolist()
        assert w > h and int((b["input_ids"] == image).sum()) == t * h * w // 4


def test_a_multi_turn_record_is_refused_for_a_chat_family(family):
    _, processor = M.load_model(str(family[1]))
    with pytest.raises(ValueError, match="multi-turn records are trained in LLaVA-1.5's vicuna_v1 form only"):
        M.collate(processor, [Image.new("RGB", (30, 30))], ["<image>\nq ?"], ["a"], system="",
                  later=[(("and then ?", "b"),)])


def test_train_runs_disco_end_to_end(family, tmp_path):
    write_release_fixture(str(tmp_path / "FCIT"), num_clients=3, per_file=4)
    lines = []
    res = train.main(["--data", str(tmp_path / "FCIT"), "--model", str(family[1]), "--setting", "cap-hom",
                      "--method", "disco", "--clients", "3", "--clients-per-round", "2", "--rounds", "1",
                      "--batch-size", "4", "--test-limit", "2", "--out", str(tmp_path / "run")], log=lines.append)
    assert len(res["acc"]) == 4 and all(v >= 0 for row in res["acc"] for v in row.values())
    assert any(line.startswith("trainable: LoRA") and "projector" in line for line in lines)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["acc"] == res["acc"]
