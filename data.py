"""The FCIT benchmark as data: the 12 datasets, the 4 settings, and the Dirichlet partition over clients.

Reads instruction data in the layout of the official FCIT release (fcit-paper-notes.md, 1.1-1.3):
    ROOT/instructions/<Dataset>/train*.json, test*.json    lists of LLaVA conversation records
    ROOT/datasets/...                                       images, the records' "image" paths relative to it
A record is {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]};
the embedded benchmark (synthetic.py) writes exactly this, and the same loader reads the real release.
Settings: task-related (8 stages, one dataset each) or capability-related (4 stages, datasets grouped by skill),
Homogeneous (every client of stage t learns stage t's task) or Heterogeneous (a fixed table of tasks per client
slot). A *task* is what a stage trains on: a dataset (task-related) or a capability group (capability-related).
Partition (1.3): per task, client shares w ~ Dir(beta * 1_C), quantity skew only, with a real minimum size.

    python -c "import data; print(data.SETTINGS['cap-het'])"
Tests: python -m pytest tests/test_data.py
"""
import glob
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------- the 12 datasets and their metrics
METRIC = {"ImageNet-R": "exact", "ArxivQA": "exact", "IconQA": "exact", "CLEVR-Math": "exact",
          "OCR-VQA": "exact", "Flickr30k": "caption", "FigureQA": "substring", "super-CLEVR": "exact",
          "AOKVQA": "exact", "Grounding": "iou", "DVQA": "substring", "TabMWP": "exact"}


@dataclass
class Example:
    id: str
    image: str                          # absolute path
    question: str                       # first human turn, "<image>\n" kept (LLaVA format)
    answer: str                         # first gpt turn
    references: list | None = None      # caption references when the record has several


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e}); expected a list of LLaVA conversation records") from None


def parse_records(records, path, image_root):
    """Examples from a list of records; every problem is reported with the file and record index."""
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        conv = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv):
            raise ValueError(f"{path}: record {i} has no 'conversations' with a human and a gpt turn; "
                             "see README, 'Data format'")
        if not isinstance(r.get("image"), str):
            raise ValueError(f"{path}: record {i} ({r.get('id', '?')}) has no 'image'")
        human = next((c["value"] for c in conv if c.get("from") == "human"), None)
        gpt = next((c["value"] for c in conv if c.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise ValueError(f"{path}: record {i} needs one turn from 'human' and one from 'gpt'")
        image = resolve_image(image_root, r["image"], f"{path}: record {i}")
        out.append(Example(str(r.get("id", i)), image, human, gpt, r.get("references")))
    return out


def resolve_image(root, rel, where):
    """Images live under ROOT/datasets/ in the release; ROOT/ itself is accepted too."""
    for cand in (os.path.join(root, "datasets", rel), os.path.join(root, rel)):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"{where}: image '{rel}' not found under {root}/datasets/ or {root}/")


def read_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


def split_file(root, dataset, split):
    """instructions/<Dataset>/<split>*.json: train.json here, train_4w.json or similar in the release."""
    found = sorted(glob.glob(os.path.join(root, "instructions", dataset, f"{split}*.json")))
    if not found:
        raise FileNotFoundError(f"{root}/instructions/{dataset}/{split}*.json: no {split} file for {dataset}")
    return found[0]


def load_dataset(root, dataset, split, *, limit=None):
    path = split_file(root, dataset, split)
    records = read_json(path)
    return parse_records(records if limit is None else records[:limit], path, os.path.abspath(root))


# ---------------------------------------------------------------------------- the four settings
TASK_ORDER = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]
CAPABILITIES = {"General": ["AOKVQA", "IconQA", "Grounding", "ImageNet-R"], "Chart": ["ArxivQA", "FigureQA", "DVQA"],
                "Math": ["CLEVR-Math", "super-CLEVR", "TabMWP"], "Other": ["Flickr30k", "OCR-VQA"]}
HET_TASK = [[1, 2, 4, 5, 6], [3, 4, 5, 7, 7], [0, 2, 3, 4, 5], [0, 0, 1, 3, 7],
            [1, 2, 4, 4, 5], [0, 3, 5, 7, 7], [2, 2, 5, 7, 7], [5, 5, 5, 6, 6]]
HET_CAP = [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]


@dataclass
class Setting:
    name: str
    tasks: list                 # task names in order
    datasets: dict              # task -> its datasets
    slots: list                 # per stage, the task index of each client slot (Hom: one entry = every client)
    heterogeneous: bool = False

    @property
    def num_stages(self):
        return len(self.slots)

    def stage_tasks(self, t):
        """Tasks trained in stage t, in order of first appearance."""
        return list(dict.fromkeys(self.tasks[i] for i in self.slots[t]))

    def seen_tasks(self, t):
        """Tasks evaluated after stage t: all trained in stages 0..t, in the setting's order."""
        seen = {self.tasks[i] for s in self.slots[:t + 1] for i in s}
        return [k for k in self.tasks if k in seen]


def make_settings():
    task = {d: [d] for d in TASK_ORDER}
    return {"task-hom": Setting("task-hom", TASK_ORDER, task, [[t] for t in range(8)]),
            "task-het": Setting("task-het", TASK_ORDER, task, HET_TASK, True),
            "cap-hom": Setting("cap-hom", list(CAPABILITIES), CAPABILITIES, [[t] for t in range(4)]),
            "cap-het": Setting("cap-het", list(CAPABILITIES), CAPABILITIES, HET_CAP, True)}


SETTINGS = make_settings()


def get_setting(name):
    if name not in SETTINGS:
        raise ValueError(f"--setting {name!r} is unknown; choose one of {', '.join(SETTINGS)}")
    return SETTINGS[name]


@dataclass
class TaskData:
    name: str
    train: list                                   # examples of all the task's datasets, shuffled together
    test: dict = field(default_factory=dict)      # dataset -> test examples


def load_setting(root, setting: Setting, *, rng, train_limit=None, test_limit=None):
    """TaskData per task; a capability group's training data is the shuffled union of its datasets (1.2)."""
    out = {}
    for task in setting.tasks:
        train = [e for d in setting.datasets[task] for e in load_dataset(root, d, "train", limit=train_limit)]
        train = [train[i] for i in rng.permutation(len(train))]
        test = {d: load_dataset(root, d, "test", limit=test_limit) for d in setting.datasets[task]}
        out[task] = TaskData(task, train, test)
    return out


# ---------------------------------------------------------------------------- Dirichlet partition
def dirichlet_partition(num_examples, num_clients, *, beta, min_size, rng):
    """Client index sets for one task: quantity skew with shares w ~ Dir(beta * 1_C) (FCIT 1.3).
    Each client first gets min_size examples, the rest is split by w, so min_size is guaranteed without
    resampling loops (the official code passes beta where min_size was meant and seeds nothing)."""
    if beta <= 0:
        raise ValueError(f"--beta must be > 0, got {beta}")
    if num_examples < num_clients * min_size:
        raise ValueError(f"cannot give {num_clients} clients at least {min_size} examples each from "
                         f"{num_examples}; lower --clients or min_size")
    w = rng.dirichlet(np.full(num_clients, float(beta)))                  # (C,)
    extra = num_examples - num_clients * min_size
    sizes = min_size + np.floor(w * extra).astype(int)
    sizes[np.argsort(-w)[:num_examples - sizes.sum()]] += 1                # hand out the rounding remainder
    order = rng.permutation(num_examples)                                 # content is IID inside a task
    return np.split(order, np.cumsum(sizes)[:-1])


def partition_setting(data, num_clients, *, beta, min_size, rng):
    """task -> list of client index arrays (each task has its own partition over all clients)."""
    parts = {}
    for task, td in data.items():
        try:
            parts[task] = dirichlet_partition(len(td.train), num_clients, beta=beta, min_size=min_size, rng=rng)
        except ValueError as e:
            raise ValueError(f"task {task}: {e}") from None
    return parts


def save_partition(path, parts):
    with open(path, "w") as f:
        json.dump({t: [p.tolist() for p in ps] for t, ps in parts.items()}, f)
