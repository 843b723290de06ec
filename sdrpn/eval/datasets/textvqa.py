"""TextVQA val: ``TextVQA_0.5.1_val.json`` and the ``train_images/`` folder it refers to.

The official annotation file is a JSON object whose ``data`` list holds one record per question
(``question_id``, ``question``, ``image_id``, ``answers``: 10 human answers); the val images are
``<image_id>.jpg`` in the ``train_images`` folder of the train/val image archive. Questions are
asked without OCR tokens, as in the SD-RPN paper.
"""

from __future__ import annotations

from pathlib import Path

from ...issues import RecordIssue, RecordProblem
from .base import (DatasetError, Sample, find_file, find_image_dir, id_of, read_json, reading_record, require,
                   short_answer_prompt, string_list, usable_samples)

ANNOTATION_FILES = ("TextVQA_0.5.1_val.json",)


def _sample(record, images: Path, path: Path, place: str) -> Sample:
    if not isinstance(record, dict):
        raise RecordProblem(f"expected an object, got {type(record).__name__}")
    question = require(record, "question", str)
    return Sample(
        question_id=str(require(record, "question_id", (int, str))),
        image=images / f"{require(record, 'image_id', str)}.jpg",
        question=question,
        prompt=short_answer_prompt(question),
        answers=string_list(require(record, "answers", list), "answers"),
        file=str(path),
        line=place,
    )


def read(data: Path, split: str | None = None, image_root: Path | None = None,
         issues: list[RecordIssue] | None = None) -> list[Sample]:
    if split not in (None, "val"):
        raise DatasetError(f"textvqa has only the 'val' split with public answers, got --split {split}")
    path = find_file(data, ANNOTATION_FILES, "TextVQA annotation file")
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise DatasetError(f"{path}: expected the TextVQA annotation file, a JSON object with a "
                           f"'data' list of questions")
    images = find_image_dir([path.parent / "train_images", path.parent / "train_val_images" / "train_images",
                             path.parent / "images"], "TextVQA images", image_root)
    samples = []
    for index, record in enumerate(content["data"]):
        place = f"data[{index}]"
        with reading_record(issues, path, place, id_of(record, "question_id")):
            samples.append(_sample(record, images, path, place))
    return usable_samples(samples, path, issues)
