"""HR-Bench: ``hr_bench_4k.tsv`` or ``hr_bench_8k.tsv`` with base64-encoded images.

The TSV columns are ``index, question, answer`` (the correct letter), ``category`` ("single" or
"cross"), the options ``A``..``D`` and ``image``. As in the benchmark's distribution format, an
``image`` cell that holds another row's index instead of base64 data reuses that row's image.
``--split 4k|8k`` picks the file when ``--data`` is a folder holding both (default 4k).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ..metrics import option_letter
from ...issues import RecordIssue, RecordProblem
from .base import DatasetError, EmbeddedImage, Sample, option_prompt, reading_record, usable_samples

SPLITS = ("4k", "8k")
REQUIRED_COLUMNS = ("index", "question", "answer", "A", "B", "image")
# An image cell this short is a reference to another row (the shortest real image is far longer).
_MAX_REFERENCE_LENGTH = 64


def _tsv_path(data: Path, split: str | None) -> Path:
    if not data.exists():
        raise DatasetError(f"{data}: no such file or directory")
    if data.is_file():
        if data.suffix != ".tsv":
            raise DatasetError(f"{data}: expected HR-Bench's TSV file (hr_bench_4k.tsv or hr_bench_8k.tsv)")
        return data
    path = data / f"hr_bench_{split or '4k'}.tsv"
    if not path.is_file():
        raise DatasetError(f"{data}: {path.name} not found")
    return path


def _rows(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # image cells are megabytes of base64
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            columns = reader.fieldnames or []
            missing = [column for column in REQUIRED_COLUMNS if column not in columns]
            if missing:
                raise DatasetError(f"{path}: not an HR-Bench TSV, missing column(s) {', '.join(missing)} "
                                   f"(found {', '.join(columns[:10]) or 'nothing'})")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable TSV file ({exc})") from exc
    if not rows:
        raise DatasetError(f"{path}: no questions (only a header)")
    return rows


def _sample(row: dict, images: dict, path: Path, line: int) -> Sample:
    options = []
    for index in range(26):
        letter = option_letter(index)
        if not (row.get(letter) or "").strip():
            break
        options.append(row[letter].strip())
    answer = (row["answer"] or "").strip()
    if len(options) < 2 or answer not in [option_letter(i) for i in range(len(options))]:
        raise RecordProblem(f"answer {answer!r} is not the letter of one of the {len(options)} options")
    cell = row["image"] or ""
    data_cell = images.get(cell, cell) if len(cell) <= _MAX_REFERENCE_LENGTH else cell
    if len(data_cell) <= _MAX_REFERENCE_LENGTH:
        raise RecordProblem(f"image cell {cell!r} is neither base64 data nor the index of a row")
    question = (row["question"] or "").strip()
    if not question:
        raise RecordProblem("empty question")
    return Sample(
        question_id=row["index"],
        image=EmbeddedImage(data=data_cell, origin=f"{path}: line {line}"),
        question=question,
        prompt=option_prompt(question, options),
        answers=(options[ord(answer) - ord("A")],),
        options=tuple(options),
        answer_index=ord(answer) - ord("A"),
        subset=(row.get("category") or "").strip(),
        file=str(path),
        line=line,
    )


def read(data: Path, split: str | None = None, image_root: Path | None = None,
         issues: list[RecordIssue] | None = None) -> list[Sample]:
    if split not in (None, *SPLITS):
        raise DatasetError(f"hrbench --split must be one of {', '.join(SPLITS)}, got {split}")
    if image_root is not None:
        raise DatasetError("hrbench images are inside the TSV file; --image-root does not apply")
    path = _tsv_path(data, split)
    rows = _rows(path)
    images = {row["index"]: row["image"] for row in rows if len(row["image"] or "") > _MAX_REFERENCE_LENGTH}
    samples = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        with reading_record(issues, path, line, row["index"]):
            samples.append(_sample(row, images, path, line))
    return usable_samples(samples, path, issues)
