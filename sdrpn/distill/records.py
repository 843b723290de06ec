"""Training records for labelling: LLaVA instruction files and plain question files.

Accepted inputs (one file, format detected from its content):

* LLaVA instruction data, as a JSON array (``llava_v1_5_mix665k.json``) or JSON lines: objects
  with ``id``, ``image`` and ``conversations`` (``[{"from": "human"|"gpt", "value": ...}]``). The
  question is the first human turn without its ``<image>`` placeholder.
* Plain JSON lines: objects with ``question_id``, ``image`` and ``text`` (the question).

A record that cannot be used (unreadable line, no image, empty question, ...) never stops reading:
it becomes a :class:`~sdrpn.issues.RecordIssue` naming the file, the line and the reason, and the
caller reports it (the policy of :mod:`sdrpn.issues`). Image problems are found later, when the image is opened (:func:`open_rgb_image`).

Images that are not RGB (grayscale, palette, RGBA, CMYK, 16-bit) are converted to RGB and kept,
as LLaVA's own data loader does: they are ordinary pictures the model can read. The labelling job
still reports each conversion (action "converted"), so that nothing happens to the data silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from ..issues import RecordIssue, RecordProblem

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Record:
    """One question about one image.

    Attributes:
        index: position among the usable records of the file (0, 1, ...): the stable key used to
            resume a run and to split records between processes.
        question_id: the record's id as the file gives it (as a string).
        image: image path relative to the image root, as the file gives it.
        question: the question text sent to the model.
        file: the input file.
        line: the line the record starts on (1-based).
    """

    index: int
    question_id: str
    image: str
    question: str
    file: str
    line: int


def read_records(path: str | Path) -> tuple[list[Record], list[RecordIssue]]:
    """All usable records of ``path``, and an issue for every unusable one, in file order.

    Raises:
        OSError: the file cannot be read at all.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    records: list[Record] = []
    issues: list[RecordIssue] = []
    for line, item in _json_items(text, str(path), issues):
        question_id = _question_id(item)
        try:
            image, question = _parse(item)
        except RecordProblem as problem:
            issues.append(RecordIssue(str(path), line, str(problem), question_id))
            continue
        records.append(Record(len(records), question_id if question_id is not None else f"{path.name}:{line}",
                              image, question, str(path), line))
    return records, issues


def _json_items(text: str, file: str, issues: list[RecordIssue]) -> Iterator[tuple[int, Any]]:
    """(line, decoded value) for every element of a JSON array or every line of JSON lines."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _array_items(text, file, issues)
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            issues.append(RecordIssue(file, number, f"unreadable line: {exc.msg} at column {exc.colno}"))


def _array_items(text: str, file: str, issues: list[RecordIssue]) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array with the line each starts on. A syntax error ends the file (a JSON
    array cannot be resynchronised); the rest of the file becomes one issue."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line = 1 + text.count("\n", 0, position)

    def skip(chars: str) -> None:
        nonlocal position, line
        while position < len(text) and text[position] in chars:
            if text[position] == "\n":
                line += 1
            position += 1

    while True:
        skip(" \t\r\n")
        if position < len(text) and text[position] == "]":
            return
        start_line = line
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            issues.append(RecordIssue(file, exc.lineno, f"unreadable JSON ({exc.msg} at column {exc.colno}); "
                                                        f"the rest of the array is skipped"))
            return
        line += text.count("\n", position, end)
        position = end
        yield start_line, item
        skip(" \t\r\n")
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            issues.append(RecordIssue(file, line, "unreadable JSON (expected ',' or ']' after an element); "
                                                  "the rest of the array is skipped"))
            return


def _question_id(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    value = item.get("question_id", item.get("id"))
    return None if value is None else str(value)


def _parse(item: Any) -> tuple[str, str]:
    """(image, question) of a LLaVA or plain record."""
    if not isinstance(item, dict):
        raise RecordProblem(f"expected a JSON object, got {type(item).__name__}")
    if "conversations" in item:
        question = _first_human_turn(item["conversations"])
    elif "text" in item:
        question = item["text"]
        if not isinstance(question, str):
            raise RecordProblem(f"'text' must be a string, got {type(question).__name__}")
    else:
        raise RecordProblem("neither a LLaVA record (with 'conversations') nor a plain record (with 'text')")
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:
        raise RecordProblem("empty question")
    image = item.get("image")
    if image is None:
        raise RecordProblem("no image (text-only record)")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str) or not image.strip():
        raise RecordProblem(f"'image' must be one image path, got {image!r}")
    return image, question


def _first_human_turn(conversations: Any) -> str:
    if not isinstance(conversations, list):
        raise RecordProblem(f"'conversations' must be a list, got {type(conversations).__name__}")
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "human":
            value = turn.get("value")
            if not isinstance(value, str):
                raise RecordProblem(f"the first human turn's 'value' must be a string, got {type(value).__name__}")
            return value
    raise RecordProblem("no human turn in 'conversations'")


def open_record_image(root: str | Path, record: Record) -> tuple[Image.Image | None, str | RecordIssue]:
    """``(RGB image, the mode it was stored in)``, or ``(None, the issue saying why the record's
    image cannot be used)``."""
    try:
        return open_rgb_image(root, record.image)
    except RecordProblem as problem:
        return None, RecordIssue(record.file, record.line, str(problem), record.question_id)


def open_rgb_image(root: str | Path, image: str) -> tuple[Image.Image, str]:
    """The image ``root / image``, fully decoded and in RGB, and the mode it was stored in.

    Raises:
        RecordProblem: the file is missing, unreadable, truncated or not an image.
    """
    path = Path(root) / image
    if not path.is_file():
        raise RecordProblem(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            mode = opened.mode
            image = opened.convert("RGB") if mode != "RGB" else opened.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RecordProblem(f"corrupt or unreadable image: {path} ({exc})") from None
    return image, mode
