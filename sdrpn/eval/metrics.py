"""Scoring functions of the standard fine-grained VQA benchmarks.

Each function scores one prediction (or, for POPE, a whole split) exactly as the benchmark's own
evaluation code does, so numbers are comparable with published ones; where lmms-eval's scorer
differs from the official one, the official one is followed (the comment above each function
says which code that is, and ``tests/test_scorer_parity.py`` checks both):

- :func:`vqa_accuracy`: VQA soft accuracy with the EvalAI answer normalisation (TextVQA, VQAv2).
- :func:`anls`: average normalised Levenshtein similarity (DocVQA, InfographicVQA).
- :func:`relaxed_accuracy`: 5 % relative tolerance on numbers, exact match otherwise (ChartQA).
- :func:`ocrbench_match`: answer contained in the prediction (OCRBench).
- :func:`pope_scores`: accuracy, precision, recall, F1 and yes-ratio of yes/no answers (POPE).
- :func:`match_option` and :func:`choose_by_likelihood`: the two ways of answering a multiple-choice
  question (V*, HR-Bench): generate then match to the nearest option, or rank the options by the
  model's likelihood.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "anls",
    "relaxed_accuracy",
    "ocrbench_match",
    "pope_answer",
    "pope_scores",
    "option_letter",
    "match_option",
    "choose_by_likelihood",
]

# --------------------------------------------------------------------------------------------------
# VQA answer normalisation (the EvalAI answer processor used by the VQAv2 and TextVQA servers and by
# LLaVA-1.5's TextVQA evaluation: ``EvalAIAnswerProcessor`` and ``TextVQAAccuracyEvaluator`` in
# facebookresearch/mmf, mmf/utils/m4c_evaluators.py; lmms-eval's TextVQA task uses a copy of both,
# lmms_eval/tasks/_task_utils/vqa_eval_metric.py). The tables are the official ones; their quirks (for example
# "somebody'd" -> "somebodyd") are kept because predictions and references go through the same
# mapping, and changing it would change published numbers. Entries of the official table written
# with capitals ("Im", "Ive", "Id've") are left out: text is lower-cased first, so they never match.
# --------------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# A period is removed unless a digit follows it ("3.5" keeps its point, "end." loses it).
_PERIOD = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    # Official rule: a mark that stands next to a space somewhere in the text is deleted, any other
    # mark becomes a space ("black/white" -> "black white", "yes !" -> "yes"). The official rule
    # for digit commas ("1,000") never fires here: commas are already gone (normalize_answer).
    out = text
    for mark in _PUNCTUATION:
        spaced = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if spaced else " ")
    # The official code passes re.UNICODE (32) as the `count` argument here: at most 32 periods go.
    return _PERIOD.sub("", out, count=32)


def _map_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Normalise an answer as the VQA evaluation does before comparing strings.

    Lower-cases, drops commas and question marks, splits the possessive ``'s``, removes or spaces
    out punctuation, removes sentence periods, maps number words to digits ("two" -> "2"), drops
    articles and restores apostrophes of contractions ("dont" -> "don't").
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"expected a non-empty list of reference answers, got {answers!r}")


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against the human answers (usually 10).

    For each answer left out in turn, the score is ``min(#matches among the others / 3, 1)``; the
    result is the mean over the leave-one-out subsets. Prediction and answers are compared after
    :func:`normalize_answer`. Three or more matching humans out of ten give 1.0, one gives 0.3.
    """
    _check_answers(answers)
    pred = normalize_answer(pred)
    refs = [normalize_answer(answer) for answer in answers]
    matches = sum(ref == pred for ref in refs)
    # Leaving out a matching answer removes one match; leaving out any other keeps them all.
    total = 0.0
    for ref in refs:
        others = matches - (ref == pred)
        total += min(others / 3.0, 1.0)
    return total / len(refs)


def exact_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals any reference answer after :func:`normalize_answer`, else 0.0."""
    _check_answers(answers)
    pred = normalize_answer(pred)
    return float(any(normalize_answer(answer) == pred for answer in answers))


# --------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA)
# --------------------------------------------------------------------------------------------------


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


# ANLS as the official DocVQA / InfographicVQA evaluation script computes it (the Robust Reading
# Competition's, rrc.cvc.uab.es/?ch=17, also distributed on docvqa.org; lmms-eval's ``anls`` in
# lmms_eval/api/metrics.py is a copy of it). Two of its details differ from the formula of
# the papers (Biten et al., ICCV 2019, eq. 1: ``1 - NL`` if ``NL < tau``, else 0), and the published
# numbers come from the script:
#   - the similarity ``1 - NL`` is zeroed only when it is *below* ``1 - tau``: a normalised distance
#     of exactly 0.5 scores 0.5, where the formula gives 0;
#   - the edit distance is taken between the normalised strings (lower case, whitespace runs
#     collapsed) but divided by the longer of the *raw* strings, measured upper-cased
#     (``len(answer.upper())``: "ß" counts as 2), not by the longer normalised string.


def anls(pred: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one prediction (DocVQA's metric).

    The edit distance between the prediction and each reference, both lower-cased with runs of
    whitespace collapsed, is divided by the longer of the two raw strings. The score is
    ``1 - d`` for the nearest reference when ``d <= threshold`` (distance exactly 0.5 scores 0.5, as
    the official script does), else 0.
    """
    _check_answers(answers)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"anls threshold must be in (0, 1], got {threshold}")
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(pred.upper()))
        distance = _levenshtein(_anls_text(pred), _anls_text(answer))
        distances.append(distance / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return similarity if similarity >= 1.0 - threshold else 0.0


# --------------------------------------------------------------------------------------------------
# ChartQA, OCRBench
# --------------------------------------------------------------------------------------------------


# ChartQA's relaxed accuracy as its reference implementation computes it (``relaxed_correctness``
# in google-research/pix2struct, pix2struct/metrics.py, which lmms-eval's chartqa/utils.py copies
# through Qwen-VL): no whitespace is stripped, and any number of trailing "%" divides by 100.


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: numbers may differ by ``tolerance`` relative to the target.

    Numbers (a trailing ``%`` divides by 100) match when ``|pred - target| <= tolerance * |target|``.
    A non-numeric pair, or a zero target, needs a case-insensitive exact match.
    """
    if tolerance < 0:
        raise ValueError(f"relaxed_accuracy tolerance must be >= 0, got {tolerance}")
    pred_value, target_value = _to_float(pred), _to_float(target)
    if pred_value is not None and target_value:  # a zero target has no relative scale
        return float(abs(pred_value - target_value) / abs(target_value) <= tolerance)
    return float(pred.lower() == target.lower())


# OCRBench as its authors score it (Yuliang-Liu/MultimodalOCR, OCRBench/example.py). lmms-eval's
# ocrbench/utils.py (0.7.x) also folds full-width ASCII and the ideographic space to ASCII before
# comparing; the official code does not, so neither does this one: "ＡＢＣ" does not contain "abc".


def ocrbench_match(pred: str, answers: Sequence[str], source: str = "") -> float:
    """OCRBench's score: 1.0 if any reference answer occurs inside the prediction.

    Case-insensitive; for handwritten mathematical expressions (``source`` dataset "HME100k") the
    comparison is case-sensitive and ignores spaces and line breaks (not tabs), as in the
    benchmark's own code.
    """
    _check_answers(answers)
    if source == "HME100k":
        squeeze = lambda text: text.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
        return float(any(squeeze(answer) in squeeze(pred) for answer in answers))
    fold = lambda text: text.lower().strip().replace("\n", " ")  # noqa: E731
    return float(any(fold(answer) in fold(pred) for answer in answers))


# --------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """Map a free-form answer to "yes" or "no" as POPE's evaluation does.

    Only the first sentence counts; it is "no" if it contains the word "no", "No" or "not".
    """
    first_sentence = text.split(".", 1)[0].replace(",", "")
    words = first_sentence.split()
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_scores(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's scores for one split; "yes" is the positive class.

    Args:
        preds: the model's answers, free-form (mapped with :func:`pope_answer`).
        labels: the ground truth, each "yes" or "no".

    Returns:
        ``accuracy, precision, recall, f1, yes_ratio`` (fraction of "yes" predictions); a ratio
        with an empty denominator is 0.
    """
    if len(preds) != len(labels):
        raise ValueError(f"pope_scores needs as many predictions as labels, "
                         f"got {len(preds)} and {len(labels)}")
    if not preds:
        raise ValueError("pope_scores needs at least one prediction")
    bad = [label for label in labels if label not in ("yes", "no")]
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad[0]!r}")
    answers = [pope_answer(pred) for pred in preds]
    pairs = list(zip(answers, labels))
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("no", "yes"))
    ratio = lambda num, den: num / den if den else 0.0  # noqa: E731
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": (tp + fp) / len(labels),
    }


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------

# "B", "B.", "(B)", "B) text", "B: text", "Answer: B", "The answer is (B)."
_LETTER_ANSWER = re.compile(r"^(?:the answer is|answer:)?\s*\(?([A-Z])(?:[\).:,]|\s|$)", re.IGNORECASE)


def option_letter(index: int) -> str:
    """Letter of the option at ``index`` (0 -> "A")."""
    if not 0 <= index < 26:
        raise ValueError(f"option index must be in [0, 26), got {index}")
    return chr(ord("A") + index)


def match_option(pred: str, options: Sequence[str]) -> int:
    """Index of the option a generated answer chose (generate-then-match).

    In order: an option letter at the start of the answer ("B", "(B)", "B. red"); an option whose
    normalised text equals the answer; the longest option contained in the answer; otherwise the
    option nearest to the answer by edit distance. Always returns a valid index.
    """
    if not options:
        raise ValueError("match_option needs at least one option")
    letter = _LETTER_ANSWER.match(pred.strip())
    if letter is not None:
        index = ord(letter.group(1).upper()) - ord("A")
        # A bare "a" is more likely an article than option A, unless it is the whole answer.
        is_article = letter.group(1) in "aA" and pred.strip().lower().startswith("a ")
        if index < len(options) and not is_article:
            return index
    norm_pred = normalize_answer(pred)
    norm_options = [normalize_answer(option) for option in options]
    for index, option in enumerate(norm_options):
        if option == norm_pred:
            return index
    contained = [(len(option), index) for index, option in enumerate(norm_options)
                 if option and re.search(rf"\b{re.escape(option)}\b", norm_pred)]
    if contained:
        return max(contained)[1]
    distances = [_levenshtein(norm_pred, option) / max(len(norm_pred), len(option), 1)
                 for option in norm_options]
    return min(range(len(options)), key=distances.__getitem__)


def choose_by_likelihood(log_likelihoods: Sequence[float], num_tokens: Sequence[int] | None = None) -> int:
    """Index of the option the model finds most likely (likelihood over options).

    Args:
        log_likelihoods: summed log-probability of each option's tokens given the prompt.
        num_tokens: token count of each option; when given, options are ranked by mean
            log-probability per token so that long options are not penalised.
    """
    if not log_likelihoods:
        raise ValueError("choose_by_likelihood needs at least one option")
    scores = list(log_likelihoods)
    if num_tokens is not None:
        if len(num_tokens) != len(scores) or min(num_tokens) < 1:
            raise ValueError(f"num_tokens must hold one positive count per option, got {num_tokens}")
        scores = [score / count for score, count in zip(scores, num_tokens)]
    return max(range(len(scores)), key=scores.__getitem__)
