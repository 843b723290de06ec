"""What every benchmark reader produces, and the checks they share.

A reader turns the files of one benchmark, exactly as its authors distribute them, into a list of
:class:`Sample`. Files that are not the benchmark's are refused with a :class:`DatasetError` that
names the file and says what was expected, so a user who pointed ``--data`` at the wrong place
learns it before a model is loaded.

A single record that cannot be used (a line that is not JSON, a missing field, an image that is
not there) follows the policy of :mod:`sdrpn.issues` when the caller passes an ``issues`` list: it
is skipped and reported there with its file, line and reason. Without one (a library caller
reading strictly) it is a :class:`DatasetError`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from ...errors import UserError
from ...issues import RecordIssue, RecordProblem

# The answer-format instructions of LLaVA-1.5's evaluation prompts.
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_ANSWER = "Answer with the option's letter from the given choices directly."


class DatasetError(UserError):
    """A benchmark file is missing, malformed or not the file the benchmark distributes."""


@dataclass(frozen=True)
class EmbeddedImage:
    """An image stored inside the annotation file (base64), as HR-Bench's TSV does."""

    data: str = field(repr=False)
    origin: str  # "file:row" for messages


@dataclass(frozen=True)
class Sample:
    """One benchmark question.

    Attributes:
        question_id: unique within the benchmark (prefixed with the subset where ids repeat).
        image: the image file, or the image embedded in the annotation file.
        question: the question as the benchmark states it.
        prompt: the text sent to the model: the question plus the answer-format instruction and,
            for multiple choice, the lettered options.
        answers: reference answers; for multiple choice, the correct option's text.
        options: the options of a multiple-choice question, else empty.
        answer_index: index of the correct option of a multiple-choice question, else None.
        subset: split or category reported separately in the summary ("" when there is none).
        source: the benchmark's own sub-source, where scoring depends on it (OCRBench dataset).
        box: ground-truth region in source pixels [x0, y0, x1, y1), when the benchmark has one.
        file, line: where the question is written (for reports): the annotation file and the
            question's line in it, or its place in a JSON list (``"data[3]"``); None for a file
            that holds one question.
    """

    question_id: str
    image: Path | EmbeddedImage
    question: str
    prompt: str
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    subset: str = ""
    source: str = ""
    box: tuple[float, float, float, float] | None = None
    file: str = ""
    line: int | str | None = None


def short_answer_prompt(question: str) -> str:
    """LLaVA-1.5's prompt for short-answer VQA."""
    question = question.strip()
    if question.endswith(SHORT_ANSWER):
        return question
    return f"{question}\n{SHORT_ANSWER}"


def option_prompt(question: str, options: Sequence[str]) -> str:
    """LLaVA-1.5's prompt for multiple choice: the question, "A. ..." lines, the instruction."""
    from ..metrics import option_letter

    lines = [question.strip()]
    lines += [f"{option_letter(index)}. {option}" for index, option in enumerate(options)]
    lines.append(OPTION_ANSWER)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc


def skip_record(issues: list[RecordIssue] | None, file: Path | str, line: int | str | None, reason: str,
                question_id: str | None = None) -> None:
    """A record that cannot be used: added to ``issues``, or, without a list, a :class:`DatasetError`."""
    issue = RecordIssue(str(file), line, reason, question_id)
    if issues is None:
        raise DatasetError(f"{file}: {_position(line)}{reason}")
    issues.append(issue)


def _position(line: int | str | None) -> str:
    if line is None:
        return ""
    return f"line {line}: " if isinstance(line, int) else f"{line}: "


@contextmanager
def reading_record(issues: list[RecordIssue] | None, file: Path | str, line: int | str | None,
                   question_id: Any = None) -> Iterator[None]:
    """Around the reading of one record: a :class:`~sdrpn.issues.RecordProblem` raised inside skips
    it (:func:`skip_record`)."""
    try:
        yield
    except RecordProblem as problem:
        skip_record(issues, file, line, str(problem), None if question_id is None else str(question_id))


def id_of(record: Any, key: str) -> Any:
    """The id field of a record that may not even be an object (for the report of a bad one)."""
    return record.get(key) if isinstance(record, dict) else None


def read_jsonl(path: Path, issues: list[RecordIssue] | None = None) -> list[tuple[int, dict]]:
    """Parse a JSON-lines file into (line number, object) pairs; blank lines are skipped, and so are
    (into ``issues``) lines that are not a JSON object."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))  # so that a cut-off line's column is on it
                except json.JSONDecodeError as exc:
                    skip_record(issues, path, number, f"unreadable line: {exc.msg} at column {exc.colno}")
                    continue
                if not isinstance(record, dict):
                    skip_record(issues, path, number, f"expected a JSON object, got {type(record).__name__}")
                    continue
                records.append((number, record))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    if not records:
        raise DatasetError(f"{path}: no usable records ({len(issues)} skipped; first: {issues[0]})" if issues
                           else f"{path}: no records (the file is empty)")
    return records


def find_file(data: Path, names: Sequence[str], what: str, subdirs: Sequence[str] = ()) -> Path:
    """``data`` itself when it is a file, else the first of ``names`` found in it or its ``subdirs``."""
    if not data.exists():
        raise DatasetError(f"{data}: no such file or directory")
    if data.is_file():
        return data
    for folder in (data, *(data / sub for sub in subdirs)):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise DatasetError(f"{data}: no {what} found; expected one of {', '.join(names)} in this directory")


def find_image_dir(candidates: Iterable[Path], what: str, image_root: Path | None) -> Path:
    """The image directory: ``image_root`` when given, else the first existing candidate."""
    if image_root is not None:
        if not image_root.is_dir():
            raise DatasetError(f"{image_root}: --image-root is not a directory")
        return image_root
    candidates = list(candidates)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise DatasetError(f"{what} not found (looked in {looked}); pass --image-root DIR")


def require(record: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    """``record[key]``, checked to exist and to be of ``kind`` (else a :class:`RecordProblem`)."""
    if key not in record:
        raise RecordProblem(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise RecordProblem(f"field {key!r} should be {expected}, got {type(value).__name__}")
    return value


def string_list(value: Any, key: str) -> tuple[str, ...]:
    """A non-empty list of strings (a single string is accepted as a list of one)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(item, (str, int, float)) for item in value):
        raise RecordProblem(f"field {key!r} should be a non-empty list of strings, got {shown_value(value)}")
    return tuple(str(item) for item in value)


def shown_value(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened with a visible ellipsis when longer than ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def usable_samples(samples: Sequence[Sample], annotation_file: Path, issues: list[RecordIssue] | None) -> list[Sample]:
    """``samples`` less those whose image file is missing and the repeats of a question id (each one
    skipped into ``issues``). Without ``issues``, or when no image exists at all (the wrong image
    folder, most likely) or no question is left, a :class:`DatasetError`."""
    found, missing = [], []
    for sample in samples:
        (found if not isinstance(sample.image, Path) or sample.image.is_file() else missing).append(sample)
    hint = f"for example {missing[0].image} (--image-root selects another image folder)" if missing else ""
    if missing and issues is None:
        raise DatasetError(f"{annotation_file}: {len(missing)} of the images it lists are missing, {hint}")
    if missing and not found:
        raise DatasetError(f"{annotation_file}: none of the {len(missing)} images it lists exists, {hint}")
    for sample in missing:
        skip_record(issues, sample.file, sample.line, f"image not found: {sample.image}", sample.question_id)
    usable = _unique_ids(found, annotation_file, issues)
    if not usable:
        first = f"; first: {issues[0]}" if issues else ""
        raise DatasetError(f"{annotation_file}: no usable question ({len(issues or ())} skipped{first})")
    return usable


def _unique_ids(samples: Sequence[Sample], annotation_file: Path, issues: list[RecordIssue] | None) -> list[Sample]:
    first: dict[str, Sample] = {}
    for sample in samples:
        if sample.question_id in first:
            if issues is None:
                raise DatasetError(f"{annotation_file}: question id {sample.question_id!r} appears twice")
            skip_record(issues, sample.file, sample.line, f"question id {sample.question_id!r} appears twice "
                                                          f"(first at {_place(first[sample.question_id])})",
                        sample.question_id)
        else:
            first[sample.question_id] = sample
    return list(first.values())


def _place(sample: Sample) -> str:
    return RecordIssue(sample.file, sample.line, "").place


_DECODE_ERRORS = (UnidentifiedImageError, binascii.Error, OSError, ValueError)


def _decode(image: Path | EmbeddedImage) -> Image.Image:
    if isinstance(image, EmbeddedImage):
        with Image.open(io.BytesIO(base64.b64decode(image.data, validate=False))) as handle:
            return handle.convert("RGB")
    with Image.open(image) as handle:
        return handle.convert("RGB")


def _origin(image: Path | EmbeddedImage) -> str:
    return image.origin if isinstance(image, EmbeddedImage) else str(image)


def open_image(image: Path | EmbeddedImage) -> Image.Image:
    """Load a sample's image as RGB; a file that is not an image raises a :class:`UserError`."""
    try:
        return _decode(image)
    except FileNotFoundError as exc:
        raise UserError(f"{image}: no such image file") from exc
    except _DECODE_ERRORS as exc:
        raise UserError(f"{_origin(image)}: not a readable image ({exc})") from exc


def open_sample_image(sample: Sample) -> Image.Image:
    """:func:`open_image` for a question of a benchmark: an image that cannot be used is a
    :class:`~sdrpn.issues.RecordProblem`, in the words every command reports it with."""
    try:
        return _decode(sample.image)
    except FileNotFoundError:
        raise RecordProblem(f"image not found: {sample.image}") from None
    except _DECODE_ERRORS as exc:
        raise RecordProblem(f"corrupt or unreadable image: {_origin(sample.image)} ({exc})") from None
