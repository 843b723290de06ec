"""Our benchmark scorers against lmms-eval's, on the same predictions.

Every case holds the score worked out by hand for ``sdrpn.eval.metrics`` and for lmms-eval 0.7.3's
scorer of the same benchmark. They agree everywhere but on one documented difference, where we
follow the benchmark's official scorer (sources in the comments of sdrpn/eval/metrics.py):

- OCRBench: lmms-eval folds full-width ASCII ("ＡＢＣ") and the ideographic space to ASCII before
  matching; the official OCRBench code (Yuliang-Liu/MultimodalOCR, OCRBench/example.py) does not.

Two rules where lmms-eval and the official scripts agree against the papers' formula are followed
as the scripts have them: ANLS keeps a normalised distance of exactly 0.5 (score 0.5), and divides
the edit distance by the longer *raw* string (the DocVQA/InfographicVQA evaluation script).

Our side always runs; lmms-eval's side runs where lmms-eval is installed (``make lmms-eval-test``),
on the hand-made cases and on generated predictions.
"""

from __future__ import annotations

import random

import pytest

from sdrpn.eval import metrics

# (benchmark, prediction, reference answers, OCRBench source, ours, lmms-eval's)
CASES = [
    # TextVQA: VQA accuracy over 10 human answers, EvalAI normalisation
    ("textvqa", "Two", ["2", "two", "Two.", "the 2", "3", "3", "3", "3", "3", "3"], "", 1.0, 1.0),
    ("textvqa", "stop", ["stop"] + ["go"] * 9, "", 0.3, 0.3),
    ("textvqa", "black/white", ["black white"] * 2 + ["grey"] * 8, "", 0.6, 0.6),
    ("textvqa", "dont", ["don't"] * 3 + ["do"] * 7, "", 0.9, 0.9),
    ("textvqa", "3.5.", ["3.5"] * 4 + ["4"] * 6, "", 1.0, 1.0),
    ("textvqa", "1,000", ["1000"] + ["1"] * 9, "", 0.3, 0.3),
    # DocVQA / InfographicVQA: ANLS
    ("docvqa", "Hello   World ", ["hello world"], "", 1.0, 1.0),
    ("docvqa", "hallo", ["zzzzz", "hello"], "", 0.8, 0.8),
    ("docvqa", "ac", ["ab"], "", 0.5, 0.5),  # distance exactly 0.5 is kept
    ("docvqa", "abc", ["a"], "", 0.0, 0.0),  # distance 2/3
    ("infovqa", "a  b", ["a c"], "", 0.75, 0.75),  # 1 edit over the raw length 4, not the normalised 3
    ("infovqa", "strase", ["straße"], "", 1 - 1 / 7, 1 - 1 / 7),  # "STRASSE" is 7 long
    ("infovqa", "", [""], "", 1.0, 1.0),
    # ChartQA: relaxed accuracy
    ("chartqa", "10.5", ["10"], "", 1.0, 1.0),
    ("chartqa", "10.6", ["10"], "", 0.0, 0.0),
    ("chartqa", "50%", ["0.5"], "", 1.0, 1.0),
    ("chartqa", "50%%", ["0.5"], "", 1.0, 1.0),
    ("chartqa", "0.0", ["0"], "", 0.0, 0.0),  # a zero target needs the same text
    ("chartqa", "Yes", ["yes"], "", 1.0, 1.0),
    ("chartqa", "Yes ", ["yes"], "", 0.0, 0.0),  # not stripped
    # OCRBench: reference contained in the prediction
    ("ocrbench", "The sign says HELLO world", ["hello"], "", 1.0, 1.0),
    ("ocrbench", "Line one\nline two", ["one line"], "", 1.0, 1.0),
    ("ocrbench", "x ^ { 2 }", ["x^{2}"], "HME100k", 1.0, 1.0),
    ("ocrbench", "X^{2}", ["x^{2}"], "HME100k", 0.0, 0.0),
    ("ocrbench", "x^\t{2}", ["x^{2}"], "HME100k", 0.0, 0.0),  # tabs are kept
    ("ocrbench", "ＡＢＣ", ["abc"], "", 0.0, 1.0),  # full-width folding: lmms-eval only
    ("ocrbench", "say abc", ["ａｂｃ"], "", 0.0, 1.0),
]


def ours(benchmark: str, pred: str, answers: list[str], source: str = "") -> float:
    if benchmark == "textvqa":
        return metrics.vqa_accuracy(pred, answers)
    if benchmark in ("docvqa", "infovqa"):
        return metrics.anls(pred, answers)
    if benchmark == "chartqa":
        return max(metrics.relaxed_accuracy(pred, answer) for answer in answers)
    return metrics.ocrbench_match(pred, answers, source)


def theirs(benchmark: str, pred: str, answers: list[str], source: str = "") -> float:
    """lmms-eval's per-document score of one prediction for the benchmark's task."""
    if benchmark == "textvqa":
        from lmms_eval.tasks.textvqa.utils import textvqa_process_results

        return textvqa_process_results({"question_id": 0, "answers": list(answers)}, [pred])["exact_match"]
    if benchmark in ("docvqa", "infovqa"):  # both tasks score with the registered anls metric
        from lmms_eval.api.metrics import anls

        return anls(list(answers), [pred])["anls"]
    if benchmark == "chartqa":
        from lmms_eval.tasks.chartqa.utils import chartqa_process_results

        return chartqa_process_results({"type": "human_test", "answer": answers[0]}, [pred])["relaxed_overall"]
    from lmms_eval.tasks.ocrbench.utils import ocrbench_process_results

    doc = {"answer": list(answers), "dataset": source, "question_type": "Regular Text Recognition"}
    return ocrbench_process_results(doc, [pred])["ocrbench_accuracy"]["score"]


def case_id(case) -> str:
    return f"{case[0]}-{case[1]!r}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ours_on_hand_checked_cases(case):
    benchmark, pred, answers, source, expected, _ = case
    assert ours(benchmark, pred, answers, source) == pytest.approx(expected)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lmms_eval_on_hand_checked_cases(case):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make lmms-eval-test installs it)")
    benchmark, pred, answers, source, _, expected = case
    assert theirs(benchmark, pred, answers, source) == pytest.approx(expected)


# Characters that exercise every normalisation rule of the four scorers, ASCII only (the one known
# difference, full-width folding, cannot occur).
ALPHABET = "aAbBcC 0123.,%/-!?'\n"
WORDS = ["the", "a", "two", "dont", "12", "1,000", "3.5", "50%", "x^{2}", "yes", "No"]


def generated_cases(count: int, seed: int):
    rng = random.Random(seed)

    def text() -> str:
        if rng.random() < 0.5:
            return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8)))

    for _ in range(count):
        answers = [text() for _ in range(rng.choice([1, 3, 10]))]
        pred = rng.choice(answers) if rng.random() < 0.3 else text()
        yield pred, answers


@pytest.mark.parametrize("benchmark, source", [("textvqa", ""), ("docvqa", ""), ("chartqa", ""),
                                               ("ocrbench", ""), ("ocrbench", "HME100k")])
def test_same_scores_as_lmms_eval_on_generated_predictions(benchmark, source):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make lmms-eval-test installs it)")
    differences = []
    for pred, answers in generated_cases(400, seed=len(benchmark + source)):
        if benchmark == "chartqa":
            answers = answers[:1]  # ChartQA has one answer per question
        if ours(benchmark, pred, answers, source) != pytest.approx(theirs(benchmark, pred, answers, source)):
            differences.append((pred, answers))
    assert differences == []
