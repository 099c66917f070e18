"""A tiny FCIT release in the EXACT official layout (fact sheet of the official code; README of Ghy0501/FCIT), for
tests of the loader: the real instruction folders and file names of the 12 datasets, PNG images under the real
image folders, question-record test files, the Flickr30k COCO references, and pre-made client partitions.
The names are written out here, not read from data.py, so the tests check data.RELEASE against them.

    from release_fixture import write_release_fixture; write_release_fixture("/tmp/fcit", num_clients=3)
"""
import json
import os

from PIL import Image

# dataset -> (instruction folder, train file, test file, train image dir, test image dir), as released
OFFICIAL = {"ImageNet-R": ("ImageNet-R", "train.json", "test.json", "ImageNet-R/train", "ImageNet-R/test"),
            "ArxivQA": ("ArxivQA", "train_4w.json", "test_1w.json", "ArxivQA/images", "ArxivQA/images"),
            "IconQA": ("IconQA", "train.json", "val.json", "IconQA/iconqa_data/iconqa/train",
                       "IconQA/iconqa_data/iconqa/val"),
            "CLEVR-Math": ("CLEVR-Math", "train_4w.json", "test_1w.json", "CLEVR/images/train", "CLEVR/images/test"),
            "OCR-VQA": ("OCRVQA", "train_10w.json", "test_1w.json", "OCR-VQA/images", "OCR-VQA/images"),
            "Flickr30k": ("Flickr30k-cap", "train_brief_4w.json", "val_brief.json", "Flickr30k/train", "Flickr30k/val"),
            "FigureQA": ("FigureQA", "train.json", "test.json", "FigureQA/images", "FigureQA/images"),
            "super-CLEVR": ("super-CLEVR", "train.json", "test.json", "super-CLEVR/images", "super-CLEVR/images"),
            "AOKVQA": ("AOKVQA", "train.json", "val.json", "COCO2014/train2014", "COCO2014/val2014"),
            "Grounding": ("Grounding", "train_11w.json", "test_6000.json", "COCO2014/train2014", "COCO2014/val2014"),
            "DVQA": ("DVQA", "train.json", "test.json", "DVQA/images", "DVQA/images"),
            "TabMWP": ("TabMWP", "train.json", "test.json", "TabMWP/tables", "TabMWP/tables")}
FLICKR_REFS = "instructions/Flickr30k-cap/val_coco_type.json"
CONVERSATION_TESTS = {"IconQA", "Flickr30k"}     # test files written as multi-turn conversations, the rest as questions
TASK_ORDER = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR"]
GROUPS = {"General": ["AOKVQA", "IconQA", "Grounding", "ImageNet-R"], "Chart": ["ArxivQA", "FigureQA", "DVQA"],
          "Math": ["CLEVR-Math", "super-CLEVR", "TabMWP"], "Other": ["Flickr30k", "OCR-VQA"]}
CAP_ORDER = ["Other", "Math", "General", "Chart"]  # shuffled on purpose: the loader must read the groups from content


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def image(root, rel, k):
    path = os.path.join(root, "datasets", rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (k * 7 % 256, 0, 0)).save(path)
    return rel


def train_record(dataset, file, rel, i):
    return {"id": f"{file}#{i}", "image": rel,
            "conversations": [{"from": "human", "value": f"<image>\n{dataset} question {i}"},
                              {"from": "gpt", "value": f"{dataset} answer {i}"}]}


def eval_record(dataset, file, rel, i):
    qid, question, answer = f"{file}#{i}", f"{dataset} test question {i}", f"{dataset} test answer {i}"
    if dataset in CONVERSATION_TESTS:        # multi-turn: only the first human and the first gpt turn count
        return {"id": qid, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer},
            {"from": "human", "value": "and then ?"}, {"from": "gpt", "value": "a later turn"}]}
    if dataset == "Grounding":               # the official grounding eval reads answer_bbox and size
        return {"question_id": qid, "image": rel, "text": question, "answer_bbox": f"[0.1, 0.2, 0.{i + 3}, 0.9]",
                "size": [4, 4]}
    return {"question_id": qid, "image": rel, "text": question, "answer": answer}


def flickr_refs(rels, by):
    """COCO captions of the test images. by='name' or 'path': basenames or full image paths, with ids reversed so
    that matching by position would attach the wrong captions; by='position': names that match nothing and
    image_id = index + 1 (what the official eval assumes)."""
    n = len(rels)
    names = {"name": [os.path.basename(r) for r in rels], "path": list(rels),
             "position": [f"unmatched_{i}.jpg" for i in range(n)]}[by]
    images = [{"file_name": name, "id": i + 1 if by == "position" else n - i} for i, name in enumerate(names)]
    annotations = [{"image_id": im["id"], "id": 10 * i + c, "caption": f"caption {c} of image {i}"}
                   for i, im in enumerate(images) for c in range(3)]
    return {"images": images[::-1], "annotations": annotations}


def split_clients(records, num_clients):
    """Contiguous, unequal shares (client k gets about k+1 parts), so an index off by one shows."""
    weights = [k + 1 for k in range(num_clients)]
    cuts = [round(len(records) * sum(weights[:k]) / sum(weights)) for k in range(num_clients + 1)]
    return [records[cuts[k]:cuts[k + 1]] for k in range(num_clients)]


def interleave(lists):
    return [x for row in zip(*lists) for x in row]


def write_release_fixture(root, *, num_clients=3, per_file=4, beta=1.0, refs_by="name", cap_order=CAP_ORDER,
                          partitions=True):
    """Write the fixture under root and return {dataset: its train records}; the client files split exactly these.
    refs_by: how the Flickr30k references match the test images ('name', 'path', 'position'); cap_order: the
    capability group of each Capability-related Task<t> folder; partitions=False writes no partitioned_data/."""
    root = str(root)
    train = {}
    for k, (dataset, (folder, train_file, test_file, train_dir, test_dir)) in enumerate(OFFICIAL.items()):
        stem = dataset.lower().replace("-", "_")
        train[dataset] = [train_record(dataset, f"{folder}/{train_file}",
                                       image(root, f"{train_dir}/{stem}_{i}.png", k), i) for i in range(per_file)]
        tests = [eval_record(dataset, f"{folder}/{test_file}", image(root, f"{test_dir}/{stem}_{i}.png", k), i)
                 for i in range(per_file)]
        write_json(os.path.join(root, "instructions", folder, train_file), train[dataset])
        write_json(os.path.join(root, "instructions", folder, test_file), tests)
        if dataset == "Flickr30k":
            write_json(os.path.join(root, FLICKR_REFS), flickr_refs([r["image"] for r in tests], refs_by))
    if partitions:
        seq = os.path.join(root, "partitioned_data", "Task-related", "seq", str(float(beta)))
        for t, dataset in enumerate(TASK_ORDER, 1):
            for c, share in enumerate(split_clients(train[dataset], num_clients)):
                write_json(os.path.join(seq, f"Task{t}", f"client_{c}.json"), share)
        cap = os.path.join(root, "partitioned_data", "Capability-related", "cap", str(float(beta)))
        for t, group in enumerate(cap_order, 1):
            mixed = interleave([train[d] for d in GROUPS[group]])     # every client sees several datasets
            for c, share in enumerate(split_clients(mixed, num_clients)):
                write_json(os.path.join(cap, f"Task{t}", f"client_{c}.json"), share)
    return train
