"""The generic question/answer format: one JSON object per line.

Use it for your own data; the synthetic testbed writes it too. Each line::

    {"question_id": "q17", "image": "images/q17.png", "question": "What digit is in the red square?",
     "answers": ["7"]}

Fields:
    question_id   string or integer, unique in the file (required)
    image         image path, relative to the JSONL file's folder or absolute (required)
    question      the question; ``text`` is accepted as its name too, as in LLaVA's files (required)
    answers       list of accepted answers; ``answer`` with a single string works too (required)
    options       list of choices: makes the question multiple choice; ``answers[0]`` is then the
                  correct option, given as its text or its letter ("B")
    box           ground-truth region [x0, y0, x1, y1] in source-image pixels
    subset        a group name; the summary reports each group separately

The model is asked the question followed by LLaVA-1.5's short-answer instruction (not repeated if
the question already ends with it), or with lettered options for multiple choice.
``--data`` is the file, or a folder holding ``<split>.jsonl`` (``--split``, default "test").
"""

from __future__ import annotations

from pathlib import Path

from ..metrics import option_letter
from ...issues import RecordIssue, RecordProblem
from .base import (DatasetError, Sample, option_prompt, read_jsonl, reading_record, require, short_answer_prompt,
                   shown_value, string_list, usable_samples)


def _path(data: Path, split: str | None) -> Path:
    if not data.exists():
        raise DatasetError(f"{data}: no such file or directory")
    if data.is_file():
        return data
    path = data / f"{split or 'test'}.jsonl"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in data.glob("*.jsonl"))) or "none"
        raise DatasetError(f"{data}: no {path.name} (splits found: {available})")
    return path


def _box(value) -> tuple[float, float, float, float]:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise RecordProblem(f"field 'box' should be [x0, y0, x1, y1], got {shown_value(value)}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (x0 < x1 and y0 < y1):
        raise RecordProblem(f"box {value} is empty (needs x0 < x1 and y0 < y1)")
    return x0, y0, x1, y1


def _choice(answers: tuple[str, ...], options: tuple[str, ...]) -> int:
    letters = [option_letter(index) for index in range(len(options))]
    if answers[0] in options:
        return options.index(answers[0])
    if answers[0] in letters:
        return letters.index(answers[0])
    raise RecordProblem(f"answer {answers[0]!r} is neither one of the options nor their letter")


def _sample(record: dict, images: Path, path: Path, line: int) -> Sample:
    key = "question" if "question" in record else "text"
    question = require(record, key, str).strip()
    if not question:
        raise RecordProblem("empty question")
    if "answers" in record:
        answers = string_list(record["answers"], "answers")
    else:
        answers = string_list(require(record, "answer", str), "answer")
    options: tuple[str, ...] = ()
    answer_index = None
    if "options" in record:
        options = string_list(record["options"], "options")
        if len(options) < 2:
            raise RecordProblem("a multiple-choice question needs at least 2 options")
        answer_index = _choice(answers, options)
        answers = (options[answer_index],)
    return Sample(
        question_id=str(require(record, "question_id", (str, int))),
        image=images / require(record, "image", str),
        question=question,
        prompt=option_prompt(question, options) if options else short_answer_prompt(question),
        answers=answers,
        options=options,
        answer_index=answer_index,
        subset=str(record.get("subset", "")),
        box=_box(record["box"]) if "box" in record else None,
        file=str(path),
        line=line,
    )


def read(data: Path, split: str | None = None, image_root: Path | None = None,
         issues: list[RecordIssue] | None = None) -> list[Sample]:
    path = _path(data, split)
    images = image_root if image_root is not None else path.parent
    samples = []
    for line, record in read_jsonl(path, issues):
        with reading_record(issues, path, line, record.get("question_id")):
            samples.append(_sample(record, images, path, line))
    return usable_samples(samples, path, issues)
