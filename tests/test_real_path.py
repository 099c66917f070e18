"""The real-benchmark path end to end, without a GPU and without the real files: a tiny LLaVA and a tiny CLIP text
encoder saved with save_pretrained into folders, a fixture release in the official layout (release_fixture.py), and
`train.py --data --model --text-encoder` run on it. The CUDA twin skips itself without a GPU.
Run: python -m pytest -q tests/test_real_path.py"""
import json

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import data as D
import model as M
import train
from embedded.base import BaseConfig, build_processor, build_tiny_llava, build_tokenizer
from release.partitions import load_release
from release_fixture import CAP_ORDER, TASK_ORDER, write_release_fixture

WORDS = ["question", "answer", "test", "and", "then", "a", "later", "turn", "?"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(release root, LLaVA folder, CLIP text encoder folder), each as a user would have them on disk."""
    root = tmp_path_factory.mktemp("fcit")
    write_release_fixture(str(root / "FCIT"), num_clients=3, per_file=4)
    cfg = BaseConfig(width=32, layers=1, heads=2, ffn=64, vision_width=32, vision_layers=1)
    tokenizer = build_tokenizer([" ".join(WORDS + [str(i) for i in range(10)]), cfg.system])
    llava = build_tiny_llava(tokenizer, cfg)
    llava.save_pretrained(root / "llava")
    build_processor(tokenizer, cfg).save_pretrained(root / "llava")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        eos_token_id=tokenizer.eos_token_id))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root / "FCIT", root / "llava", root / "clip"


CLIENTS = 3


def run(folders, out, *flags, device="cpu"):
    data, llava, clip = folders
    argv = ["--data", str(data), "--model", str(llava), "--text-encoder", str(clip), "--clients", str(CLIENTS),
            "--clients-per-round", "2", "--rounds", "1", "--batch-size", "4", "--micro-batch", "2",
            "--test-limit", "3", "--out", str(out), "--device", device, *flags]
    lines = []
    return train.main(argv, log=lines.append), out, lines


@pytest.fixture(scope="module")
def disco_run(folders, tmp_path_factory):
    """disco_run(setting) -> (results, out, lines) of DISCO on the release fixture, run once per setting."""
    done = {}

    def get(setting):
        if setting not in done:
            done[setting] = run(folders, tmp_path_factory.mktemp(setting), "--setting", setting, "--method", "disco")
        return done[setting]
    return get


def release_client_ids(root, setting, task, c):
    """The ids of the records in the release's client_<c>.json of a task (the fixture's folders, not data.py's)."""
    if setting.startswith("task"):
        folder = root / "partitioned_data/Task-related/seq/1.0" / f"Task{TASK_ORDER.index(task) + 1}"
    else:
        folder = root / "partitioned_data/Capability-related/cap/1.0" / f"Task{CAP_ORDER.index(task) + 1}"
    return [r["id"] for r in json.loads((folder / f"client_{c}.json").read_text())]


def partition_ids(root, setting, out):
    """partition.json of a run, each client's indices turned into the ids of the training examples they point to."""
    data, _ = load_release(str(root), D.get_setting(setting), beta=1.0, num_clients=CLIENTS,
                           rng=np.random.default_rng(0))
    parts = json.loads((out / "partition.json").read_text())
    return {task: [[data[task].train[i].id for i in client] for client in clients] for task, clients in parts.items()}


@pytest.mark.parametrize("setting", ["task-hom", "cap-het"])
def test_disco_runs_on_the_release_layout_with_clip_identity_tokens(folders, disco_run, setting):
    res, out, lines = disco_run(setting)
    stages = train.get_setting(setting).num_stages
    assert len(res["acc"]) == stages and len(res["subspaces"]) == stages
    assert json.loads((out / "config.json").read_text())["text_encoder"] == str(folders[2])
    assert any(line.startswith("using the release's client partition for beta 1") for line in lines)
    if setting == "cap-het":                                            # the fixture's folders: Other, Math, ...
        assert res["tasks"] == CAP_ORDER and list(res["acc"][0]) == sorted(
            {CAP_ORDER[i] for i in D.HET_CAP[0]}, key=CAP_ORDER.index)
        assert f"stage order from the release's Task folders: {', '.join(CAP_ORDER)} (the Het table's task " \
               f"indices follow it)" in lines
    # the release's own partition was used: client c of every task holds exactly its client_<c>.json records
    root, s = folders[0], train.get_setting(setting)
    assert partition_ids(root, setting, out) == {task: [release_client_ids(root, setting, task, c)
                                                        for c in range(CLIENTS)] for task in s.tasks}


def test_the_release_partition_is_used_not_ours(folders, disco_run):
    root = folders[0]
    _, out, _ = disco_run("task-hom")
    parts = json.loads((out / "partition.json").read_text())
    first = json.loads((root / "partitioned_data/Task-related/seq/1.0/Task1/client_0.json").read_text())
    assert len(parts["ImageNet-R"][0]) == len(first)
    # the same records, not only as many: ids, image paths and questions of client 0 of the first task
    data, _ = load_release(str(root), D.get_setting("task-hom"), beta=1.0, num_clients=CLIENTS,
                           rng=np.random.default_rng(0))
    held = [data["ImageNet-R"].train[i] for i in parts["ImageNet-R"][0]]
    assert [(e.id, e.image, e.question) for e in held] == \
           [(r["id"], str(root / "datasets" / r["image"]), r["conversations"][0]["value"]) for r in first]


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
    assert not (tmp_path / "o").exists()                            # stopped before anything was written


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
    res, _, _ = run(folders, tmp_path / "out", "--setting", "task-hom", "--method", "disco", "--gradient-checkpointing",
                    device="cuda")
    assert res["config"]["device"] == "cuda" and res["config"]["gradient_checkpointing"] and len(res["acc"]) == 8
