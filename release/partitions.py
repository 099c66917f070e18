"""The official FCIT release's own client partitions: ROOT/partitioned_data/<kind>/<beta>/Task<t>/client_<k>.json.

When the release ships a partition for the run's beta, its clients replace our Dirichlet partition (data.py), so
that results compare with the paper's: the same clients hold the same records. The stage order follows the release's
Task folders, each folder's task read from its records' image folders (the official sources disagree on the
capability-related order). Without such a folder the run reads the release with data.load_setting.
    ROOT/partitioned_data/Task-related/seq/<beta>/Task<1..8>/client_<k>.json        <beta> = str(float(beta))
    ROOT/partitioned_data/Capability-related/cap/<beta>/Task<1..4>/client_<k>.json

    setting = release_setting("/data/FCIT", SETTINGS["cap-hom"], beta=1.0)        # in the release's stage order
    data, parts = load_release("/data/FCIT", setting, beta=1.0, num_clients=50, rng=np.random.default_rng(0))
    # parts is None when no pre-made partition exists: parts = data.partition_setting(data, 50, ...)
Tests: python -m pytest tests/test_release.py
"""
import os
from dataclasses import replace

import numpy as np

from data import (HOW_TO, RELEASE, Setting, TaskData, check_files, head, load_setting, load_tests, parse_records,
                  read_json)


def partition_dir(root, setting, beta):
    """Hom and Het read the same folders (the official code strips '-dyn' from the setting's name)."""
    kind = ("Capability-related", "cap") if setting.name.startswith("cap") else ("Task-related", "seq")
    return os.path.join(root, "partitioned_data", *kind, str(float(beta)))


def client_file(folder, t, k):
    return os.path.join(folder, f"Task{t}", f"client_{k}.json")


def image_folder(rel):
    return os.path.normpath(rel).replace("\\", "/").lstrip("/").split("/")[0]


def identify_task(records, setting, where):
    """The task a Task<t> folder holds, from its records' image folders. Content, not the folder number, decides:
    the official sources disagree on the capability-related stage order (eval scripts vs process_data.py); the
    task-related folders follow TASK_ORDER, and reading their content too keeps one code path for both."""
    owner = {}                                                     # image folder -> task
    for task in setting.tasks:
        for d in setting.datasets[task]:
            owner[RELEASE[d].images.lower()] = owner[d.lower()] = task
    folders = sorted({image_folder(r["image"]) for r in records})
    tasks = {owner[f.lower()] for f in folders if f.lower() in owner}          # case as written may vary
    if len(tasks) != 1:
        known = "; ".join(f"{t}: {', '.join(dict.fromkeys(RELEASE[d].images for d in setting.datasets[t]))}"
                          for t in setting.tasks)
        raise ValueError(f"{where}: cannot tell which task it holds from its image folders {folders}; each Task "
                         f"folder must hold the images of one task ({known}); {HOW_TO}")
    return tasks.pop()


def load_partitions(root, setting, folder, num_clients, train_limit):
    """TaskData.train of a task = its clients' records concatenated; parts[task][c] = client c's slice of it."""
    train, parts, seen = {}, {}, {}
    for t in range(1, setting.num_stages + 1):
        paths = [client_file(folder, t, k) for k in range(num_clients)]
        records = [head(read_json(p), train_limit) for p in paths]
        clients = [parse_records(r, p, os.path.abspath(root)) for r, p in zip(records, paths)]
        task = identify_task([r for rs in records for r in rs], setting, os.path.join(folder, f"Task{t}"))
        if task in seen:
            raise ValueError(f"{folder}: Task{seen[task]} and Task{t} both hold {task}; {HOW_TO}")
        seen[task] = t
        sizes = [len(c) for c in clients]
        parts[task] = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])      # C arrays of client indices
        train[task] = [e for c in clients for e in c]
    return train, parts


def release_setting(root, setting: Setting, *, beta) -> Setting:
    """The setting in the stage order of the release's Task<t> folders when it ships a partition for this beta (each
    folder's task read from its content, as load_partitions does), else unchanged. The Het table keeps its rows of
    task indices, now into that order, as the official code's tables index its Task folders: under the official
    capability order (General, Other, Math, Chart) rows 2-4 of cap-het swap Chart and Other."""
    folder = partition_dir(root, setting, beta)
    if not os.path.isdir(folder):
        return setting
    check_files(root, setting, [client_file(folder, t, 0) for t in range(1, setting.num_stages + 1)])
    order = []
    for t in range(1, setting.num_stages + 1):
        records, k = [], 0
        while not records and os.path.exists(client_file(folder, t, k)):    # the first client that holds records
            records, k = read_json(client_file(folder, t, k)), k + 1
        order.append(identify_task(records, setting, os.path.join(folder, f"Task{t}")))
    if sorted(order) != sorted(setting.tasks):
        raise ValueError(f"{folder}: its Task folders hold {order}, not each of {setting.tasks} once; {HOW_TO}")
    return setting if order == setting.tasks else replace(setting, tasks=order)


def load_release(root, setting: Setting, *, beta, num_clients, rng, train_limit=None, test_limit=None):
    """(data, parts): TaskData per task, and the release's pre-made partition for this beta (the first num_clients
    client files of each Task folder), or parts = None when it has none: use partition_setting then.
    train_limit: first N records of each train file (each client file when pre-made); test_limit: of each test file."""
    folder = partition_dir(root, setting, beta)
    if not os.path.isdir(folder):
        return load_setting(root, setting, rng=rng, train_limit=train_limit, test_limit=test_limit), None
    if num_clients < 1:
        raise ValueError(f"--clients must be >= 1, got {num_clients}")
    check_files(root, setting, [client_file(folder, t, k) for t in range(1, setting.num_stages + 1)
                                for k in range(num_clients)])
    train, parts = load_partitions(root, setting, folder, num_clients, train_limit)
    data = {task: TaskData(task, train[task], load_tests(root, setting.datasets[task], test_limit))
            for task in setting.tasks}
    return data, {task: parts[task] for task in setting.tasks}
