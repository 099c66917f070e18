"""The FCIT benchmark as data: the 12 datasets, the 4 settings, and the Dirichlet partition over clients.

Reads the official FCIT release exactly as it lies after download (HF MLLM-CL/FCIT; file names from the official
scripts), and the embedded benchmark (embedded/benchmark.py), which writes instructions/<Dataset>/{train,test}.json:
    ROOT/instructions/<Folder>/<train>, <test>   RELEASE below: e.g. OCRVQA/train_10w.json, IconQA/val.json
    ROOT/instructions/Flickr30k-cap/val_coco_type.json          COCO captions of the Flickr30k test images
    ROOT/datasets/<ImageFolder>/...                             images; a record's "image" is relative to datasets/
A record is a LLaVA conversation {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", ...}]} or, in test files, the official eval's question record {"question_id", "image", "text",
"answer" | "answer_bbox"}.
Settings: task-related (8 stages, one dataset each) or capability-related (4 stages, datasets grouped by skill),
Homogeneous (every client of stage t learns stage t's task) or Heterogeneous (a fixed table: the task of the i-th
client of a round). A *task* is what a stage trains on: a dataset (task-related) or a capability group
(capability-related). Partition (1.3): per task, client shares w ~ Dir(beta * 1_C), quantity skew only, with a real
minimum size; the release's pre-made client files (ROOT/partitioned_data/, read by release/partitions.py) replace
it when they exist for the run's beta.

    data = load_setting("/data/FCIT", SETTINGS["cap-hom"], rng=np.random.default_rng(0), train_limit=20,
                        test_limit=20)                                                        # a smoke test
    parts = partition_setting(data, 50, beta=1.0, min_size=4, rng=np.random.default_rng(1))  # {task: C index arrays}
    check_images(data)          # every image decoded once: all missing or unreadable ones named in one error
Tests: python -m pytest tests/test_data.py tests/test_release.py
"""
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from storage.checkpoint import write_json

# ---------------------------------------------------------------------------- the 12 datasets and their files
METRIC = {"ImageNet-R": "exact", "ArxivQA": "exact", "IconQA": "exact", "CLEVR-Math": "exact",
          "OCR-VQA": "exact", "Flickr30k": "caption", "FigureQA": "substring", "super-CLEVR": "exact",
          "AOKVQA": "exact", "Grounding": "iou", "DVQA": "substring", "TabMWP": "exact"}


def rules(root, known):
    """{dataset: scoring rule}: METRIC (the official rules) with what the release declares in ROOT/rules.json
    (the embedded benchmark declares its caption rule there); every rule one of `known` (metrics.RULES)."""
    path = os.path.join(root, "rules.json")
    declared = read_json(path) if os.path.exists(path) else {}
    if not isinstance(declared, dict) or not set(declared) <= set(METRIC) or not set(declared.values()) <= set(known):
        raise ValueError(f"{path}: expected {{dataset: rule}} with datasets of {sorted(METRIC)} and rules of "
                         f"{sorted(known)}, got {declared!r}")
    return {**METRIC, **declared}


@dataclass(frozen=True)
class Release:
    folder: str                 # ROOT/instructions/<folder>/
    train: str
    test: str                   # the question file the official eval script passes
    images: str                 # ROOT/datasets/<images>/: the first part of a record's "image"
    refs: str | None = None     # COCO-format references the official caption eval scores against


# Instruction and image folders differ (OCRVQA vs OCR-VQA, CLEVR-Math vs CLEVR); AOKVQA and Grounding share COCO2014.
RELEASE = {"ImageNet-R": Release("ImageNet-R", "train.json", "test.json", "ImageNet-R"),
           "ArxivQA": Release("ArxivQA", "train_4w.json", "test_1w.json", "ArxivQA"),
           "IconQA": Release("IconQA", "train.json", "val.json", "IconQA"),
           "CLEVR-Math": Release("CLEVR-Math", "train_4w.json", "test_1w.json", "CLEVR"),
           "OCR-VQA": Release("OCRVQA", "train_10w.json", "test_1w.json", "OCR-VQA"),
           "Flickr30k": Release("Flickr30k-cap", "train_brief_4w.json", "val_brief.json", "Flickr30k",
                                "val_coco_type.json"),
           "FigureQA": Release("FigureQA", "train.json", "test.json", "FigureQA"),
           "super-CLEVR": Release("super-CLEVR", "train.json", "test.json", "super-CLEVR"),
           "AOKVQA": Release("AOKVQA", "train.json", "val.json", "COCO2014"),
           "Grounding": Release("Grounding", "train_11w.json", "test_6000.json", "COCO2014"),
           "DVQA": Release("DVQA", "train.json", "test.json", "DVQA"),
           "TabMWP": Release("TabMWP", "train.json", "test.json", "TabMWP")}
HOW_TO = "see README, 'Run the real benchmark'"


def release_path(root, dataset, split):
    """The release's file for split 'train', 'test' or 'refs' (None for a dataset or split it does not have)."""
    spec = RELEASE.get(dataset)
    name = spec and getattr(spec, split)
    return os.path.join(root, "instructions", spec.folder, name) if name else None


def split_path(root, dataset, split):
    """The release's name if that file exists, else the embedded benchmark's instructions/<Dataset>/<split>*.json."""
    path = release_path(root, dataset, split)
    if path and os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(root, "instructions", dataset, f"{split}*.json")))
    return found[0] if found else None


def split_file(root, dataset, split):
    path = split_path(root, dataset, split)
    if path is None:
        wanted = release_path(root, dataset, split) or f"{root}/instructions/{dataset}/{split}*.json"
        raise FileNotFoundError(f"{wanted}: no {split} file for {dataset}; {HOW_TO}")
    return path


def needs_refs(root, dataset, test_path):
    """The release's caption test file comes with its references in a separate COCO-format file."""
    return test_path is not None and test_path == release_path(root, dataset, "test") and bool(RELEASE[dataset].refs)


# ---------------------------------------------------------------------------- records
@dataclass
class Example:
    id: str
    image: str                          # absolute path
    question: str                       # first human turn, "<image>\n" kept (LLaVA format)
    answer: str                         # first gpt turn
    references: list | None = None      # caption references when the record has several
    source: str = ""                    # "FILE: record i", where the record lies: what check_images names
    later: tuple = ()                   # ((question, answer), ...): the turns after the first; trained on, never asked


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e}); expected a list of LLaVA conversation records") from None


def head(records, limit):
    return records[:limit] if limit is not None and isinstance(records, list) else records


def as_text(answer):
    """Answers are compared as text; a Grounding box list [x1, y1, x2, y2] becomes "[x1, y1, x2, y2]"."""
    return "[" + ", ".join(map(str, answer)) + "]" if isinstance(answer, list) else str(answer)


def question_answer(r, where):
    """(question, answer, later turns): the first human and gpt turns and the (human, gpt) pairs after them, or
    the official eval's "text" + "answer"/"answer_bbox" (one turn)."""
    if "conversations" not in r and "text" in r:
        answer = r.get("answer", r.get("answer_bbox"))
        if not isinstance(r["text"], str) or answer is None:
            raise ValueError(f"{where} is a question record without a string 'text' and an 'answer' "
                             "(or 'answer_bbox'); see README, 'Data format'")
        # model_vqa.py prompts with "<image>\n" + text; we keep the LLaVA form of the conversation records
        question = r["text"] if "<image>" in r["text"] else "<image>\n" + r["text"]
        return question, as_text(answer), ()
    conv = r.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv):
        raise ValueError(f"{where} has no 'conversations' with a human and a gpt turn (nor 'text' and "
                         "'answer'); see README, 'Data format'")
    humans = [c.get("value") for c in conv if c.get("from") == "human"]
    gpts = [c.get("value") for c in conv if c.get("from") == "gpt"]
    if not humans or not gpts:
        raise ValueError(f"{where} needs one turn from 'human' and one from 'gpt'")
    if len(humans) != len(gpts):
        raise ValueError(f"{where} has {len(humans)} human and {len(gpts)} gpt turns; each human turn needs the gpt "
                         f"turn that answers it (no turn is dropped)")
    # the official trainer learns every gpt turn of a conversation; the later turns ride along as (question, answer)
    return humans[0], as_text(gpts[0]), tuple(zip(humans[1:], map(as_text, gpts[1:])))


def parse_records(records, path, image_root):
    """Examples from a list of records; every problem is reported with the file and record index."""
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where} has no 'conversations': it is a {type(r).__name__}, not a record")
        question, answer, later = question_answer(r, where)
        if not isinstance(r.get("image"), str):
            raise ValueError(f"{where} ({r.get('id', '?')}) has no 'image'")
        out.append(Example(str(r.get("id", r.get("question_id", i))), resolve_image(image_root, r["image"]),
                           question, answer, r.get("references"), source=where, later=later))
    return out


def resolve_image(root, rel):
    """Images live under ROOT/datasets/ in the release; ROOT/ itself is accepted too. A missing image keeps its
    release path: check_images reports every missing and unreadable image at once, with its record."""
    release, flat = os.path.join(root, "datasets", rel), os.path.join(root, rel)
    return flat if not os.path.isfile(release) and os.path.isfile(flat) else release


def read_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


def image_problem(path):
    """None if read_image can read the file, else what is wrong with it. The pixels are decoded (im.load()), not
    only the header: a truncated PNG or JPEG has an intact header and fails only when decoded."""
    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return "is missing"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:   # what PIL raises on a bad file
        return f"is unreadable ({e})"
    return None


def check_images(data, *, workers=8, show=20):
    """Every image the run will read (train and test of every task in data = {task: TaskData}) opened once, in
    threads (PIL decodes without the GIL), before training; one error lists every missing or unreadable image with
    the record that names it. Measured on 2 busy cores, 8 threads: 10 s for task-hom's 33,600 PNGs, 13-16 s
    for cap-hom's 50,400 (a run takes 3 to 17 minutes); one thread is ~1.3x slower."""
    records = {}                                                   # image -> the examples that name it
    for td in data.values():
        for e in td.train + sum(td.test.values(), []):
            records.setdefault(e.image, []).append(e)
    with ThreadPoolExecutor(workers) as pool:
        bad = [(p, why) for p, why in zip(records, pool.map(image_problem, records)) if why]
    if bad:
        lines = [f"  {records[p][0].source}: image {p} {why}"
                 + (f" (and {len(records[p]) - 1} more records)" if len(records[p]) > 1 else "") for p, why in bad]
        more = [f"  ... and {len(bad) - show} more"] if len(bad) > show else []
        kind = FileNotFoundError if all(why == "is missing" for _, why in bad) else ValueError
        raise kind(f"{len(bad)} of {len(records)} images the run reads are missing or unreadable; fix or replace "
                   f"them (see README, 'Data format'):\n" + "\n".join(lines[:show] + more))


def attach_references(examples, records, path):
    """Captions of each test image from a COCO-format file (images [{file_name, id}], annotations [{image_id,
    caption}]), matched by file name (the record's image path or its basename); when the names do not match, by
    position, image_id = index + 1, which is what the official eval assumes (it numbers its answers 1, 2, ...)."""
    coco = read_json(path)
    try:
        ids = {}                                                   # file name or basename -> image id
        for im in coco["images"]:
            ids[im["file_name"]] = im["id"]
            ids.setdefault(os.path.basename(im["file_name"]), im["id"])
        captions = {}                                              # image id -> its captions
        for a in coco["annotations"]:
            captions.setdefault(a["image_id"], []).append(a["caption"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a COCO caption file {{'images': [{{file_name, id}}], 'annotations': "
                         f"[{{image_id, caption}}]}} (missing {e})") from None
    by_name = [ids.get(r["image"], ids.get(os.path.basename(r["image"]))) for r in records]
    matched = by_name if all(i in captions for i in by_name) else list(range(1, len(records) + 1))
    for i, (e, image_id) in enumerate(zip(examples, matched)):
        if image_id not in captions:
            raise ValueError(f"{path}: no captions for test record {i} ('{records[i]['image']}'), neither by file "
                             f"name nor by position (image_id {i + 1}); {HOW_TO}")
        e.references = captions[image_id]


def load_dataset(root, dataset, split, *, limit=None):
    path = split_file(root, dataset, split)
    records = head(read_json(path), limit)
    examples = parse_records(records, path, os.path.abspath(root))
    if split == "test" and needs_refs(root, dataset, path):
        attach_references(examples, records, release_path(root, dataset, "refs"))
    return examples


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
    client_tasks: list          # per stage, the task index of the i-th client of a round (Hom: one entry = all)
    heterogeneous: bool = False

    @property
    def num_stages(self):
        return len(self.client_tasks)

    def stage_tasks(self, t):
        """Tasks trained in stage t, in order of first appearance."""
        return list(dict.fromkeys(self.tasks[i] for i in self.client_tasks[t]))

    def seen_tasks(self, t):
        """Tasks evaluated after stage t: all trained in stages 0..t, in the setting's order."""
        seen = {self.tasks[i] for s in self.client_tasks[:t + 1] for i in s}
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


def check_files(root, setting, client_files=()):
    """Every file the setting needs, checked before anything is read: one error lists all that are missing.
    Train files are not needed when the clients' files are pre-made."""
    missing = []
    for d in dict.fromkeys(d for task in setting.tasks for d in setting.datasets[task]):
        for split in ("test",) if client_files else ("train", "test"):
            path = split_path(root, d, split)
            if path is None:
                missing.append(release_path(root, d, split) or os.path.join(root, "instructions", d, f"{split}*.json"))
            elif split == "test" and needs_refs(root, d, path) and not os.path.isfile(release_path(root, d, "refs")):
                missing.append(release_path(root, d, "refs"))
    missing += [p for p in client_files if not os.path.isfile(p)]
    if missing:
        names = ", ".join(os.path.relpath(p, root) for p in missing)
        raise FileNotFoundError(f"missing {len(missing)} file{'s' * (len(missing) > 1)} under {root}: {names} "
                                f"(looked for the official release's names, data.RELEASE); {HOW_TO}")


def load_tests(root, datasets, limit):
    return {d: load_dataset(root, d, "test", limit=limit) for d in datasets}


def load_setting(root, setting: Setting, *, rng, train_limit=None, test_limit=None):
    """TaskData per task; a capability group's training data is the shuffled union of its datasets (1.2)."""
    check_files(root, setting)
    out = {}
    for task in setting.tasks:
        train = [e for d in setting.datasets[task] for e in load_dataset(root, d, "train", limit=train_limit)]
        train = [train[i] for i in rng.permutation(len(train))]
        out[task] = TaskData(task, train, load_tests(root, setting.datasets[task], test_limit))
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


def partition_lists(parts):
    """{task: [[example indices] per client]}: the partition as partition.json holds it."""
    return {t: [p.tolist() for p in ps] for t, ps in parts.items()}


def save_partition(path, parts):
    write_json(path, partition_lists(parts), indent=None)              # atomic: a crash leaves no half file
