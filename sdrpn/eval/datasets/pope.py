"""POPE: the three question files ``coco_pope_{adversarial,popular,random}.json`` and COCO val2014.

Despite the extension, each file holds JSON lines ``{"question_id", "image", "text", "label"}``
with ``label`` "yes" or "no". Every split is read unless ``--split`` picks one; the summary
reports accuracy, precision, recall, F1 and yes-ratio per split, and the mean F1 as the headline.
Question ids repeat across splits, so they are prefixed with the split name.
"""

from __future__ import annotations

from pathlib import Path

from ...issues import RecordIssue, RecordProblem
from .base import (DatasetError, Sample, find_image_dir, read_jsonl, reading_record, require, short_answer_prompt,
                   usable_samples)

SPLITS = ("adversarial", "popular", "random")


def _split_files(data: Path, split: str | None) -> list[tuple[str, Path]]:
    if not data.exists():
        raise DatasetError(f"{data}: no such file or directory")
    if data.is_file():
        name = next((s for s in SPLITS if data.name == f"coco_pope_{s}.json"), None)
        if name is None:
            raise DatasetError(f"{data}: expected a POPE question file named coco_pope_<split>.json "
                               f"(split one of {', '.join(SPLITS)})")
        return [(name, data)]
    folder = data / "coco" if (data / "coco").is_dir() else data
    wanted = SPLITS if split is None else (split,)
    files = [(name, folder / f"coco_pope_{name}.json") for name in wanted]
    present = [(name, path) for name, path in files if path.is_file()]
    if split is not None and not present:
        raise DatasetError(f"{data}: POPE question file {files[0][1].name} not found")
    if not present:
        raise DatasetError(f"{data}: no POPE question file found (coco_pope_<split>.json, "
                           f"split one of {', '.join(SPLITS)})")
    return present


def _sample(record: dict, split: str, images: Path, path: Path, line: int) -> Sample:
    label = require(record, "label", str)
    if label not in ("yes", "no"):
        raise RecordProblem(f"label must be 'yes' or 'no', got {label!r}")
    question = require(record, "text", str)
    return Sample(
        question_id=f"{split}/{require(record, 'question_id', (int, str))}",
        image=images / require(record, "image", str),
        question=question,
        prompt=short_answer_prompt(question),
        answers=(label,),
        subset=split,
        file=str(path),
        line=line,
    )


def read(data: Path, split: str | None = None, image_root: Path | None = None,
         issues: list[RecordIssue] | None = None) -> list[Sample]:
    if split not in (None, *SPLITS):
        raise DatasetError(f"pope --split must be one of {', '.join(SPLITS)}, got {split}")
    files = _split_files(data, split)
    base = files[0][1].parent
    images = find_image_dir([base / "val2014", base.parent / "val2014", base / "images"],
                            "COCO val2014 images for POPE", image_root)
    samples = []
    for name, path in files:
        for line, record in read_jsonl(path, issues):
            with reading_record(issues, path, line, record.get("question_id")):
                samples.append(_sample(record, name, images, path, line))
    return usable_samples(samples, data, issues)
