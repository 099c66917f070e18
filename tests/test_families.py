"""Model families beyond LLaVA-1.5 through transformers' auto classes: a tiny random Qwen2.5-VL (2 layers, width
64) built from its config class with an offline word-level tokenizer, its PIL image processor and a chat template,
saved with save_pretrained; its processor is built from those parts (model.ChatProcessor: the family's
AutoProcessor needs torchvision). Checked: the loss mask covers the answer and the end of turn only, the image
placeholder becomes one token per merged patch, and `train.py --data FIXTURE --model QWEN` runs end to end.
Run: python -m pytest -q tests/test_families.py"""
import json

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import model as M
import train
from embedded.base import build_tokenizer
from release_fixture import write_release_fixture

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL's template, cut to what an image question needs: a default system turn, the user's image and text
TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
            "you are a helpful assistant .<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "how many dots are on the icon ? question answer test and then a later turn you are helpful assistant ."


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A folder holding a tiny random Qwen2.5-VL as save_pretrained writes one, with chat_template.jinja."""
    folder = tmp_path_factory.mktemp("qwen")
    tok = build_tokenizer([WORDS + " " + " ".join(map(str, range(10)))])
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tok.eos_token = "<|im_end|>"                                         # the end of an assistant turn
    ids = tok.convert_tokens_to_ids
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), bos_token_id=None,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>")))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(folder)   # 4x4 patches
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def test_qwen_loads_through_the_auto_classes_with_a_processor_built_from_its_parts(qwen):
    model, processor = M.load_model(str(qwen))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and isinstance(processor, M.ChatProcessor)
    text = processor.prompts(["<image>\nhow many dots ?"])[0]
    assert text == ("<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>how many dots ?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen_labels_cover_the_answer_and_the_end_of_turn_only(qwen):
    model, processor = M.load_model(str(qwen))
    tok = processor.tokenizer
    images = [Image.new("RGB", (30, 30), (200, 0, 0)), Image.new("RGB", (30, 30), (0, 200, 0))]   # train pads
    b = M.collate(processor, images, ["<image>\nhow many dots ?", "<image>\nwhat is on the icon ?"], ["3", "a dot"],
                  system="")
    assert b["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]] and b["pixel_values"].shape == (32, 1176)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ((b["input_ids"] == pad).sum(1) == 4).all()                  # 4x4 patches merged 2x2: 4 image tokens
    for i, a in enumerate(["3", "a dot"]):
        target = tok(a, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        on = (b["labels"][i] != -100).nonzero().flatten()
        assert b["labels"][i, on].tolist() == target == b["input_ids"][i, on].tolist()
        assert int(on[-1]) + 1 == int(b["attention_mask"][i].sum())      # the end of turn is the last real token
    loss = model(**b).loss
    assert torch.isfinite(loss) and loss > 0
    answers = M.generate(model, processor, images, ["<image>\nhow many dots ?"] * 2, system="", max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_multi_turn_record_is_refused_for_a_chat_family(qwen):
    _, processor = M.load_model(str(qwen))
    with pytest.raises(ValueError, match="multi-turn records are trained in LLaVA-1.5's vicuna_v1 form only"):
        M.collate(processor, [Image.new("RGB", (30, 30))], ["<image>\nq ?"], ["a"], system="",
                  later=[(("and then ?", "b"),)])


def test_train_runs_disco_end_to_end_on_qwen(qwen, tmp_path):
    write_release_fixture(str(tmp_path / "FCIT"), num_clients=3, per_file=4)
    lines = []
    res = train.main(["--data", str(tmp_path / "FCIT"), "--model", str(qwen), "--setting", "cap-hom", "--method",
                      "disco", "--clients", "3", "--clients-per-round", "2", "--rounds", "1", "--batch-size", "4",
                      "--test-limit", "2", "--out", str(tmp_path / "run")], log=lines.append)
    assert len(res["acc"]) == 4 and all(0 <= v <= 1000 for row in res["acc"] for v in row.values())
    assert any(line.startswith("trainable: LoRA") and "projector" in line for line in lines)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["acc"] == res["acc"]
