"""Tests for parallel/world.py: the clients of a round spread over torchrun's processes give the numbers of one
process, bitwise (results.json and the final global state), for finetune and for DISCO (whose DKO routing runs on
every rank; that run is also cut by a killed worker and resumed); the balance of clients over ranks. Two gloo
processes on CPU, the tiny preset.
Run: python -m pytest -q tests/test_parallel.py"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import TINY
from parallel.world import balance

ROOT = Path(__file__).resolve().parents[1]


def test_balance_puts_every_item_in_one_bin_longest_first_to_the_least_loaded():
    sizes = [40, 5, 33, 12, 12, 7, 60]
    bins = balance(sizes, 3)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    # longest first, each to the least loaded bin: 60 | 40 | 33, then 12 -> 45, 12 -> 52, 7 -> 52, 5 -> 57 (tie: bin 1)
    assert bins == [[6], [0, 1, 4], [2, 3, 5]]
    assert bins == balance(list(sizes), 3)                              # the same on every process
    assert balance(sizes, 1) == [list(range(len(sizes)))]
    assert balance([3, 3], 4) == [[0], [1], [], []]                     # more ranks than clients: some idle


def test_balance_beats_round_robin_on_skewed_clients():
    sizes = [100, 90, 10, 10, 10, 5]                                    # a Dirichlet-like skew
    lpt = max(sum(sizes[i] for i in b) for b in balance(sizes, 2))
    round_robin = max(sum(sizes[0::2]), sum(sizes[1::2]))
    assert lpt == 115 and round_robin == 120


# finetune on a capability setting, DISCO on a heterogeneous one (clients of one round learn different tasks):
# 4 stages x 2 rounds, 2 clients a round
FLAGS = {"finetune": ["--setting", "cap-hom", "--method", "finetune", "--rounds", "2"],
         "disco": ["--setting", "cap-het", "--method", "disco", "--rounds", "2"]}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def env(cache):
    return {**os.environ, "OMP_NUM_THREADS": "1", "FCIT_CACHE": str(cache)}    # torchrun's one thread a process


def finished(out):
    """(results.json without its wall time, the final checkpoint's tensors) of a run folder."""
    res = json.loads((out / "results.json").read_text())
    return {k: v for k, v in res.items() if k != "wall_seconds"}, load_file(str(out / "checkpoint.safetensors"))


def run(cmd, method, out, cache, extra=()):
    done = subprocess.run([*cmd, "train.py", *TINY, *FLAGS[method], *extra, "--out", str(out)], cwd=ROOT,
                          env=env(cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (*finished(out), done.stdout)


def in_process(method, out, extra=()):
    """The single-process run, made in this test process at one thread (torchrun's one thread a process), the
    thread count restored after: (results.json without its wall time, the final checkpoint's tensors, its output)."""
    lines, threads = [], torch.get_num_threads()
    try:
        train.main([*TINY, *FLAGS[method], *extra, "--threads", "1", "--out", str(out)], log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return (*finished(out), "\n".join(lines))


@pytest.fixture(scope="module")
def one_process(tiny_cache, tmp_path_factory):
    """method -> the single-process run (made once; the first also fills the cache before torchrun reads it)."""
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = in_process(method, tmp_path_factory.mktemp(method))
        return runs[method]
    return get


def test_two_gloo_processes_give_the_single_process_numbers_bitwise(tmp_path, tiny_cache, one_process):
    """Finetune here; DISCO's two-process run is the restart test's below (bitwise too, its run cut by a kill)."""
    one, two = one_process("finetune"), run(TORCHRUN, "finetune", tmp_path / "two", tiny_cache)
    assert one[0] == two[0]
    assert one[1].keys() == two[1].keys() and all(torch.equal(one[1][k], two[1][k]) for k in one[1])
    assert one[0]["acc"] and one[2].count("stage 4/4 round 2/2") == 1   # it ran; rank 1 printed nothing
    assert two[2].count("stage 4/4 round 2/2") == 1


def children(pid):
    """The process ids whose parent is pid (Linux /proc: no pgrep needed)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()      # after "(comm)": state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def environ_rank(pid):
    """The RANK torchrun gave a worker process, from its environment (Linux /proc)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_with_the_same_numbers(tmp_path, tiny_cache,
                                                                                        one_process):
    """DISCO in 2 gloo processes (DKO's routing on every rank), rank 1 killed after the first round's checkpoint:
    torchrun restarts both, they resume, and results.json and every tensor of the final state equal one process's
    bitwise; rank 0 alone printed, each round once."""
    one, two = one_process("disco"), tmp_path / "two"
    agent = subprocess.Popen([*TORCHRUN, "--max-restarts", "1", "train.py", *TINY, *FLAGS["disco"], "--out", str(two)],
                             cwd=ROOT, env={**env(tiny_cache), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    while agent.poll() is None and not killed:                        # after the first round's checkpoint: rank 1
        if (two / "checkpoint.safetensors").exists():
            victim = next((p for p in children(agent.pid) if environ_rank(p) == 1), None)
            if victim is not None:
                os.kill(victim, 9)
                killed = True
    try:
        output = agent.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        agent.kill()
        raise
    assert killed, "the run ended before a worker could be killed:\n" + output[-2000:]
    assert agent.returncode == 0, output[-3000:]
    assert "resuming from" in output                                   # the restarted rank 0 read the checkpoint
    again = finished(two)
    assert again[0] == one[0] and one[1].keys() == again[1].keys()
    assert all(torch.equal(again[1][k], one[1][k]) for k in one[1])
    assert one[0]["acc"] and one[2].count("stage 4/4 round 2/2") == 1 and output.count("stage 4/4 round 2/2") == 1


def test_restarts_without_a_fresh_store_per_attempt_are_refused_before_any_work(tmp_path, tiny_cache, monkeypatch):
    # torchrun's shared rendezvous store outlives a restart and hangs the restarted workers' connect. The environment
    # torchrun --max-restarts 1 gives a worker, in this process: the refusal comes before any process group or file
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "TORCHELASTIC_MAX_RESTARTS": "1",
                        "TORCHELASTIC_USE_AGENT_STORE": "True", "FCIT_CACHE": str(tiny_cache)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    with pytest.raises(SystemExit, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        train.main([*TINY, *FLAGS["finetune"], "--out", str(tmp_path / "run")], log=lambda *a: None)
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_balanced_mode_splits_every_batch_and_equals_one_process_within_rounding(tmp_path, tiny_cache):
    """--parallel balanced: both processes compute every client, each half of every batch, gradients summed with
    all_reduce. Without dropout (each process would draw its own) the only difference from one process is the
    order of float sums, which AdamW turns into steps of up to lr where a gradient is near zero (m / sqrt(v) is
    then +-1 whatever its size): every tensor of the final global state agrees to 1% of its largest entry
    (measured 0.15%), and the accuracy matrix is the same."""
    flags = ["--lora-dropout", "0"]
    one = in_process("disco", tmp_path / "one", flags)
    two = run(TORCHRUN, "disco", tmp_path / "two", tiny_cache, [*flags, "--parallel", "balanced"])
    assert two[0]["config"]["parallel"] == "balanced" and two[2].count("stage 4/4 round 2/2") == 1
    assert one[0]["acc"] == two[0]["acc"] and one[0]["subspaces"] == two[0]["subspaces"]
    assert one[1].keys() == two[1].keys()
    moved = [k for k in one[1] if not torch.equal(one[1][k], two[1][k])]
    assert moved, "bitwise equal: the batches were not split (balanced must sum in another order)"
    for k in one[1]:
        scale = float(one[1][k].abs().max()) or 1.0
        assert float((one[1][k] - two[1][k]).abs().max()) <= 1e-2 * scale, k
