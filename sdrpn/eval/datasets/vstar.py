"""V* Bench: the ``direct_attributes/`` and ``relative_position/`` folders of the release.

Each question is an image plus a JSON file of the same name holding ``question`` and ``options``,
the first option being the correct one. The options are shown to the model as lettered choices in
a fixed shuffled order (seeded by the question id), so that a model that favours the letter A
gains nothing. The benchmark ranks the options by the model's likelihood by default.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

from ...issues import RecordIssue, RecordProblem
from .base import (DatasetError, Sample, option_prompt, reading_record, require, string_list,
                   usable_samples)

CATEGORIES = ("direct_attributes", "relative_position")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _image_for(annotation: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = annotation.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise RecordProblem(f"no image beside it (expected {annotation.stem}.jpg or .png)")


def _sample(path: Path, category: str) -> Sample:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordProblem(f"unreadable JSON ({exc})") from None
    if not isinstance(record, dict):
        raise RecordProblem("expected a JSON object with 'question' and 'options'")
    question = require(record, "question", str)
    options = list(string_list(require(record, "options", list), "options"))
    if len(options) < 2:
        raise RecordProblem("a multiple-choice question needs at least 2 options")
    question_id = f"{category}/{path.stem}"
    correct = options[0]
    random.Random(zlib.crc32(question_id.encode())).shuffle(options)
    return Sample(
        question_id=question_id,
        image=_image_for(path),
        question=question,
        prompt=option_prompt(question, options),
        answers=(correct,),
        options=tuple(options),
        answer_index=options.index(correct),
        subset=category,
        file=str(path),
    )


def read(data: Path, split: str | None = None, image_root: Path | None = None,
         issues: list[RecordIssue] | None = None) -> list[Sample]:
    if not data.is_dir():
        raise DatasetError(f"{data}: expected the V* bench folder (with {' and '.join(CATEGORIES)} inside)")
    if image_root is not None:
        raise DatasetError("vstar keeps each image beside its question file; --image-root does not apply")
    if split not in (None, *CATEGORIES):
        raise DatasetError(f"vstar --split must be one of {', '.join(CATEGORIES)}, got {split}")
    categories = [name for name in (CATEGORIES if split is None else (split,)) if (data / name).is_dir()]
    if not categories:
        raise DatasetError(f"{data}: no V* category folder inside (expected {' and '.join(CATEGORIES)})")
    samples = []
    for category in categories:
        annotations = sorted((data / category).glob("*.json"))
        if not annotations:
            raise DatasetError(f"{data / category}: no question files (*.json)")
        for path in annotations:
            with reading_record(issues, path, None, f"{category}/{path.stem}"):
                samples.append(_sample(path, category))
    return usable_samples(samples, data, issues)
