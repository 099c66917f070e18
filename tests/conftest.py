"""Shared fixtures: one tiny cache (embedded benchmark + micro base) for the session, the end-to-end runs of
`train.py --preset tiny` made once and read by every test that needs them, and the one crash helper of the resume
tests. Run the suite from the repository root: python -m pytest -q tests"""
import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

import train
from storage.checkpoint import checkpoint_meta


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """FCIT_CACHE pointing at a temporary folder, so tests never touch the user's cache."""
    path = tmp_path_factory.mktemp("fcit-cache")
    old = os.environ.get("FCIT_CACHE")
    os.environ["FCIT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FCIT_CACHE", None)
    else:
        os.environ["FCIT_CACHE"] = old


# The end-to-end runs: the tiny preset on the first 16 training records and the first test record of each dataset.
# Every code path of a full run (all stages, rounds, clients, aggregation, evaluation, checkpoints) in seconds.
TINY = ["--preset", "tiny", "--train-limit", "16", "--test-limit", "1"]


@dataclasses.dataclass
class Run:
    """One finished run of `train.py *argv --out out`: what main returned, its folder, every line it printed."""
    res: dict
    out: Path
    lines: list
    argv: list                      # the command's flags without --out

    @property
    def cfg(self):
        """The run's resolved configuration."""
        return train.resolve(train.parse_args(self.argv))

    def progress(self):
        """(stage, round) its checkpoint holds: where a resume continues."""
        meta = checkpoint_meta(self.out)
        return meta["stage"], meta["round"]

    def results(self):
        """results.json as written on disk."""
        return json.loads((self.out / "results.json").read_text())


def argv_key(flags):
    """Runs with the same resolved configuration are the same run (e.g. '--method disco' and no flag at all)."""
    args = train.parse_args([*TINY, *flags])
    return json.dumps(dataclasses.asdict(train.resolve(args)), sort_keys=True), args.verbose


@pytest.fixture(scope="session")
def tiny_run(tiny_cache, tmp_path_factory):
    """tiny_run(*flags, name="shared") -> Run of `python train.py TINY *flags`, made once per session.

    Every test that reads the same configuration reads the same run; `name` asks for another, independent run
    of it (the determinism test compares two). A test gets a copy of the results and must not write into the run's
    folder: `copy_run` gives it a folder of its own."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(*flags, name="shared"):
        key = (argv_key(flags), name)
        if key not in done:
            out, lines, argv = root / f"run{len(done)}", [], [*TINY, *flags]
            res = train.main([*argv, "--out", str(out)], log=lines.append)
            done[key] = Run(res, out, lines, argv)
        r = done[key]
        return Run(copy.deepcopy(r.res), r.out, list(r.lines), list(r.argv))
    return run


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(run) -> a copy of a finished run's folder under this test's tmp_path, to resume or break."""
    def copy_(run):
        out = tmp_path / run.out.name
        shutil.copytree(run.out, out)
        return out
    return copy_


@pytest.fixture
def crash_and_resume(tiny_cache, monkeypatch):
    """crash_and_resume(flags, crash_at=n, out=folder) -> (resumed Run, (stage, round) of the checkpoint it died at).

    Runs `train.py TINY *flags` into `out` and kills it (KeyboardInterrupt, as a machine that dies) right after its
    n-th checkpoint is written: checkpoints are written after every round and after every stage's evaluation, so
    with --rounds 2 the 2nd is after stage 1's last round (before end_stage), the 3rd after stage 1's evaluation and
    the 4th after stage 2's first round. Then runs the same command again, which must resume from that checkpoint."""
    def run(flags, *, crash_at, out):
        argv, calls = [*TINY, *flags], {"n": 0}

        class Crashing(train.Checkpoint):
            def __call__(self, p, strategy):
                super().__call__(p, strategy)
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise KeyboardInterrupt
        monkeypatch.setattr(train, "Checkpoint", Crashing)
        with pytest.raises(KeyboardInterrupt):
            train.main([*argv, "--out", str(out)], log=lambda *a: None)
        monkeypatch.undo()
        assert calls["n"] == crash_at                                   # it died where it was meant to
        died = Run(None, Path(out), [], argv).progress()
        lines = []
        res = train.main([*argv, "--out", str(out)], log=lines.append)
        return Run(res, Path(out), lines, argv), died
    return run
