"""scripts/sweep.py: the comparison in one command. It skips finished runs (resume), writes the table from the runs'
results.json, and one failing run does not stop the others. Run: python -m pytest -q tests/test_sweep.py"""
import json

import numpy as np
import pytest

from scripts import sweep

TINY = ["--", "--preset", "tiny", "--train-limit", "20", "--test-limit", "2"]   # conftest.TINY: flags for every run


def test_sweep_writes_the_table_from_the_runs_and_skips_finished_runs(tiny_run, tmp_path):
    root = tmp_path / "runs"
    argv = ["--root", str(root), "--settings", "task-hom", "--methods", "finetune", "disco", *TINY]
    assert sweep.main(argv, log=lambda *a: None) == []
    results = {m: json.loads((root / f"task-hom_{m}_b1_s0" / "results.json").read_text()) for m in ("finetune", "disco")}
    table = (root / "table.md").read_text()
    for m, r in results.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {m} |"))
        assert f"{r['last']:.2f}" in row and f"{r['avg']:.2f}" in row
    assert (root / "table.png").stat().st_size > 0
    # a sweep's run is train.py's run of that setting and method
    assert results["finetune"]["acc"] == tiny_run("--setting", "task-hom", "--method", "finetune").res["acc"]
    stamp = (root / "task-hom_disco_b1_s0" / "results.json").stat().st_mtime_ns
    lines = []
    sweep.main(argv, log=lines.append)                              # resume: nothing left to run
    assert (root / "task-hom_disco_b1_s0" / "results.json").stat().st_mtime_ns == stamp
    assert sum("skipped" in line for line in lines) == 2


def test_cells_are_mean_and_std_over_seeds():
    assert sweep.cell([70.0, 80.0]) == f"75.00 +- {np.std([70.0, 80.0]):.2f}"
    assert sweep.cell([70.0]) == "70.00" and sweep.cell([]) == "-"


def test_a_failing_run_is_reported_and_the_others_still_run(tiny_cache, tmp_path, monkeypatch):
    real = sweep.train.main

    def flaky(argv, log):
        if "ewc" in argv:
            raise RuntimeError("simulated crash")
        return real(argv, log=log)
    monkeypatch.setattr(sweep.train, "main", flaky)
    root = tmp_path / "runs"
    failed = sweep.main(["--root", str(root), "--settings", "task-hom", "--methods", "ewc", "finetune", *TINY],
                        log=lambda *a: None)
    assert failed == [str(root / "task-hom_ewc_b1_s0")]
    assert (root / "task-hom_finetune_b1_s0" / "results.json").exists()


def test_unknown_methods_fail_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="--methods"):
        sweep.main(["--root", str(tmp_path), "--methods", "nope"], log=lambda *a: None)
    assert not list(tmp_path.iterdir())
