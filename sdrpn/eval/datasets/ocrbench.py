"""OCRBench: ``OCRBench.json`` and the ``OCRBench_Images`` folder.

The file is a JSON list of ``{"dataset_name", "id", "image_path", "question", "answers", "type"}``
with ``image_path`` relative to ``OCRBench_Images``. The question is asked as is (no instruction is
appended), as in the benchmark's own evaluation; the summary reports each question type.
"""

from __future__ import annotations

from pathlib import Path

from ...issues import RecordIssue, RecordProblem
from .base import (DatasetError, Sample, find_file, find_image_dir, id_of, read_json, reading_record, require,
                   string_list, usable_samples)


def _sample(record, index: int, images: Path, path: Path) -> Sample:
    if not isinstance(record, dict):
        raise RecordProblem(f"expected an object, got {type(record).__name__}")
    question = require(record, "question", str)
    return Sample(
        question_id=str(record.get("id", index)),
        image=images / require(record, "image_path", str),
        question=question,
        prompt=question,
        answers=string_list(require(record, "answers", (list, str)), "answers"),
        subset=require(record, "type", str),
        source=require(record, "dataset_name", str),
        file=str(path),
        line=f"item {index}",
    )


def read(data: Path, split: str | None = None, image_root: Path | None = None,
         issues: list[RecordIssue] | None = None) -> list[Sample]:
    if split is not None:
        raise DatasetError(f"ocrbench has a single test set, got --split {split}")
    path = find_file(data, ("OCRBench.json",), "OCRBench annotation file", subdirs=("OCRBench",))
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise DatasetError(f"{path}: expected the OCRBench annotation file, a non-empty JSON list")
    images = find_image_dir([path.parent / "OCRBench_Images", path.parent.parent / "OCRBench_Images"],
                            "OCRBench images", image_root)
    samples = []
    for index, record in enumerate(records):
        with reading_record(issues, path, f"item {index}", id_of(record, "id")):
            samples.append(_sample(record, index, images, path))
    return usable_samples(samples, path, issues)
