"""Benchmark metrics on hand-checked cases (expected values worked out by hand in the comments)."""

import pytest

from sdrpn.eval.metrics import (
    anls,
    choose_by_likelihood,
    exact_match,
    match_option,
    normalize_answer,
    ocrbench_match,
    option_letter,
    pope_answer,
    pope_scores,
    relaxed_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),  # number word, sentence period
        ("The Cat", "cat"),  # article, case
        ("a", ""),  # an answer that is only an article vanishes
        ("dont", "don't"),  # contraction restored
        ("don't", "don't"),  # apostrophe is not punctuation
        ("3.5", "3.5"),  # decimal point kept
        ("3.5.", "3.5"),  # trailing period removed
        ("black/white", "black white"),  # glued mark becomes a space
        ("black / white", "black white"),  # spaced mark is deleted
        ("1,000", "1000"),  # commas dropped
        ("Yes!", "yes"),
        ("what?", "what"),
        ("man's hat", "man 's hat"),  # possessive split off
        ("none", "0"),
        ("t-shirt", "t shirt"),
        ("  multi\nline\ttext ", "multi line text"),
        ("(coca-cola)", "coca cola"),
        ("ten o'clock", "10 o'clock"),
        ("oclock", "o'clock"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    "num_matching, expected",
    [
        (0, 0.0),
        (1, 0.3),  # leave out the match: 0; leave out one of 9 others: 1/3 -> 9/10 * 1/3
        (2, 0.6),  # 2 * (1/3) + 8 * (2/3) = 6, / 10
        (3, 0.9),  # 3 * (2/3) + 7 * 1 = 9, / 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(num_matching, expected):
    answers = ["stop"] * num_matching + ["go"] * (10 - num_matching)
    assert vqa_accuracy("stop", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_and_answers():
    answers = ["2", "two", "Two.", "the 2", "3", "3", "3", "3", "3", "3"]
    # All four spellings of two normalise to "2": four matches -> 1.0.
    assert vqa_accuracy("Two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("2 ", answers) == pytest.approx(1.0)
    assert vqa_accuracy("three", answers) == pytest.approx(1.0)
    assert vqa_accuracy("four", answers) == 0.0


def test_vqa_accuracy_rejects_empty_references():
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("x", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("x", "x")


def test_exact_match():
    assert exact_match("The Red one.", ["red one", "blue"]) == 1.0
    assert exact_match("red", ["red one"]) == 0.0


@pytest.mark.parametrize(
    "pred, answers, expected",
    [
        ("hello", ["hello"], 1.0),
        ("hallo", ["hello"], 0.8),  # 1 edit / 5 chars
        ("abce", ["abcd"], 0.75),
        ("ac", ["ab"], 0.5),  # distance exactly 0.5 is kept, as the official script does
        ("abc", ["a"], 0.0),  # distance 2/3
        ("xyz", ["abc"], 0.0),
        ("Hello   World ", ["hello world"], 1.0),  # case and whitespace runs ignored
        ("Hello  Wrld", ["hello world"], 1 - 1 / 11),  # 1 edit (after collapsing the spaces) in 11
        ("hallo", ["zzzzz", "hello"], 0.8),  # best reference counts
        ("", ["abc"], 0.0),
        ("", [""], 1.0),  # nothing to compare: no distance
        ("strase", ["straße"], 1 - 1 / 7),  # raw length upper-cased: "STRASSE" is 7 long
    ],
)
def test_anls(pred, answers, expected):
    assert anls(pred, answers) == pytest.approx(expected)


def test_anls_divides_by_the_raw_length():
    # "a  b" (raw 4, normalised "a b") against "a c": 1 edit; raw length 4 gives 0.75, the
    # normalised length 3 would give 2/3
    assert anls("a  b", ["a c"]) == pytest.approx(0.75)


def test_anls_threshold():
    # distance 0.6 passes a 0.7 threshold and scores 0.4
    assert anls("abcde", ["abfgh"], threshold=0.7) == pytest.approx(0.4)
    assert anls("abcde", ["abfgh"]) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        anls("a", ["a"], threshold=0.0)


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        ("10.4", "10", 1.0),  # 4 % off
        ("10.5", "10", 1.0),  # exactly 5 % is within tolerance
        ("10.6", "10", 0.0),
        ("-9.6", "-10", 1.0),
        ("50%", "0.5", 1.0),  # percent sign divides by 100
        ("0", "0", 1.0),  # zero target: exact string match
        ("0.0", "0", 0.0),
        ("50%%", "0.5", 1.0),  # every trailing percent sign goes
        (" 12", "12", 1.0),  # float() reads surrounding whitespace
        ("Yes ", "yes", 0.0),  # text is compared as given, not stripped
        ("Yes", "yes", 1.0),
        ("Brazil", "Argentina", 0.0),
        ("12", "twelve", 0.0),
    ],
)
def test_relaxed_accuracy(pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


def test_relaxed_accuracy_tolerance():
    assert relaxed_accuracy("11", "10", tolerance=0.1) == 1.0
    assert relaxed_accuracy("11", "10", tolerance=0.05) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        relaxed_accuracy("1", "1", tolerance=-1)


def test_ocrbench_match():
    assert ocrbench_match("The sign says HELLO world", ["hello"]) == 1.0
    assert ocrbench_match("goodbye", ["hello", "bye"]) == 1.0
    assert ocrbench_match("goodbye", ["hello"]) == 0.0
    assert ocrbench_match("Line one\nline two", ["one line"]) == 1.0  # line breaks become spaces
    assert ocrbench_match("ＡＢＣ", ["abc"]) == 0.0  # no full-width folding, as the official code
    # handwritten maths: spaces and line breaks ignored, case matters, tabs count
    assert ocrbench_match("x ^ { 2 }", ["x^{2}"], source="HME100k") == 1.0
    assert ocrbench_match("x ^\n{ 2 }", ["x^{2}"], source="HME100k") == 1.0
    assert ocrbench_match("X^{2}", ["x^{2}"], source="HME100k") == 0.0
    assert ocrbench_match("x^\t{2}", ["x^{2}"], source="HME100k") == 0.0


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("There is no dog in the image.", "no"),
        ("It is not there", "no"),
        ("Yes, there is a dog. There is no cat.", "yes"),  # only the first sentence counts
        ("Nothing to see", "yes"),  # word based, "Nothing" is not "no"
    ],
)
def test_pope_answer(text, label):
    assert pope_answer(text) == label


def test_pope_scores_hand_checked():
    # answers yes, yes, yes, no against labels yes, yes, no, no: tp=2, fp=1, tn=1, fn=0
    scores = pope_scores(["Yes", "yes, it is", "Yes.", "No"], ["yes", "yes", "no", "no"])
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(1.0)
    assert scores["f1"] == pytest.approx(0.8)
    assert scores["yes_ratio"] == pytest.approx(0.75)


def test_pope_scores_no_positive_prediction():
    scores = pope_scores(["no", "no"], ["yes", "no"])
    assert scores == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_pope_scores_errors():
    with pytest.raises(ValueError, match="as many predictions as labels"):
        pope_scores(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_scores(["yes"], ["maybe"])


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("B", 1),
        ("(C) blue", 2),
        ("C.", 2),
        ("The answer is (D).", 3),
        ("A", 0),
        ("blue", 2),  # exact text
        ("It is green.", 1),  # option contained in the answer
        ("a green one", 1),  # leading article is not option A
        ("bleu", 2),  # nearest by edit distance
        ("E", 0),  # letter out of range: nearest text, "e" is 2 edits of 3 from "red"
    ],
)
def test_match_option(pred, expected):
    assert match_option(pred, ["red", "green", "blue", "dark blue"]) == expected


def test_match_option_prefers_longest_contained_option():
    assert match_option("it is dark blue", ["blue", "dark blue"]) == 1


def test_choose_by_likelihood():
    assert choose_by_likelihood([-5.0, -3.0, -4.0]) == 1
    # per-token means: -1, -3, -4
    assert choose_by_likelihood([-5.0, -3.0, -4.0], num_tokens=[5, 1, 1]) == 0
    with pytest.raises(ValueError, match="one positive count per option"):
        choose_by_likelihood([-1.0, -2.0], num_tokens=[1])


def test_option_letter():
    assert [option_letter(i) for i in range(4)] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError):
        option_letter(26)
