"""ChartQA test: ``test_human.json`` and ``test_augmented.json`` with the ``png/`` folder.

Each file is a JSON list of ``{"imgname", "query", "label"}``. Both subsets are read unless
``--split human`` or ``--split augmented`` picks one; the summary reports each and the overall
accuracy (the subsets have the same size, so that is also their average).
"""

from __future__ import annotations

from pathlib import Path

from ...issues import RecordIssue, RecordProblem
from .base import (DatasetError, Sample, find_image_dir, read_json, reading_record, require, short_answer_prompt,
                   usable_samples)

SUBSETS = ("human", "augmented")


def _subset_files(data: Path, split: str | None) -> list[tuple[str, Path]]:
    if not data.exists():
        raise DatasetError(f"{data}: no such file or directory")
    if data.is_file():
        subset = next((name for name in SUBSETS if data.name == f"test_{name}.json"), None)
        if subset is None:
            raise DatasetError(f"{data}: expected ChartQA's test_human.json or test_augmented.json")
        return [(subset, data)]
    folder = data / "test" if (data / "test").is_dir() else data
    subsets = SUBSETS if split is None else (split,)
    files = [(name, folder / f"test_{name}.json") for name in subsets]
    missing = [str(path) for _, path in files if not path.is_file()]
    if missing:
        raise DatasetError(f"{data}: ChartQA annotation file missing: {', '.join(missing)}")
    return files


def _sample(record, subset: str, index: int, images: Path, path: Path) -> Sample:
    if not isinstance(record, dict):
        raise RecordProblem(f"expected an object, got {type(record).__name__}")
    question = require(record, "query", str)
    return Sample(
        question_id=f"{subset}/{index}",
        image=images / require(record, "imgname", str),
        question=question,
        prompt=short_answer_prompt(question),
        answers=(str(require(record, "label", (str, int, float))),),
        subset=subset,
        file=str(path),
        line=f"item {index}",
    )


def read(data: Path, split: str | None = None, image_root: Path | None = None,
         issues: list[RecordIssue] | None = None) -> list[Sample]:
    if split not in (None, *SUBSETS):
        raise DatasetError(f"chartqa --split must be one of {', '.join(SUBSETS)}, got {split}")
    samples = []
    for subset, path in _subset_files(data, split):
        records = read_json(path)
        if not isinstance(records, list) or not records:
            raise DatasetError(f"{path}: expected a non-empty JSON list of ChartQA questions")
        images = find_image_dir([path.parent / "png"], "ChartQA images", image_root)
        for index, record in enumerate(records):
            with reading_record(issues, path, f"item {index}", f"{subset}/{index}"):
                samples.append(_sample(record, subset, index, images, path))
    return usable_samples(samples, data, issues)
