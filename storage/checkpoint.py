"""A run's files, written so that nothing is lost and nothing is silently wrong: one atomic checkpoint, and every
output (JSON, PNG) written whole or not at all.

The checkpoint is ONE safetensors file, OUT/checkpoint.safetensors: the global state ("global.<parameter>"), the
method's state (DKO's token cache, EWC's Fisher, a server's moments) and, in its metadata, the progress (next stage
and round, the history measured so far, the wall time spent) and what a resume must match: the config and a
fingerprint of the code, the thread count, the instruction data, the base model and the client partition. It is
written to a temporary file, fsynced, and renamed over the previous one (and the folder fsynced), so a kill at any
instant leaves the previous checkpoint or the new one, never a mix of the two.

    save = Checkpoint(out, identity)          # train.py: the on_round callback of federated.run_continual
    tensors, meta = read_checkpoint(out, identity)   # None if there is none; refused, naming the fields, if it is
                                                     # another run's
Tests: python -m pytest -q tests/test_reliability.py
"""
import glob
import hashlib
import json
import os
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT = "checkpoint.safetensors"


# ---------------------------------------------------------------------------- atomic writes
def atomic(path, write, *, intact=""):
    """write(tmp), fsync, rename onto `path`: a crash leaves the old file or the new one, never half of one. A failed
    write (a full disk) removes the temporary file and names the file, and `intact` says what is still whole."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"                                          # keeps the extension: pillow picks PNG by it
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)                                          # the rename itself survives a power cut
        finally:
            os.close(folder)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}){intact}") from None


def write_json(path, obj, *, indent=1, intact=""):
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
    atomic(path, dump, intact=intact)


# ---------------------------------------------------------------------------- what a resume must match
def digest(paths, *, head=None):
    """sha256 over files in order: their names and bytes, or, for weights (head = N), their sizes and first N bytes
    (a safetensors header lists every tensor's name, shape and offset; a 14 GB base is not read whole)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            if head is None:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(str(os.path.getsize(p)).encode() + f.read(head))
    return h.hexdigest()[:16]


def fingerprint(root, base, partition):
    """The code (the project's .py files), the thread count, the instruction data (its JSON files), the base model
    (its JSON files and weight headers) and the client partition ({task: [[example indices] per client]})."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = sorted(p for folder in ("", "baselines", "embedded", "storage")
                  for p in glob.glob(os.path.join(here, folder, "*.py")))
    data = sorted(glob.glob(os.path.join(root, "instructions", "**", "*.json"), recursive=True))
    weights = sorted(glob.glob(os.path.join(base, "*.safetensors")) + glob.glob(os.path.join(base, "*.bin")))
    return {"code": digest(code), "threads": torch.get_num_threads(), "data": digest(data),
            "base": digest(sorted(glob.glob(os.path.join(base, "*.json")))) + digest(weights, head=1 << 20),
            "partition": hashlib.sha256(json.dumps(partition).encode()).hexdigest()[:16]}


def differences(old, new, prefix=""):
    """['seed: 0 -> 1', 'fingerprint.threads: 1 -> 2', ...]: where two nested dicts disagree."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


# ---------------------------------------------------------------------------- the checkpoint
def read_checkpoint(out, identity):
    """(tensors, metadata) of OUT/checkpoint.safetensors, or None when there is none. A file that is not a
    checkpoint, or a checkpoint of another run (identity = {"config": ..., "fingerprint": ...}), is refused with
    the fields that differ; the caller has written nothing yet."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["fcit"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                                            # anything else is not our checkpoint
        raise ValueError(f"{path}: not a readable checkpoint of train.py ({type(e).__name__}: {e}); remove it or "
                         f"pass --fresh") from None
    diff = differences({k: meta.get(k) for k in identity}, identity)
    if diff:
        raise ValueError(f"{path}: a checkpoint of another run ({'; '.join(diff)}); use another --out, or --fresh "
                         f"to start this one over")
    return tensors, meta


def checkpoint_meta(out):
    """The progress metadata of OUT/checkpoint.safetensors (stage, round, history, wall, config, fingerprint)."""
    with safe_open(os.path.join(out, CHECKPOINT), "pt") as f:
        return json.loads(f.metadata()["fcit"])


def where(stage, round_):
    """The point a checkpoint holds, in words: (next stage, next round) -> what is done."""
    return f"stage {stage + 1}, round {round_}" if round_ else f"the end of stage {stage}"


class Checkpoint:
    """The on_round callback of federated.run_continual: global state, method state and progress in one file."""

    def __init__(self, out, identity, *, wall_before=0.0, done=None):
        self.path, self.identity = os.path.join(out, CHECKPOINT), identity
        self.t0, self.wall_before = time.time(), wall_before          # a resumed run adds up its segments
        self.intact = f"; the checkpoint of {where(*done)} in {out} is intact" if done else ""
        self.out = out

    def wall(self):
        return self.wall_before + time.time() - self.t0

    def __call__(self, p, strategy):
        tensors = {f"global.{k}": v.contiguous() for k, v in p.global_state.items()}
        tensors.update({k: v.contiguous() for k, v in strategy.state().items()})
        meta = {**self.identity, "stage": p.stage, "round": p.round, "history": p.history, "wall": self.wall()}
        atomic(self.path, lambda tmp: save_file(tensors, tmp, metadata={"fcit": json.dumps(meta)}),
               intact=self.intact)
        self.intact = f"; the checkpoint of {where(p.stage, p.round)} in {self.out} is intact"
