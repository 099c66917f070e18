"""Metrics for FCIT (arXiv:2503.12897): the one place that turns predictions into scores and results into the
accuracy matrix, Last / Avg / forgetting, with the formulas written down.

Three sections (the heatmaps of the matrices are drawn in storage/results.py):
  1. answer rules, per sample: exact match, substring (FigureQA, DVQA), Acc@IoU>0.5 (Grounding), and CIDEr-D
     (Flickr30k; Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation", as implemented
     in coco-caption / pycocoevalcap `cider_scorer.py`), and the embedded benchmark's caption-relative (CIDEr-D
     over the first reference's own CIDEr-D); `task_score` maps a task's predictions to 0-100.
  2. continual metrics over a[t][j] = score on task j after stage t (the paper's experimental setup; notes 1.4):
     Last, Avg, forgetting, backward transfer.
  3. the evaluation after a stage: every test question of every seen task, each answered under the gate its own
     question gets (DISCO's SSA, or none), scored with its dataset's rule (`evaluate_tasks`), generating at most
     the task's answer length (`answer_lengths`).

    task_score("exact", ["Cat "], ["cat"])                      # 100.0
    summarize([{"a": 80.0}, {"a": 60.0, "b": 90.0}])            # last 75.0, avg 77.5, forgetting {"a": 20.0}

Tests: python -m pytest tests/test_metrics.py
"""
import functools
import math
import re
import time
from collections import Counter

import numpy as np
import torch

# ---- 1. Answer rules --------------------------------------------------------------------------------------
# Source for exact / substring / IoU: the official FCIT eval scripts (notes 1.1). All compare after strip().
# [ours] an empty prediction never counts as correct, whatever the rule.


def normalize(text: str) -> str:
    # the official rules compare after strip(); nothing else (no article or punctuation removal)
    return text.strip()


def exact_match(pred: str, answer: str) -> float:
    # official rule: pred.strip().upper() == answer.strip().upper()
    p = normalize(pred)
    return float(bool(p) and p.upper() == normalize(answer).upper())


def substring_match(pred: str, answer: str) -> float:
    # official FigureQA / DVQA rule: the prediction is contained in the answer, case-insensitive, after strip().
    # Officially "" is contained in every answer and so scores 1: a bug we do not copy (empty -> 0).
    p = normalize(pred).upper()
    return float(bool(p) and p in normalize(answer).upper())


_NUMBER = re.compile(r"-?\d*\.?\d+")


def parse_box(text: str) -> list[float] | None:
    # Grounding answers are "[x1, y1, x2, y2]" normalised to [0, 1]; a model may drop the brackets or add words,
    # so take the first 4 numbers in the text, and None when there are fewer.
    nums = _NUMBER.findall(text)
    return [float(x) for x in nums[:4]] if len(nums) >= 4 else None


def box_iou(a, b) -> float:
    # IoU = |a ^ b| / |a v b| for boxes [x1, y1, x2, y2]; a degenerate box (x2 <= x1 or y2 <= y1) has no area -> 0
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_match(pred: str, answer: str, threshold: float = 0.5) -> float:
    # Acc@IoU>0.5 (Grounding, RefCOCO convention): strictly greater, so IoU exactly 0.5 is a miss
    p, a = parse_box(pred), parse_box(answer)
    if p is None or a is None:
        return 0.0
    return float(box_iou(p, a) > threshold)


# coco-caption lower-cases every caption, runs Stanford CoreNLP 3.4.1's PTBTokenizer on it and drops the tokens in
# its PUNCTUATIONS list. By hand, the PTB rules that occur in captions (tests/test_metrics.py holds a table of
# CoreNLP's own recorded outputs): clitics and n't split off ("man's" -> man 's, "can't" -> ca n't), "gonna" ->
# gon na, quotes to `` and '', "(" [ { to -LRB- -LSB- -LCB-, dash runs to --, "..." one token, a period split off
# a word's end unless the word is an acronym (u.s.), commas and colons split unless inside a number (1,000 4:45),
# % and $ split from numbers, hyphenated words kept whole (t-shirt). coco's list names the escaped brackets only in
# upper case, so after -lowerCase "-lrb-" and the others stay in the caption as tokens; kept here too.
PTB_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta", "gimme": "gim me",
                "lemme": "lem me", "can't": "ca n't", "won't": "wo n't"}
_CLITIC = re.compile(r"^(.*[a-z0-9])('s|'m|'d|'re|'ve|'ll|n't)$")


def ptb_tokenize(text: str) -> list[str]:
    """coco-caption's tokens of a caption: PTB tokenization of the lower-cased text, punctuation tokens dropped."""
    t = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    t = re.sub(r'["\u201c\u201d]|``|\'\'', " `` ", t)                        # double quotes (dropped)
    t = re.sub(r"[()\[\]{}]", lambda m: f" {_BRACKETS[m.group()]} ", t)
    t = re.sub(r"\.\.\.+|\u2026", " ... ", t)
    t = re.sub(r"--+|\u2014|\u2013", " -- ", t)
    t = re.sub(r"(?<!\d)([,:])|([,:])(?!\d)", lambda m: f" {m.group()} ", t)    # not inside 1,000 or 4:45
    t = re.sub(r";", " ; ", t)
    t = re.sub(r"[?!]+", lambda m: f" {m.group()} ", t)
    t = re.sub(r"(\d)%", r"\1 %", t)
    t = re.sub(r"\$(?=\d)", "$ ", t)
    tokens = []
    for tok in t.split():
        tail = []
        if len(tok) > 1 and tok.endswith(".") and not re.fullmatch(r"(?:[a-z]\.)+|\.+", tok):
            tok, tail = tok[:-1], ["."]                                        # a sentence's period, not u.s.
        if len(tok) > 1 and (tok[0] == "`" or tok[0] == "'" and not _CLITIC.match("x" + tok)):
            tokens.append("`")                                                 # an opening single quote
            tok = tok[1:]
        if len(tok) > 1 and tok.endswith("'"):
            tok, tail = tok[:-1], ["'", *tail]                                 # dogs' -> dogs '
        if tok in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[tok].split())
        elif m := _CLITIC.match(tok):
            tokens.extend(m.groups())
        else:
            tokens.append(tok)
        tokens.extend(tail)
    return [w for w in tokens if w not in PTB_DROPPED]


@functools.lru_cache(maxsize=1 << 16)
def _ngram_counts(text: str, n: int) -> tuple[Counter, int]:
    """(n-gram counts, length) of a caption's PTB tokens; cached: the same references come back in every call that
    scores a task (scripts.validity scores 100 constant answers against one test set). Callers only read them."""
    tokens = ptb_tokenize(text)
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1)), len(tokens)


def cider_d(candidates: list[str], references: list[list[str]], *, n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each candidate against its image's references, with document frequency over the corpus.

    g_k(s) = tf_k(s) * log(N / max(1, df_k))   tf-idf of n-gram k; N images, df_k = #images whose refs hold k
    sim_n(c, r) = sum_k min(g_k(c), g_k(r)) g_k(r) / (|g^n(c)| |g^n(r)|) * exp(-(l_c - l_r)^2 / (2 sigma^2))
    CIDEr-D(c, R) = 10 / (n |R|) * sum_{n'=1..n} sum_{r in R} sim_n'(c, r)
    """
    if len(candidates) != len(references):
        raise ValueError(f"cider_d: {len(candidates)} candidates but {len(references)} reference sets")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("cider_d: every candidate needs at least one reference caption")
    cand = [_ngram_counts(t, n) for t in candidates]
    refs = [[_ngram_counts(t, n) for t in rs] for rs in references]
    # df counts each image's reference set once per n-gram, not each reference
    df = Counter(g for rs in refs for g in set().union(*(c.keys() for c, _ in rs)))
    # coco: log(float(len(crefs))) - log(max(1., df)); max(1, N) only guards log(0)
    log_n = math.log(max(1, len(refs)))

    def tfidf(counts: Counter) -> tuple[dict, list[float]]:
        vec = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in counts.items()}
        norms = [0.0] * n
        for g, w in vec.items():
            norms[len(g) - 1] += w * w
        return vec, [math.sqrt(x) for x in norms]

    scores = []
    for (c_counts, c_len), rs in zip(cand, refs):
        vc, nc = tfidf(c_counts)
        total = 0.0
        for r_counts, r_len in rs:
            vr, nr = tfidf(r_counts)
            val = [0.0] * n
            # the "-D" clipping: a candidate gains nothing from repeating an n-gram more often than the reference
            for g, w in vc.items():
                val[len(g) - 1] += min(w, vr.get(g, 0.0)) * vr.get(g, 0.0)
            # coco measures length in bigrams (len - 1), which gives the same difference for non-empty captions
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * sigma**2))
            total += sum(v / (nc[k] * nr[k]) * penalty for k, v in enumerate(val) if nc[k] > 0 and nr[k] > 0)
        scores.append(10.0 * total / (n * len(rs)))
    return scores


METRICS = {"exact": exact_match, "substring": substring_match, "iou": iou_match}  # per-sample rules
CAPTIONS = ("caption", "caption-relative")                                          # rules over a task's captions
RULES = (*METRICS, *CAPTIONS)


def task_score(metric: str, predictions: list[str], answers: list) -> float:
    """One task's score in percent: [0, 100], except the uncapped CIDEr-D of "caption". answers[i] is a string
    or a list (for per-sample rules the first element is the answer; for the caption rules the reference set)."""
    if metric not in RULES:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(RULES)}")
    if not predictions or len(predictions) != len(answers):
        raise ValueError(f"task_score: need equally many predictions and answers, got "
                         f"{len(predictions)} and {len(answers)}")
    if metric in CAPTIONS:
        refs = [[a] if isinstance(a, str) else list(a) for a in answers]
        scores = np.array(cider_d(predictions, refs))
        if metric == "caption":
            # CIDEr-D x 100, uncapped as the paper's tables report it (x10 inside, typically 0.3-1.5 -> 30-150)
            return float(scores.mean()) * 100.0
        # caption-relative (the embedded benchmark, whose references are templated): per image,
        # s_i = min(1, CIDEr-D(c_i, R_i) / CIDEr-D(R_i[0], R_i)), the caption against the first reference's own score
        ceiling = np.array(cider_d([r[0] for r in refs], refs))
        return float(np.mean(np.minimum(1.0, scores / np.maximum(ceiling, 1e-9)))) * 100.0
    rule = METRICS[metric]
    hits = [rule(p, a if isinstance(a, str) else a[0]) for p, a in zip(predictions, answers)]
    return float(np.mean(hits)) * 100.0


# ---- 2. Continual metrics ---------------------------------------------------------------------------------
# acc[t] = {task j: a[t][j]} for stages t = 0..F (F = T - 1, the final stage), S_t = acc[t].keys() = the tasks
# seen by stage t; shapes: T stages, J tasks. In Het settings a task may first appear at any stage and then
# recurs; S_t only grows.


def _check(acc: list[dict[str, float]]) -> None:
    if not acc:
        raise ValueError("acc is empty: pass one dict {task: score} per stage")
    seen: set[str] = set()
    for t, scores in enumerate(acc):
        if not scores:
            raise ValueError(f"acc[{t}] is empty: every stage evaluates at least its own task")
        missing = seen - scores.keys()
        if missing:
            raise ValueError(f"acc[{t}] has no score for {sorted(missing)}, seen at an earlier stage; "
                             f"evaluate every task seen so far after each stage")
        seen |= scores.keys()


def _first_stage(acc: list[dict[str, float]]) -> dict[str, int]:
    first: dict[str, int] = {}
    for t, scores in enumerate(acc):
        for j in scores:
            first.setdefault(j, t)
    return first


def last(acc: list[dict[str, float]]) -> float:
    # Last = mean_{j in S_F} a[F][j]
    _check(acc)
    return float(np.mean(list(acc[-1].values())))


def average(acc: list[dict[str, float]]) -> float:
    # Avg = (1/T) sum_{t=0..F} mean_{j in S_t} a[t][j]
    _check(acc)
    return float(np.mean([np.mean(list(scores.values())) for scores in acc]))


def forgetting(acc: list[dict[str, float]]) -> dict[str, float]:
    # f_j = max_{t < F, j in S_t} a[t][j] - a[F][j], for j seen before the final stage (may be < 0: it improved)
    _check(acc)
    return {j: max(scores[j] for scores in acc[:-1] if j in scores) - acc[-1][j]
            for j in acc[-1] if any(j in scores for scores in acc[:-1])}


def backward_transfer(acc: list[dict[str, float]]) -> float:
    # BWT = mean_{j : first(j) < F} (a[F][j] - a[first(j)][j]), first(j) = the stage j was first evaluated at
    _check(acc)
    first = _first_stage(acc)
    final = len(acc) - 1
    deltas = [acc[-1][j] - acc[t][j] for j, t in first.items() if t < final]
    return float(np.mean(deltas)) if deltas else 0.0


def summarize(acc: list[dict[str, float]]) -> dict:
    f = forgetting(acc)
    return {"last": round(last(acc), 2), "avg": round(average(acc), 2),
            "forgetting": {j: round(v, 2) for j, v in f.items()},
            "mean_forgetting": round(float(np.mean(list(f.values()))), 2) if f else 0.0,
            "bwt": round(backward_transfer(acc), 2)}


def accuracy_matrix(acc: list[dict[str, float]], tasks: list[str]) -> np.ndarray:
    # (T, len(tasks)): row t = a[t][.], nan where the task is not yet seen (or not in acc at all)
    _check(acc)
    return np.array([[scores.get(j, np.nan) for j in tasks] for scores in acc], dtype=float)  # (T, J)


# ---- 3. Evaluation after a stage ----------------------------------------------------------------------------
# answer(examples, gate) -> predictions is the model's greedy decoding under `gate` (train.py binds it on the LoRA
# layers); gate_of(examples) -> (B, K) or None is the method's gate (fcit.DiscoStrategy.eval_gate: SSA, per question).


def answer_lengths(data, tokenizer, cap):
    """{id(test example): max new tokens}: room for 1.5 times the longest training answer of its task, plus 4, and
    at most `cap` (cfg.fed.max_new_tokens). Every answer the training data teaches fits; a row that rambles on a
    one-word task stops after a few tokens instead of `cap` (on the real path: 5-10 instead of 128)."""
    lengths = {}
    for td in data.values():
        answers = [e.answer for e in td.train]
        longest = max(map(len, tokenizer(answers, add_special_tokens=False)["input_ids"])) if answers else cap
        lengths.update({id(e): min(cap, math.ceil(1.5 * longest) + 4) for ex in td.test.values() for e in ex})
    return lengths


@torch.no_grad()
def evaluate_dataset(answer, gate_of, metric: str, examples, *, batch: int):
    """(score in percent with `metric`, the mean gate the questions put on each subspace or None, predictions)."""
    preds, gates = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        gate = gate_of(chunk)  # (B, K) or None
        preds += answer(chunk, gate)
        if gate is not None:
            gates.append(gate)
    mean_gate = torch.cat(gates).mean(0).tolist() if gates else None
    return task_score(metric, preds, [e.references or e.answer for e in examples]), mean_gate, preds


def evaluate_tasks(answer, gate_of, data, tasks, *, rules: dict, batch: int, log=None):
    """{task: score} (a task's score is the mean over its datasets), {dataset: score}, {task: mean gate}, for the
    test sets data[task].test = {dataset: examples}; rules = {dataset: metric} (data.METRIC). `log`, when given,
    gets one progress line per task."""
    task_scores, dataset_scores, task_gates = {}, {}, {}
    for n, task in enumerate(tasks):
        t0, scores, gates = time.time(), [], []
        for dataset, examples in data[task].test.items():
            s, g, _ = evaluate_dataset(answer, gate_of, rules.get(dataset, "exact"), examples, batch=batch)
            dataset_scores[dataset] = round(s, 2)
            scores.append(s)
            if g is not None:
                gates.append(g)
        task_scores[task] = round(float(np.mean(scores)), 2)
        if gates:
            task_gates[task] = np.mean(gates, axis=0).round(4).tolist()
        if log:
            questions = sum(len(e) for e in data[task].test.values())
            log(f"  evaluated {n + 1}/{len(tasks)} {task}: {task_scores[task]:.1f} "
                f"({questions} questions, {time.time() - t0:.1f}s)")
    return task_scores, dataset_scores, task_gates
