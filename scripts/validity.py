"""Is the benchmark valid? Per dataset: does the test set hold copies of training examples, can a constant answer or
a wrong answer score, and what does the untrained base score. A benchmark whose test examples are training
examples measures recall; one whose metric a constant answer maxes out measures nothing (issue 11).

    python -m scripts.validity                       # the embedded benchmark (the cache train.py uses) and base
    python -m scripts.validity --data ROOT --model DIR --limit 500   # a release and a base of your own
    python -m scripts.validity --no-base             # the data's figures only (no model is loaded)

Columns, per dataset, all on its test set with its scoring rule (data.rules: the official rules, and the release's
rules.json):
  overlap   test records whose (image pixels, question) equals a training record's (must be 0)
  chance    the score of a random answer: each test record scored with the answer of another test record
            (20 seeded permutations; a caption record with another record's first reference)
  wrong     each record scored with a test answer that differs from its own (a wrong answer of the answer form)
  constant  the best constant answer over candidates (every distinct test answer and, for the substring rule, every
            substring of one) and its score
  base      the untrained base's greedy answers (zero-shot)
Flickr30k also gets its own answer with the color or the thing swapped (a caption with one attribute wrong).

    python -m scripts.validity --transfer ArxivQA CLEVR-Math   # can the skill be learned, does it transfer?

--transfer trains Finetune's LoRA on one dataset's training records for one local epoch (a stage's budget) and
scores the training records, fresh draws with training looks (embedded benchmark only; a release drawn with
another seed) and the test set: a gap between the last two is what the held-out looks cost, a low score everywhere
is a skill the base cannot learn at this budget.
Tests: python -m pytest -q tests/test_validity.py
"""
import argparse

import numpy as np

import metrics
import train
from data import METRIC, load_dataset, read_image, rules
from embedded import benchmark
from model import generate, load_llava


def key(example):
    """(image pixels, question) as one hash; the question without LLaVA's "<image>\\n"."""
    return benchmark.key(read_image(example.image), example.question.replace("<image>\n", ""))


def truth(e):
    return e.references or e.answer


def score(rule, predictions, examples):
    return metrics.task_score(rule, predictions, [truth(e) for e in examples])


def first(answer):
    return answer[0] if isinstance(answer, list) else answer


def chance(rule, examples, rng, n=20):
    # E over permutations pi of score(answers[pi(i)], record i): the answer of a random other record
    answers = [first(truth(e)) for e in examples]
    return float(np.mean([score(rule, [answers[j] for j in rng.permutation(len(examples))], examples)
                          for _ in range(n)]))


def wrong(rule, examples, rng):
    # each record gets a test answer unlike its own (sampled among those; none when every answer is the same)
    answers = [first(truth(e)) for e in examples]
    preds = []
    for a in answers:
        others = [b for b in dict.fromkeys(answers) if b != a]
        preds.append(others[int(rng.integers(len(others)))] if others else a)
    return score(rule, preds, examples)


def best_constant(rule, examples):
    answers = list(dict.fromkeys(first(truth(e)) for e in examples))
    candidates = set(answers)
    if rule == "substring":                          # a piece of an answer is contained in every answer holding it
        candidates |= {a[i:j] for a in answers for i in range(len(a)) for j in range(i + 1, len(a) + 1)}
    scored = [(score(rule, [c] * len(examples), examples), c) for c in sorted(candidates)]
    return max(scored)


def swapped(caption, words):
    """The caption with its first word of `words` replaced by the next one (one attribute wrong)."""
    tokens = caption.split()
    i = next(i for i, t in enumerate(tokens) if t in words)
    tokens[i] = words[(words.index(tokens[i]) + 1) % len(words)]
    return " ".join(tokens)


def base_scores(model_dir, system, tests, scoring, log):
    model, processor = load_llava(model_dir)
    out = {}
    for name, examples in tests.items():
        preds = []
        for i in range(0, len(examples), 100):
            chunk = examples[i:i + 100]
            preds += generate(model, processor, train.images_of(chunk, processor), [e.question for e in chunk],
                              system=system)
        out[name] = score(scoring[name], preds, examples)
        log(f"  base on {name}: {out[name]:.1f} (e.g. {preds[0]!r})")
    return out


def transfer(cfg, root, base, names, scoring, log):
    """{dataset: {"train": s, "fresh": s, "test": s}} after one epoch of one-task LoRA training from the base."""
    fresh = root + "-fresh-seed7"
    if cfg.data is None:
        benchmark.write_release(fresh, seed=7, sizes=benchmark.Sizes(200, 200))
    out = {}
    for name in names:
        model, processor = train.build_model(base, cfg)
        examples = load_dataset(root, name, "train")
        harness = train.make_harness(model, processor, {}, cfg, log)
        train.local_train(model, harness, examples, gate=None, cfg=cfg.fed, rng=np.random.default_rng(0))
        answer, rule = train.answerer(model, processor, cfg), scoring[name]
        sets = {"train": examples[:200], "test": load_dataset(root, name, "test")}
        if cfg.data is None:
            sets["fresh"] = load_dataset(fresh, name, "train")
        out[name] = {k: metrics.evaluate_dataset(answer, lambda chunk: None, rule, ex, batch=200)[0]
                     for k, ex in sets.items()}
        log(f"{name}: one epoch on {len(examples)} records -> " + ", ".join(f"{k} {v:.1f}" for k, v in out[name].items()))
    return out


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a release root (default: the embedded benchmark in the cache)")
    ap.add_argument("--model", help="a LLaVA checkpoint folder, prompted as train.py --model prompts it (vicuna_v1's "
                    "system line; default: the tiny base with its own)")
    ap.add_argument("--limit", type=int, help="the first N records of each split")
    ap.add_argument("--no-base", action="store_true", help="skip the zero-shot base column")
    ap.add_argument("--transfer", nargs="+", metavar="DATASET", help="only: learn each dataset alone, score it")
    a = ap.parse_args(argv)
    cfg = train.resolve(train.parse_args([*(["--data", a.data] if a.data else []),
                                          *(["--model", a.model] if a.model else []), "--method", "finetune"]))
    root, base = train.prepare(cfg, log)
    scoring = rules(root, metrics.RULES)
    if a.transfer:
        unknown = [n for n in a.transfer if n not in METRIC]
        if unknown:
            raise SystemExit(f"--transfer: {unknown[0]!r} is not a dataset; choose from {', '.join(METRIC)}")
        return transfer(cfg, root, base, a.transfer, scoring, log)
    rng = np.random.default_rng(0)
    tests = {name: load_dataset(root, name, "test", limit=a.limit) for name in METRIC}
    rows = {}
    for name, examples in tests.items():
        seen = {key(e) for e in load_dataset(root, name, "train", limit=a.limit)}
        rule = scoring[name]
        const, answer = best_constant(rule, examples)
        rows[name] = {"rule": rule, "test": len(examples), "overlap": sum(key(e) in seen for e in examples),
                      "chance": chance(rule, examples, rng), "wrong": wrong(rule, examples, rng),
                      "constant": const, "constant_answer": answer}
    if not a.no_base:
        for name, s in base_scores(base, cfg.system, tests, scoring, log).items():
            rows[name]["base"] = s
    log(f"\n{'dataset':<12} {'rule':<16} {'test':>5} {'overlap':>7} {'chance':>6} {'wrong':>6} {'constant':>8}  "
        f"{'base':>5}  best constant answer")
    for name, r in rows.items():
        log(f"{name:<12} {r['rule']:<16} {r['test']:>5} {r['overlap']:>7} {r['chance']:>6.1f} {r['wrong']:>6.1f} "
            f"{r['constant']:>8.1f}  {r.get('base', float('nan')):>5.1f}  {r['constant_answer']!r}")
    if "Flickr30k" in tests and scoring["Flickr30k"] in metrics.CAPTIONS:
        ex = tests["Flickr30k"]
        for what, words in (("color", list(benchmark.COLORS)), ("thing", list(benchmark.THINGS.values()))):
            try:
                s = score(scoring["Flickr30k"], [swapped(first(truth(e)), words) for e in ex], ex)
                log(f"Flickr30k: its own caption with the {what} swapped scores {s:.1f} (the caption itself: "
                    f"{score(scoring['Flickr30k'], [first(truth(e)) for e in ex], ex):.1f})")
            except StopIteration:                      # a release whose captions do not use the embedded words
                break
    return rows


if __name__ == "__main__":
    main()
