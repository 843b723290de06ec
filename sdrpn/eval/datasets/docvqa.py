"""DocVQA and InfographicVQA val: the task's JSON annotation file and its image folder.

Both files are JSON objects whose ``data`` list holds ``questionId``, ``question`` and ``answers``.
DocVQA names the image relative to the annotation file (``"image": "documents/xyz.png"``);
InfographicVQA gives a bare file name (``image_local_name``) in the ``infographicsvqa_images``
folder.
"""

from __future__ import annotations

from pathlib import Path

from ...issues import RecordIssue, RecordProblem
from .base import (DatasetError, Sample, find_file, find_image_dir, id_of, read_json, reading_record, require,
                   short_answer_prompt, string_list, usable_samples)

DOCVQA_FILES = ("val_v1.0_withQT.json", "val_v1.0.json")
INFOVQA_FILES = ("infographicsVQA_val_v1.0_withQT.json", "infographicVQA_val_v1.0.json")


def _records(path: Path, name: str) -> list:
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise DatasetError(f"{path}: expected the {name} annotation file, a JSON object with a 'data' "
                           f"list of questions")
    if not content["data"]:
        raise DatasetError(f"{path}: the 'data' list is empty")
    return content["data"]


def _sample(record, image_of, path: Path, place: str) -> Sample:
    if not isinstance(record, dict):
        raise RecordProblem(f"expected an object, got {type(record).__name__}")
    if "answers" not in record:
        raise RecordProblem("no 'answers' (the test split has no public answers; use val)")
    question = require(record, "question", str)
    return Sample(
        question_id=str(require(record, "questionId", (int, str))),
        image=image_of(record),
        question=question,
        prompt=short_answer_prompt(question),
        answers=string_list(record["answers"], "answers"),
        file=str(path),
        line=place,
    )


def _samples(path: Path, records: list, image_of, issues: list[RecordIssue] | None) -> list[Sample]:
    samples = []
    for index, record in enumerate(records):
        place = f"data[{index}]"
        with reading_record(issues, path, place, id_of(record, "questionId")):
            samples.append(_sample(record, image_of, path, place))
    return usable_samples(samples, path, issues)


def _check_split(name: str, split: str | None) -> None:
    if split not in (None, "val"):
        raise DatasetError(f"{name} answers are public for the 'val' split only, got --split {split}")


def read_docvqa(data: Path, split: str | None = None, image_root: Path | None = None,
                issues: list[RecordIssue] | None = None) -> list[Sample]:
    _check_split("docvqa", split)
    path = find_file(data, DOCVQA_FILES, "DocVQA annotation file", subdirs=("val",))
    base = image_root if image_root is not None else path.parent
    if not base.is_dir():
        raise DatasetError(f"{base}: --image-root is not a directory")
    return _samples(path, _records(path, "DocVQA"), lambda record: base / require(record, "image", str), issues)


def read_infovqa(data: Path, split: str | None = None, image_root: Path | None = None,
                 issues: list[RecordIssue] | None = None) -> list[Sample]:
    _check_split("infovqa", split)
    path = find_file(data, INFOVQA_FILES, "InfographicVQA annotation file")
    images = find_image_dir([path.parent / "infographicsvqa_images", path.parent / "images", path.parent],
                            "InfographicVQA images", image_root)
    return _samples(path, _records(path, "InfographicVQA"),
                    lambda record: images / require(record, "image_local_name", str), issues)
