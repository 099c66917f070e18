"""Tests for metrics.py: answer rules, CIDEr-D against a hand-worked corpus, the continual metrics on hand-made
Hom and Het matrices, the evaluation after a stage, and the heatmap PNG (storage/results.py).
Run: python -m pytest tests/test_metrics.py"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import metrics as M
from storage.results import CELL_H, CELL_W, HIGH, LOW, NAN_COLOR, PAD, draw_matrix

# ---- answer rules -----------------------------------------------------------------------------------------


def test_exact_match_ignores_case_and_outer_whitespace():
    assert M.exact_match("  Golden Retriever\n", "golden retriever") == 1.0
    assert M.exact_match("B", "b ") == 1.0
    assert M.exact_match("golden  retriever", "golden retriever") == 0.0  # inner whitespace is kept
    assert M.exact_match("", "") == 0.0  # an empty prediction never counts


def test_substring_match_is_prediction_in_answer_and_empty_is_wrong():
    assert M.substring_match(" yes", "Yes") == 1.0
    assert M.substring_match("12", "the value is 12") == 1.0
    assert M.substring_match("the value is 12", "12") == 0.0  # answer in prediction is not enough
    assert M.substring_match("", "Yes") == 0.0  # official rule gives 1 here: the bug we do not copy
    assert M.substring_match("   ", "Yes") == 0.0


def test_parse_box_variants():
    assert M.parse_box("[0.25, 0.5, 0.50, 0.75]") == [0.25, 0.5, 0.5, 0.75]
    assert M.parse_box("The box is 0.1 0.2 0.3 0.4.") == [0.1, 0.2, 0.3, 0.4]
    assert M.parse_box("[.1,.2,.3,.4,.5]") == [0.1, 0.2, 0.3, 0.4]  # first 4 only
    assert M.parse_box("[1, 2, 30, 40]") == [1.0, 2.0, 30.0, 40.0]
    assert M.parse_box("[0.1, 0.2, 0.3]") is None
    assert M.parse_box("no box") is None


def test_box_iou_identical_disjoint_half_and_degenerate():
    a = [0.0, 0.0, 1.0, 1.0]
    assert M.box_iou(a, a) == 1.0
    assert M.box_iou(a, [2.0, 2.0, 3.0, 3.0]) == 0.0
    # b covers the right half of a: intersection 0.5, union 1  -> 0.5
    assert M.box_iou(a, [0.5, 0.0, 1.0, 1.0]) == pytest.approx(0.5)
    # shifted by half a width: intersection 0.5, union 1.5 -> 1/3
    assert M.box_iou(a, [0.5, 0.0, 1.5, 1.0]) == pytest.approx(1 / 3)
    assert M.box_iou(a, [0.5, 0.5, 0.5, 0.9]) == 0.0  # zero width


def test_iou_match_threshold_is_strict():
    answer = "[0.0, 0.0, 1.0, 1.0]"
    assert M.iou_match("[0.0, 0.0, 1.0, 0.5]", answer) == 0.0  # IoU exactly 0.5 is not > 0.5
    assert M.iou_match("[0.0, 0.0, 1.0, 0.6]", answer) == 1.0  # IoU 0.6
    assert M.iou_match("I cannot tell", answer) == 0.0


# ---- CIDEr-D ----------------------------------------------------------------------------------------------


def test_cider_d_worked_example():
    # Corpus of N = 3 images.  L = log 3.
    #   A refs: "a dog runs"      B refs: "a cat sits", "the cat sits"      C refs: "a red car"
    # df: "a" is in all 3 reference sets -> idf log(3/3) = 0; every other n-gram of the refs is in one set
    # (B's two refs count once) -> idf L; an n-gram in no ref (df 0) -> idf log(3/max(1, 0)) = L.
    # g = tf * idf per n-gram; cos_n = sum_k min(g_c, g_r) g_r / (|g_c^n| |g_r^n|); score = 10/(4|R|) sum.
    #
    # cand A "A dog runs." -> [a, dog, runs], the reference itself: cos_1 = cos_2 = cos_3 = 1, cos_4 = 0
    #   (no 4-grams), same length -> 10 * 3/4 = 7.5.
    expect_a = 7.5
    # cand B "the cat cat": n1 g = {the: L, cat: 2L}, |.| = sqrt5 L;  n2 {the cat: L, cat cat: L}, sqrt2 L
    #   vs "a cat sits"   n1 {a: 0, cat: L, sits: L} |.| sqrt2 L: min(2L, L) L = L^2 -> 1/sqrt10; n2, n3: 0
    #   vs "the cat sits" n1 {the, cat, sits: L} sqrt3 L: L^2 + min(2L, L) L = 2L^2 -> 2/sqrt15
    #                     n2 {the cat: L, cat sits: L} sqrt2 L: L^2 / (sqrt2 L sqrt2 L) = 1/2; n3: 0
    #   (without the clipping n1 would be 3/sqrt15); lengths 3 = 3 -> no penalty; |R| = 2
    expect_b = 10 / (4 * 2) * (1 / math.sqrt(10) + 2 / math.sqrt(15) + 0.5)  # = 1.6658
    # cand C "red car" vs "a red car": n1 {red, car: L} vs {a: 0, red, car: L} -> 1;
    #   n2 {red car: L} vs {a red, red car: L} -> 1/sqrt2; length 2 vs 3 -> exp(-1 / (2 * 6^2))
    expect_c = 10 / 4 * (1 + 1 / math.sqrt(2)) * math.exp(-1 / 72)  # = 4.2089
    got = M.cider_d(["A dog runs.", "the cat cat", "red car"],
                    [["a dog runs"], ["a cat sits", "the cat sits"], ["a red car"]])
    assert got == pytest.approx([expect_a, expect_b, expect_c], rel=1e-9)


def test_cider_d_identical_caption_beats_different_one():
    refs = [["a man rides a horse on the beach"], ["two dogs play in the snow"], ["a plate of food"]]
    same = M.cider_d(["a man rides a horse on the beach", "", ""], refs)[0]
    other = M.cider_d(["a man walks on the beach", "", ""], refs)[0]
    assert same > other > 0.0
    # the candidate is its reference: cos_n = 1 for n = 1..4 and no length penalty, so 10 / 4 * 4 = 10
    assert same == pytest.approx(10.0)


def test_cider_d_empty_candidate_scores_zero():
    assert M.cider_d(["", "a cat"], [["a dog runs"], ["a cat sits"]])[0] == 0.0


# ---- task_score -------------------------------------------------------------------------------------------


def test_task_score_per_sample_rules_in_percent():
    assert M.task_score("exact", ["cat", "Dog", "x", "y"], ["cat", "dog", "z", ["y", "Y."]]) == 75.0
    assert M.task_score("substring", ["yes", ""], ["Yes", "No"]) == 50.0
    assert M.task_score("iou", ["[0, 0, 1, 1]"], ["[0, 0, 1, 0.9]"]) == 100.0


def test_task_score_caption_is_the_corpus_mean_cider_d_in_percent_uncapped():
    refs = [["a dog runs on the grass"], ["a cat sleeps on the sofa"]]
    # with one reference an image, CIDEr-D of a caption equal to its reference is 10: 1000 in percent, as the
    # paper's tables report CIDEr (uncapped)
    exact = M.task_score("caption", ["a dog runs on the grass", "a cat sleeps on the sofa"], refs)
    assert exact == pytest.approx(100.0 * np.mean(M.cider_d([r[0] for r in refs], refs))) and exact > 100.0
    # a weak corpus: one repeated word (clipped to its count in the reference, length penalised), one miss
    weak = M.task_score("caption", ["grass " * 8, "a dog"], ["a dog runs on the grass", "a cat sleeps on the sofa"])
    cider = M.cider_d(["grass " * 8, "a dog"], [["a dog runs on the grass"], ["a cat sleeps on the sofa"]])
    assert 0.0 < weak < exact and weak == pytest.approx(100.0 * np.mean(cider))


# Stanford CoreNLP's own recorded PTBTokenizer outputs (its PTBTokenizerTest table: input -> tokens), lower-cased
# and with coco-caption's PUNCTUATIONS dropped, as coco-caption's tokenizer returns them
PTB_RECORDED = [
    ("This is a sentence.", "this is a sentence"),
    ("Gimme a phone, I'm gonna call.", "gim me a phone i 'm gon na call"),
    ("\"John & Mary's dog,\" Jane thought (to herself).", "john & mary 's dog jane thought -lrb- to herself -rrb-"),
    ("I can't believe they wanna keep 40% of that.", "i ca n't believe they wan na keep 40 % of that"),
    ("I don't --- think so...,\"", "i do n't think so"),
    ("You `paid' US$170,000?!", "you paid us$ 170,000 ?!"),
    ("Diamond (``Not even the chair'') lives near Udaipur (84km). {1. A potential Palmer trade:}",
     "diamond -lrb- not even the chair -rrb- lives near udaipur -lrb- 84km -rrb- -lcb- 1 a potential palmer trade "
     "-rcb-"),
    ("Kenneth liked Windows 3.1, Windows 3.x, and Mesa A.B as I remember things.",
     "kenneth liked windows 3.1 windows 3.x and mesa a.b as i remember things"),
    ("I wasn\u2019t really ... well, what I mean...see . . . what I'm saying, the thing is . . . I didn\u2019t mean it.",
     "i was n't really well what i mean see what i 'm saying the thing is i did n't mean it"),
    ("First sentence.... Second sentence.", "first sentence second sentence"),
    ("I don't give a f**k about your sh*tty life.", "i do n't give a f**k about your sh*tty life"),
]


@pytest.mark.parametrize("text,tokens", PTB_RECORDED)
def test_ptb_tokenize_gives_corenlps_recorded_tokens_without_coco_punctuation(text, tokens):
    assert M.ptb_tokenize(text) == tokens.split()


def test_cider_d_sees_a_clitic_as_coco_does():
    # "man's" is "man 's" for coco-caption: a caption that writes "man 's" matches its reference in every n-gram
    refs = [["a man's dog runs on the beach"], ["two girls play in the park"]]
    assert M.cider_d(["a man 's dog runs on the beach", "two girls play in the park"], refs) == pytest.approx(
        M.cider_d(["a man's dog runs on the beach", "two girls play in the park"], refs))
    assert M.ptb_tokenize("a man's dog") == ["a", "man", "'s", "dog"]


def test_caption_relative_scores_a_caption_against_its_first_references_own_cider():
    refs = [[f"a {c} {t} in the sky .", f"there is a {c} {t} up in the air .", f"the sky with a {c} {t} ."]
            for c in ("red", "blue", "green") for t in ("kite", "box", "sail")]
    own = [r[0] for r in refs]
    assert M.task_score("caption-relative", own, refs) == pytest.approx(100.0)
    # the official rule scores a caption of the wrong color far above 100 here (templated references share most
    # n-grams); the relative rule tells it from the right one
    wrong_color = [r[0].replace("red", "cyan").replace("blue", "red").replace("green", "blue") for r in refs]
    assert M.task_score("caption", wrong_color, refs) > 100.0
    assert M.task_score("caption-relative", wrong_color, refs) < 50.0
    # s_i = min(1, CIDEr-D(c_i, R_i) / CIDEr-D(R_i[0], R_i)), averaged, in percent
    ratio = np.minimum(1, np.array(M.cider_d(wrong_color, refs)) / np.array(M.cider_d(own, refs)))
    assert M.task_score("caption-relative", wrong_color, refs) == pytest.approx(100.0 * ratio.mean())
    assert M.task_score("caption-relative", [r[1] for r in refs], refs) <= 100.0


def test_task_score_errors():
    with pytest.raises(ValueError, match="bleu.*caption.*caption-relative"):
        M.task_score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError):
        M.task_score("exact", [], [])
    with pytest.raises(ValueError):
        M.task_score("exact", ["a"], ["a", "b"])


# ---- continual metrics ------------------------------------------------------------------------------------
HOM = [{"A": 80.0}, {"A": 70.0, "B": 90.0}, {"A": 60.0, "B": 85.0, "C": 75.0}]
# Het-like: two tasks at stage 0, A recurs and improves, D is first seen at the final stage 2
HET = [{"A": 50.0, "B": 40.0}, {"A": 70.0, "B": 45.0, "C": 30.0}, {"A": 65.0, "B": 50.0, "C": 20.0, "D": 90.0}]


def test_last_and_average_hom():
    assert M.last(HOM) == pytest.approx((60 + 85 + 75) / 3)  # 73.33
    assert M.average(HOM) == pytest.approx((80 + (70 + 90) / 2 + (60 + 85 + 75) / 3) / 3)  # 77.78


def test_forgetting_and_bwt_hom():
    assert M.forgetting(HOM) == pytest.approx({"A": 80 - 60, "B": 90 - 85})  # C is new at the end: omitted
    assert M.backward_transfer(HOM) == pytest.approx(((60 - 80) + (85 - 90)) / 2)  # -12.5


def test_last_and_average_het():
    assert M.last(HET) == pytest.approx((65 + 50 + 20 + 90) / 4)  # 56.25
    assert M.average(HET) == pytest.approx(((50 + 40) / 2 + (70 + 45 + 30) / 3 + 56.25) / 3)  # 49.86


def test_forgetting_uses_max_and_bwt_uses_first_stage_het():
    # A: max(50, 70) - 65 = 5 but first-stage delta 65 - 50 = +15; B improved: -5; C: 30 - 20; D omitted
    assert M.forgetting(HET) == pytest.approx({"A": 5.0, "B": -5.0, "C": 10.0})
    assert M.backward_transfer(HET) == pytest.approx((15 + 10 - 10) / 3)  # 5.0


def test_summarize_rounds_and_collects():
    s = M.summarize(HET)
    assert s == {"last": 56.25, "avg": 49.86, "forgetting": {"A": 5.0, "B": -5.0, "C": 10.0},
                 "mean_forgetting": 3.33, "bwt": 5.0}
    single = M.summarize([{"A": 42.0}])
    assert single["forgetting"] == {} and single["mean_forgetting"] == 0.0 and single["bwt"] == 0.0


def test_accuracy_matrix_nan_where_not_yet_seen():
    m = M.accuracy_matrix(HET, ["A", "B", "C", "D"])
    assert m.shape == (3, 4)
    assert np.array_equal(np.isnan(m), [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert m[1, 2] == 30.0 and m[2, 3] == 90.0


def test_invalid_acc_raises():
    with pytest.raises(ValueError, match="empty"):
        M.last([])
    with pytest.raises(ValueError, match=r"acc\[1\].*'A'"):
        M.average([{"A": 1.0}, {"B": 2.0}])


# ---- evaluation after a stage ------------------------------------------------------------------------------


def test_evaluate_tasks_scores_each_dataset_with_its_rule_under_each_questions_gate():
    calls, lines = [], []

    def gate_of(chunk):                                          # one gate row per question: [its value, 1]
        return torch.tensor([[float(e.value), 1.0] for e in chunk])

    def answer(chunk, gate):                                     # what the model says, under the gate it is given
        calls.append((len(chunk), gate.tolist()))
        return ["yes" if e.value % 2 == 0 else "no" for e in chunk]
    ex = lambda values: [SimpleNamespace(answer="yes", references=None, value=v) for v in values]
    data = {"T": SimpleNamespace(test={"exact": ex([0, 1, 2]), "substring": ex([4, 6])}),
            "U": SimpleNamespace(test={"other": ex([1])})}
    tasks, datasets, gates = M.evaluate_tasks(answer, gate_of, data, ["T", "U"],
                                              rules={"exact": "exact", "substring": "substring"}, batch=2,
                                              log=lines.append)
    assert datasets == {"exact": round(200 / 3, 2), "substring": 100.0, "other": 0.0}
    assert tasks == {"T": round((200 / 3 + 100) / 2, 2), "U": 0.0}   # a task: the mean over its datasets
    # batches of 2, each answered under its own questions' gate rows
    assert calls == [(2, [[0.0, 1.0], [1.0, 1.0]]), (1, [[2.0, 1.0]]), (2, [[4.0, 1.0], [6.0, 1.0]]), (1, [[1.0, 1.0]])]
    # a task's mean gate: the mean over its datasets of each dataset's mean gate
    assert gates == {"T": [(1.0 + 5.0) / 2, 1.0], "U": [1.0, 1.0]}
    assert [line.split(" (")[0] for line in lines] == ["  evaluated 1/2 T: 83.3", "  evaluated 2/2 U: 0.0"]
    assert lines[0].split(" (")[1].startswith("5 questions")


def test_evaluate_tasks_without_a_gate_reports_no_gates():
    ex = [SimpleNamespace(answer="a", references=None)]
    tasks, _, gates = M.evaluate_tasks(lambda chunk, gate: ["a"] * len(chunk), lambda chunk: None,
                                       {"T": SimpleNamespace(test={"D": ex})}, ["T"], rules={}, batch=8)
    assert tasks == {"T": 100.0} and gates == {}


# ---- heatmap ----------------------------------------------------------------------------------------------
TASKS = ["ImageNet-R", "ArxivQA", "IconQA", "CLEVR-Math", "OCR-VQA", "Flickr30k", "FigureQA", "super-CLEVR",
         "AOKVQA", "Grounding", "DVQA", "TabMWP"]


def _draw(path, rows, cols, values=None):
    values = np.full((rows, cols), 50.0) if values is None else values
    draw_matrix(path, values, [f"stage {t}" for t in range(rows)], TASKS[:cols], title="acc")
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.convert("RGB")


def test_draw_matrix_size_grows_one_cell_per_value(tmp_path):
    big, wide_half, short = _draw(tmp_path / "a.png", 8, 12), _draw(tmp_path / "b.png", 8, 6), \
        _draw(tmp_path / "c.png", 4, 12)
    assert big.width - wide_half.width == 6 * CELL_W
    assert big.height - short.height == 4 * CELL_H
    assert big.width > big.height  # 12 columns x 8 rows is landscape


def _cell_corner(img, rows, cols, r, c):
    # the grid ends PAD px from the bottom-right corner; sample 3 px inside cell (r, c), away from its text
    x = img.width - PAD - (cols - c) * CELL_W + 3
    y = img.height - PAD - (rows - r) * CELL_H + 3
    return img.getpixel((x, y))


def test_draw_matrix_colors_cells_and_blanks_nan(tmp_path):
    v = np.full((8, 12), 100.0)
    v[np.triu_indices(8, 1, 12)] = np.nan  # task j unseen before stage j
    v[7, 0] = 0.0
    img = _draw(tmp_path / "nan.png", 8, 12, v)
    assert _cell_corner(img, 8, 12, 0, 11) == NAN_COLOR
    assert _cell_corner(img, 8, 12, 7, 0) == tuple(LOW)  # 0 -> white
    assert _cell_corner(img, 8, 12, 7, 7) == tuple(HIGH)  # vmax -> full blue
    _draw(tmp_path / "all_nan.png", 2, 3, np.full((2, 3), np.nan))  # no values at all still draws
