"""scripts/sweep.py: the comparison in one command. It skips finished runs (resume), writes the table from the runs'
results.json, and one failing run does not stop the others. Run: python -m pytest -q tests/test_sweep.py"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scripts import sweep

TINY = ["--", "--preset", "tiny", "--train-limit", "16", "--test-limit", "1"]   # conftest.TINY: flags for every run


def test_sweep_writes_the_table_from_the_runs_and_skips_finished_runs(tiny_run, tmp_path):
    root = tmp_path / "runs"
    argv = ["--root", str(root), "--settings", "cap-het", "--methods", "finetune", "disco", *TINY]
    assert sweep.main(argv, log=lambda *a: None) == []
    results = {m: json.loads((root / f"cap-het_{m}_b1_s0" / "results.json").read_text()) for m in ("finetune", "disco")}
    table = (root / "table.md").read_text()
    for m, r in results.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {m} |"))
        assert f"{r['last']:.2f}" in row and f"{r['avg']:.2f}" in row
    assert (root / "table.png").stat().st_size > 0
    # a sweep's run is train.py's run of that setting and method: the same final model, bit for bit
    ours = tiny_run("--setting", "cap-het", "--method", "finetune")
    assert results["finetune"]["acc"] == ours.res["acc"]
    a, b = (load_file(out / "checkpoint.safetensors") for out in (root / "cap-het_finetune_b1_s0", ours.out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stamp = (root / "cap-het_disco_b1_s0" / "results.json").stat().st_mtime_ns
    lines = []
    sweep.main(argv, log=lines.append)                              # resume: nothing left to run
    assert (root / "cap-het_disco_b1_s0" / "results.json").stat().st_mtime_ns == stamp
    assert sum("skipped" in line for line in lines) == 2


def test_cells_are_mean_and_std_over_seeds():
    assert sweep.cell([70.0, 80.0]) == f"75.00 +- {np.std([70.0, 80.0]):.2f} (2)"
    assert sweep.cell([70.0]) == "70.00" and sweep.cell([]) == "-"


def test_a_failing_run_is_reported_and_the_others_still_run(tiny_cache, tmp_path, monkeypatch):
    real = sweep.train.main

    def flaky(argv, log):
        if "ewc" in argv:
            raise RuntimeError("simulated crash")
        return real(argv, log=log)
    monkeypatch.setattr(sweep.train, "main", flaky)
    root = tmp_path / "runs"
    failed = sweep.main(["--root", str(root), "--settings", "cap-het", "--methods", "ewc", "zeroshot", *TINY],
                        log=lambda *a: None)
    assert failed == [str(root / "cap-het_ewc_b1_s0")]
    done = json.loads((root / "cap-het_zeroshot_b1_s0" / "results.json").read_text())
    assert (done["setting"], done["method"]) == ("cap-het", "zeroshot")


def test_unknown_methods_fail_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="--methods"):
        sweep.main(["--root", str(tmp_path), "--methods", "nope"], log=lambda *a: None)
    assert not list(tmp_path.iterdir())
