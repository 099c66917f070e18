"""Every bad input named before work starts: numeric flags out of range (config/run.py, validate), missing and
unreadable images listed at once with their JSON record (data.check_images), and incomplete or truncated model
folders (model.require_folder). Each test asserts the message names the flag, the file or the record.
Run: python -m pytest -q tests/test_inputs.py"""
import json
import math
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

import data
import model as M
import train
from config.run import validate
from embedded import benchmark, pretraining
from embedded.base import BaseConfig, build_processor, build_tiny_llava, build_tokenizer
from release.partitions import load_release
from release_fixture import write_release_fixture


def quiet(*a):
    pass


def names(flag, message):
    """The message names this flag, not a longer one it is a prefix of (--clients vs --clients-per-round)."""
    return re.search(re.escape(flag) + r"(?![\w-])", message) is not None


def truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


# ---------------------------------------------------------------------------- numeric flags
SERVER = ("--server", "fedavgm", "--aggregate", "ab")                  # --server-lr is eta of a stateful server
BAD_FLAGS = [("--lr", v, ()) for v in ("nan", "inf", "-1", "0", "1e9", "1.5")] \
    + [("--beta", v, ()) for v in ("nan", "inf", "-1", "0")] \
    + [(f, "0", ()) for f in ("--rounds", "--clients", "--clients-per-round", "--local-epochs", "--batch-size",
                              "--eval-batch", "--train-limit", "--test-limit")] \
    + [("--micro-batch", "-1", ()), ("--seed", "-1", ()), ("--threads", "0", ())] \
    + [("--threshold", v, ()) for v in ("nan", "1.5", "-2")] \
    + [("--server-lr", v, SERVER) for v in ("nan", "inf", "-1")] \
    + [("--mu", v, ("--server", "fedprox")) for v in ("nan", "inf", "-1")] \
    + [("--lora-dropout", v, ()) for v in ("nan", "1", "-0.1")]


@pytest.mark.parametrize("flag,value,extra", BAD_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_FLAGS])
def test_a_bad_numeric_flag_is_named_before_anything_is_written(tmp_path, flag, value, extra):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        train.main(["--preset", "tiny", "--out", str(out), *extra, flag, value], log=quiet)
    assert names(flag, str(e.value)), str(e.value)
    assert not out.exists()                                           # refused in resolve, before main's first write


def test_a_preset_projector_lr_is_checked_too():
    cfg = train.resolve(train.parse_args(["--preset", "paper"]))
    cfg.fed.projector_lr = math.nan
    with pytest.raises(ValueError, match=r"projector_lr \(--preset paper\) must be a finite number > 0"):
        validate(cfg)


def test_the_paper_preset_trains_the_projector_at_the_lora_rate_as_the_official_trainer_does():
    # the official scripts pass --mm_projector_lr 2e-5, which the official trainer never puts into an optimizer group
    fed = train.resolve(train.parse_args(["--preset", "paper"])).fed
    assert fed.projector_lr == fed.lr == 2e-4


def test_edge_values_in_range_are_kept_not_replaced_by_defaults():
    cfg = train.resolve(train.parse_args(["--preset", "tiny", "--threshold", "0", "--micro-batch", "0", "--mu", "0",
                                          "--lr", "1", "--server", "fedprox"]))
    assert (cfg.disco.threshold, cfg.fed.micro_batch, cfg.server.mu, cfg.fed.lr) == (0.0, 0, 0.0, 1.0)
    for tau in ("-1", "1"):
        assert train.resolve(train.parse_args(["--threshold", tau])).disco.threshold == float(tau)


# ---------------------------------------------------------------------------- images
def record_image(root, rel_json, i):
    """(absolute image path, JSON path) of record i of ROOT/instructions/<rel_json>."""
    path = root / "instructions" / rel_json
    return root / "datasets" / json.loads(path.read_text())[i]["image"], path


def test_bad_images_of_any_task_are_listed_at_once_before_training(tmp_path, monkeypatch):
    """A truncated training image of the last task and a missing test image of the first: one error, before the
    base model is built, naming each JSON file and record index."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FCIT_CACHE", str(cache))
    cfg = train.resolve(train.parse_args(["--preset", "tiny"]))
    root = cache / f"data-v{benchmark.VERSION}-seed0-{cfg.train_examples}x{cfg.test_examples}"
    benchmark.write_release(str(root), seed=0, sizes=benchmark.Sizes(cfg.train_examples, cfg.test_examples))
    (cache / f"base-v{pretraining.BASE_VERSION}-seed0-{cfg.pretrain_examples}x{cfg.base_layers}").mkdir()   # prepare skips pretraining
    truncated, train_json = record_image(root, "super-CLEVR/train.json", 3)             # the 8th and last task
    missing, test_json = record_image(root, "ImageNet-R/test.json", 1)
    truncate(truncated)
    missing.unlink()
    Image.open(truncated)                                             # the header is intact: only decoding fails

    def build_model(*a, **k):
        raise AssertionError("the model was built before the images were checked")
    monkeypatch.setattr(train, "build_model", build_model)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        train.main(["--preset", "tiny", "--out", str(out)], log=quiet)
    msg = str(e.value)
    assert msg.startswith(f"2 of {8 * (cfg.train_examples + cfg.test_examples)} images")
    assert f"{train_json}: record 3: image {truncated} is unreadable (image file is truncated" in msg
    assert f"{test_json}: record 1: image {missing} is missing" in msg
    assert not out.exists()                                          # nothing written before the check


def test_many_bad_images_are_counted_and_the_list_is_cut(tmp_path):
    root = tmp_path / "fcit"
    benchmark.write_release(str(root), seed=0, sizes=benchmark.Sizes(train=3, test=2))
    d, _ = load_release(str(root), data.get_setting("cap-hom"), beta=1.0, num_clients=2,
                        rng=np.random.default_rng(0))
    for p in sorted((root / "datasets").rglob("*.png"))[:25]:
        p.unlink()
    with pytest.raises(FileNotFoundError) as e:                       # all missing: a missing-file error
        data.check_images(d, show=20)
    msg = str(e.value)
    assert msg.startswith("25 of 60 images") and msg.endswith("... and 5 more")
    assert len(re.findall(r"\.json: record \d+: image .* is missing", msg)) == 20


def test_a_clean_release_passes_and_shared_images_are_opened_once(tmp_path, monkeypatch):
    root = tmp_path / "fcit"
    benchmark.write_release(str(root), seed=0, sizes=benchmark.Sizes(train=3, test=2))
    d, _ = load_release(str(root), data.get_setting("task-hom"), beta=1.0, num_clients=2,
                        rng=np.random.default_rng(0))
    opened = []
    real = data.image_problem
    monkeypatch.setattr(data, "image_problem", lambda p: opened.append(p) or real(p))
    d["ImageNet-R"].train.append(d["ImageNet-R"].train[0])            # two records, one image
    assert data.check_images(d) is None
    assert len(opened) == len(set(opened)) == 8 * (3 + 2)


def test_a_bad_image_of_a_premade_client_names_the_client_file(tmp_path):
    root = tmp_path / "FCIT"
    write_release_fixture(str(root), num_clients=3, per_file=6)
    d, parts = load_release(str(root), data.get_setting("task-hom"), beta=1.0, num_clients=3,
                            rng=np.random.default_rng(0))
    assert parts is not None
    client = root / "partitioned_data/Task-related/seq/1.0/Task8/client_2.json"
    bad = root / "datasets" / json.loads(client.read_text())[1]["image"]
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=re.escape(f"{client}: record 1: image {bad} is unreadable (cannot identify")):
        data.check_images(d)


# ---------------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(LLaVA folder, the same sharded, CLIP text encoder folder), tiny, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("models")
    cfg = BaseConfig(width=32, layers=1, heads=2, ffn=64, vision_width=32, vision_layers=1)
    tokenizer = build_tokenizer(["question answer test", cfg.system])
    llava = build_tiny_llava(tokenizer, cfg)
    for name, shard in (("llava", "5GB"), ("sharded", "40KB")):
        llava.save_pretrained(root / name, max_shard_size=shard)
        build_processor(tokenizer, cfg).save_pretrained(root / name)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        eos_token_id=tokenizer.eos_token_id))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return {"llava": root / "llava", "sharded": root / "sharded", "clip": root / "clip"}


def damaged(folders, tmp_path, kind, damage):
    path = tmp_path / kind
    shutil.copytree(folders[kind], path)
    damage(path)
    return path


LOAD = {"llava": M.load_llava, "sharded": M.load_llava, "clip": M.load_text_encoder}


def test_intact_folders_load(folders):
    for kind, load in LOAD.items():
        load(str(folders[kind]))


@pytest.mark.parametrize("kind", ["llava", "clip"])
def test_missing_weights_are_named(folders, tmp_path, kind):
    path = damaged(folders, tmp_path, kind, lambda p: (p / "model.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: not a complete") + ".*missing model.safetensors"):
        LOAD[kind](str(path))


@pytest.mark.parametrize("kind", ["llava", "clip"])
def test_a_truncated_safetensors_file_is_named(folders, tmp_path, kind):
    path = damaged(folders, tmp_path, kind, lambda p: truncate(p / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{path / 'model.safetensors'}: not a readable safetensors")):
        LOAD[kind](str(path))


def test_a_missing_or_truncated_shard_is_named(folders, tmp_path):
    shards = sorted(p.name for p in folders["sharded"].glob("model-*.safetensors"))
    assert len(shards) > 1
    path = damaged(folders, tmp_path, "sharded", lambda p: (p / shards[-1]).unlink())
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path / 'model.safetensors.index.json'} names 1 missing "
                                                          f"shard: {shards[-1]}")):
        M.load_llava(str(path))
    shutil.copy(folders["sharded"] / shards[-1], path / shards[-1])
    truncate(path / shards[0])
    with pytest.raises(ValueError, match=re.escape(f"{path / shards[0]}: not a readable safetensors")):
        M.load_llava(str(path))


@pytest.mark.parametrize("kind", ["llava", "clip"])
def test_a_missing_tokenizer_file_is_named_not_blamed_on_sentencepiece(folders, tmp_path, kind):
    path = damaged(folders, tmp_path, kind, lambda p: (p / "tokenizer.json").unlink())
    with pytest.raises(FileNotFoundError) as e:
        LOAD[kind](str(path))
    assert f"{path}: not a complete" in str(e.value) and "missing tokenizer.json" in str(e.value)
    assert "sentencepiece" not in str(e.value)


def test_a_missing_processor_config_is_named(folders, tmp_path):
    path = damaged(folders, tmp_path, "llava", lambda p: (p / "processor_config.json").unlink())
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: not a complete LLaVA") + ".*processor_config"):
        M.load_llava(str(path))


def test_a_missing_folder_names_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: no such folder") + ".*config.json"):
        M.load_text_encoder(str(tmp_path / "nowhere"))


def test_a_bad_text_encoder_is_refused_before_any_work(folders, tmp_path):
    """The text encoder is loaded at the first DKO routing, after a round of training: its folder is checked in
    resolve, with the model's."""
    clip = damaged(folders, tmp_path, "clip", lambda p: (p / "tokenizer.json").unlink())
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{clip}: not a complete CLIP text encoder")):
        train.main(["--preset", "tiny", "--model", str(folders["llava"]), "--text-encoder", str(clip),
                    "--out", str(out)], log=quiet)
    assert not out.exists()
