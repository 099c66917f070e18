"""The real-benchmark path end to end, without a GPU and without the real files: a tiny LLaVA and a tiny CLIP text
encoder saved with save_pretrained into folders, a fixture release in the official layout (release_fixture.py), and
`train.py --data --model --text-encoder` run on it. The CUDA twin skips itself without a GPU.
Run: python -m pytest -q tests/test_real_path.py"""
import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import model as M
import train
from release_fixture import write_release_fixture

WORDS = ["question", "answer", "test", "and", "then", "a", "later", "turn", "?"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(release root, LLaVA folder, CLIP text encoder folder), each as a user would have them on disk."""
    root = tmp_path_factory.mktemp("fcit")
    write_release_fixture(str(root / "FCIT"), num_clients=3, per_file=4)
    cfg = M.ModelConfig(width=32, layers=1, heads=2, ffn=64, vision_width=32, vision_layers=1)
    tokenizer = M.build_tokenizer([" ".join(WORDS + [str(i) for i in range(10)]), cfg.system])
    llava = M.build_tiny_llava(tokenizer, cfg)
    llava.save_pretrained(root / "llava")
    M.build_processor(tokenizer, cfg).save_pretrained(root / "llava")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        eos_token_id=tokenizer.eos_token_id))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root / "FCIT", root / "llava", root / "clip"


def run(folders, tmp_path, *flags, device="cpu"):
    data, llava, clip = folders
    out = tmp_path / "out"
    argv = ["--data", str(data), "--model", str(llava), "--text-encoder", str(clip), "--clients", "3",
            "--clients-per-round", "2", "--rounds", "1", "--batch-size", "4", "--micro-batch", "2",
            "--test-limit", "3", "--out", str(out), "--device", device, *flags]
    return train.main(argv, log=lambda *a: None), out


@pytest.mark.parametrize("setting", ["task-hom", "cap-het"])
def test_disco_runs_on_the_release_layout_with_clip_identity_tokens(folders, tmp_path, setting):
    res, out = run(folders, tmp_path, "--setting", setting, "--method", "disco")
    stages = train.get_setting(setting).num_stages
    assert len(res["acc"]) == stages and len(res["subspaces"]) == stages
    assert json.loads((out / "config.json").read_text())["text_encoder"].endswith("clip")
    # the release's own partition was used: client 0 of the first task holds exactly its client_0.json records
    parts = json.loads((out / "partition.json").read_text())
    assert all(len(p) == 3 for p in parts.values())


def test_the_release_partition_is_used_not_ours(folders, tmp_path):
    data, *_ = folders
    _, out = run(folders, tmp_path, "--setting", "task-hom", "--method", "finetune")
    parts = json.loads((out / "partition.json").read_text())
    first = json.loads((data / "partitioned_data/Task-related/seq/1.0/Task1/client_0.json").read_text())
    assert len(parts["ImageNet-R"][0]) == len(first)


def test_a_missing_model_folder_is_an_error_that_names_the_expected_files(folders, tmp_path):
    data, _, clip = folders
    with pytest.raises(FileNotFoundError, match="config.json"):
        train.main(["--data", str(data), "--model", str(tmp_path / "nowhere"), "--clients", "3",
                    "--clients-per-round", "2", "--out", str(tmp_path / "o")], log=lambda *a: None)


def test_a_missing_release_file_is_listed_before_training(folders, tmp_path):
    data, llava, _ = folders
    broken = tmp_path / "broken"
    write_release_fixture(str(broken), num_clients=3, per_file=2, partitions=False)
    (broken / "instructions" / "OCRVQA" / "train_10w.json").unlink()
    with pytest.raises(FileNotFoundError, match="OCRVQA/train_10w.json"):
        train.main(["--data", str(broken), "--model", str(llava), "--clients", "3", "--clients-per-round", "2",
                    "--out", str(tmp_path / "o")], log=lambda *a: None)
    assert not (tmp_path / "o" / "checkpoint.json").exists()


def test_clip_identity_feature_is_the_pooled_output_without_the_image_token(folders):
    _, _, clip = folders
    encoder, tokenizer = M.load_text_encoder(str(clip))
    with_image = M.clip_text_features(encoder, tokenizer, ["<image>\nquestion 3 ?"])
    plain = M.clip_text_features(encoder, tokenizer, ["question 3 ?"])
    enc = tokenizer(["question 3 ?"], return_tensors="pt")
    torch.testing.assert_close(with_image, plain)
    torch.testing.assert_close(plain, encoder(**enc).pooler_output)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_path_runs_in_bf16(folders, tmp_path):
    res, _ = run(folders, tmp_path, "--setting", "task-hom", "--method", "disco", device="cuda")
    assert res["config"]["device"] == "cuda" and len(res["acc"]) == 8
