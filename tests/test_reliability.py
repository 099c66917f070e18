"""Nothing lost, nothing silently wrong (storage/checkpoint.py, train.main, federated.run_continual): a run killed
anywhere resumes to the uninterrupted run's numbers; the checkpoint is one file; a refused resume names what differs
and touches nothing; a finished run is kept as it is; a diverged client is dropped and a round where every client
diverges stops cleanly; a full disk names the file and the checkpoint that is intact.
Run: python -m pytest -q tests/test_reliability.py"""
import errno
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import federated
import fcit
import train
from storage import checkpoint as storage

FLAGS = ["--preset", "tiny", "--setting", "cap-hom", "--rounds", "2", "--method", "disco", "--train-limit", "24",
         "--test-limit", "3"]                                          # 4 stages x 2 rounds, small: seconds


class Killed(BaseException):
    """What SIGKILL does to the process, raised at the injection point (no except clause of the code catches it)."""


def kill_at(monkeypatch, owner, name, n, when=None):
    """Wrap owner.name so that its n-th call (counting only calls for which when(*args) holds) kills the run
    before doing its work. Returns the call counter."""
    real, calls = getattr(owner, name), {"n": 0}

    def wrapper(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise Killed(f"{name} #{n}")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def run(out, *flags, log=lambda *a: None):
    return train.main([*FLAGS, "--out", str(out), *flags], log=log)


@pytest.fixture(scope="module")
def full(tiny_cache, tmp_path_factory):
    """The uninterrupted run: its results, the tensors of its final checkpoint, and its folder (read only: a test
    that writes copies it, `own`)."""
    out = tmp_path_factory.mktemp("full")
    return run(out), load_file(out / storage.CHECKPOINT), out


def own(full, folder):
    """A copy of the uninterrupted run's folder, as the run itself would have left it there."""
    shutil.copytree(full[2], folder)
    return folder


def to_checkpoint(*args, **kwargs):
    return str(args[-1]).endswith(storage.CHECKPOINT)                 # os.replace(tmp, dst): the checkpoint's rename


def checkpoint_tmp(*args, **kwargs):
    return str(args[-1]).endswith(".tmp.safetensors")                # save_file(tensors, tmp): the checkpoint's write


# every place a machine can die: in a client, in the server, in each file operation of the checkpoint, in evaluation
POINTS = [("inside a client", train, "collate", 9, None),               # a training batch of stage 1, round 2
          ("inside aggregation", fcit, "aggregate_subspace", 11, None), # mid-way through the 3 LoRA layers of a round
          ("inside the checkpoint's write", storage, "save_file", 3, checkpoint_tmp),
          ("between write and fsync", os, "fsync", 7, None),
          ("between fsync and rename", os, "replace", 4, to_checkpoint),
          ("inside evaluation", train, "generate", 4, None),            # stage 2's evaluation
          ("before the results", train, "write_results", 1, None)]      # everything trained, results not written


@pytest.mark.parametrize("where, owner, name, n, when", POINTS, ids=[p[0] for p in POINTS])
def test_a_run_killed_anywhere_resumes_to_the_same_results(full, tmp_path, monkeypatch, where, owner, name, n, when):
    calls = kill_at(monkeypatch, owner, name, n, when)
    with pytest.raises(Killed):
        run(tmp_path)
    assert calls["n"] == n                                                # it died where it was meant to
    monkeypatch.undo()
    resumed = run(tmp_path)
    res, tensors, _ = full
    assert resumed["acc"] == res["acc"] and resumed["subspaces"] == res["subspaces"]
    assert resumed["routes"] == res["routes"] and resumed["gates"] == res["gates"]
    final = load_file(tmp_path / storage.CHECKPOINT)                    # global model, DKO cache: bit-identical
    assert final.keys() == tensors.keys() and all(torch.equal(final[k], tensors[k]) for k in final)
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


def test_the_checkpoint_is_one_file_holding_state_progress_and_fingerprint(full):
    _, tensors, out = full
    meta = storage.checkpoint_meta(out)
    assert (meta["stage"], meta["round"]) == (4, 0) and len(meta["history"]["acc"]) == 4
    assert set(meta["fingerprint"]) == {"code", "threads", "data", "base", "partition"}
    assert meta["fingerprint"]["threads"] == torch.get_num_threads() and meta["wall"] > 0
    assert "disco.tokens" in tensors and any(k.startswith("global.") for k in tensors)
    assert not (out / "checkpoint.json").exists()


def test_threads_sets_torchs_thread_count_and_the_fingerprint_records_it(tiny_cache, tmp_path):
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1                                      # a count that differs from the current one
    try:
        run(tmp_path / "t", "--rounds", "1", "--threads", str(want))
        assert torch.get_num_threads() == want
        assert storage.checkpoint_meta(tmp_path / "t")["fingerprint"]["threads"] == want
    finally:
        torch.set_num_threads(before)                                   # the rest of the suite runs as it did


def test_a_refused_resume_names_the_field_and_touches_nothing(full, tmp_path):
    out = own(full, tmp_path / "r")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        run(out, "--seed", "1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_finished_run_says_so_and_keeps_its_files(full, tmp_path):
    out, first = own(full, tmp_path / "f"), full[0]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    lines = []
    again = run(out, log=lines.append)
    assert again["wall_seconds"] == first["wall_seconds"] and again["acc"] == first["acc"]
    assert any("complete" in line for line in lines)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_resumed_run_adds_up_the_wall_time_of_its_segments(full, tmp_path, monkeypatch):
    kill_at(monkeypatch, train, "generate", 4)
    with pytest.raises(Killed):
        run(tmp_path)
    spent = storage.checkpoint_meta(tmp_path)["wall"]
    monkeypatch.undo()
    resumed = run(tmp_path)
    assert spent > 0 and resumed["wall_seconds"] >= round(spent, 1)


def test_a_diverged_client_is_dropped_and_the_others_aggregate(tiny_cache, tmp_path, monkeypatch):
    real, calls = federated.local_train, {"n": 0}

    def second_diverges(*args, **kwargs):
        state, loss = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:                                               # round 1's second client
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        return state, loss
    monkeypatch.setattr(federated, "local_train", second_diverges)
    lines = []
    res = train.main([*FLAGS, "--rounds", "1", "--out", str(tmp_path)], log=lines.append)
    dropped = [line for line in lines if "dropped from round" in line]
    assert len(dropped) == 1 and "diverged" in dropped[0] and dropped[0].endswith("round 1"), dropped
    assert all(0 <= v <= 100 for row in res["acc"] for v in row.values())
    final = load_file(tmp_path / storage.CHECKPOINT)
    assert all(bool(torch.isfinite(v).all()) for v in final.values())


def test_a_round_where_every_client_diverges_stops_and_keeps_the_last_checkpoint(tiny_cache, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--lr"):                         # a nan rate is refused before any work
        run(tmp_path, "--lr", "nan")
    assert not tmp_path.joinpath(storage.CHECKPOINT).exists()
    real, calls = federated.local_train, {"n": 0}

    def diverges_from_stage_2(*args, **kwargs):
        state, loss = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4:                                                # stage 1: 2 rounds x 2 clients train well
            loss = float("nan")
        return state, loss
    monkeypatch.setattr(federated, "local_train", diverges_from_stage_2)
    with pytest.raises(federated.Diverged, match="stage 2 round 1: every client's training diverged"):
        run(tmp_path)
    meta = storage.checkpoint_meta(tmp_path)
    assert (meta["stage"], meta["round"]) == (1, 0)                      # the end of stage 1: the last good one
    assert not (tmp_path / "results.json").exists()


def test_a_full_disk_names_the_file_and_the_intact_checkpoint(full, tmp_path, monkeypatch):
    real, calls = storage.save_file, {"n": 0}

    def disk_full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:                                               # saves: (1, 1), (1, 2), (2, 0), (2, 1), x
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(storage, "save_file", disk_full)
    with pytest.raises(OSError, match=r"could not write .*checkpoint\.safetensors \(No space left on device\); "
                                      r"the checkpoint of stage 2, round 1 in .* is intact"):
        run(tmp_path)
    meta = storage.checkpoint_meta(tmp_path)
    assert (meta["stage"], meta["round"]) == (1, 1)                      # (next stage 1 = stage 2, 1 round done)
    assert not list(tmp_path.glob("*.tmp*"))
