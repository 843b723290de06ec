"""Crash-safe label shards and their index.

A labelling run writes its output directory as:

* ``shard-r<rank>-<seq>.safetensors``: ``grounding`` (n, H, W) float16, ``sink`` (n, H, W) bool
  and ``labels`` (n, H, W) int8 (1 fg, 0 bg, -100 ignore) for n samples, and where the labelling view
  has cells without image (Qwen2.5-VL's grey square) or the label rules use them, ``padding``
  (n, H, W) bool: those cells, for whatever re-derives the labels. The shard's metadata
  holds the samples' index rows as JSON, so a shard is self-describing: the index can always be
  rebuilt from the shards alone.
* ``index.jsonl``: one line per sample, in input order: ``question_id, image, question, answer,
  valid, shard, row`` (plus ``record``, the sample's position in the input).

Every file is written to a temporary name, flushed to disk and renamed over its final name
(:func:`atomic_write`), so a process killed at any moment leaves either the complete old file or
the complete new one. A shard therefore either exists whole or not at all; a resumed run skips the
records found in existing shards (:func:`completed_records`) and so never duplicates a sample.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

FORMAT = "sdrpn-labels/1"
INDEX_NAME = "index.jsonl"
SHARD_PATTERN = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")
TEMPORARY_MARK = ".tmp-"
TENSOR_DTYPES = {"grounding": torch.float16, "sink": torch.bool, "labels": torch.int8}
# Tensors a shard may hold besides those (older shards and LLaVA's views have none of them).
OPTIONAL_TENSOR_DTYPES = {"padding": torch.bool}


class ShardError(RuntimeError):
    """A shard or an index that is not what a labelling run writes."""


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}{TEMPORARY_MARK}{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (directories cannot be opened for fsync on every platform)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def remove_temporary_files(directory: str | Path) -> list[Path]:
    """Delete the leftovers of interrupted writes; returns what was removed."""
    removed = [path for path in Path(directory).iterdir() if TEMPORARY_MARK in path.name]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def shard_name(rank: int, sequence: int) -> str:
    return f"shard-r{rank:03d}-{sequence:06d}.safetensors"


def shard_paths(directory: str | Path) -> list[Path]:
    """The shards of ``directory``, in (rank, sequence) order."""
    found = []
    for path in Path(directory).iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [path for _, path in sorted(found)]


def next_sequence(directory: str | Path, rank: int) -> int:
    """The first unused shard number of ``rank`` in ``directory``."""
    used = [int(SHARD_PATTERN.match(path.name).group(2)) for path in shard_paths(directory)
            if int(SHARD_PATTERN.match(path.name).group(1)) == rank]
    return max(used, default=-1) + 1


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor], rows: list[dict]) -> None:
    """Atomically write one shard: ``tensors`` (see :data:`TENSOR_DTYPES`, and optionally
    :data:`OPTIONAL_TENSOR_DTYPES`) and their index rows."""
    if not _known_tensors(tensors):
        raise ValueError(f"a shard holds exactly {sorted(TENSOR_DTYPES)} (and optionally "
                         f"{sorted(OPTIONAL_TENSOR_DTYPES)}), got {sorted(tensors)}")
    for name, tensor in tensors.items():
        if tensor.shape[0] != len(rows):
            raise ValueError(f"{name} has {tensor.shape[0]} samples for {len(rows)} index rows")
    dtypes = {**TENSOR_DTYPES, **OPTIONAL_TENSOR_DTYPES}
    converted = {name: tensors[name].detach().to("cpu", dtypes[name]).contiguous() for name in tensors}
    atomic_write(path, save(converted, metadata={"format": FORMAT, "rows": json.dumps(rows)}))


def read_shard(path: str | Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The tensors and index rows of a shard written by :func:`write_shard`."""
    path = Path(path)
    data = path.read_bytes()
    try:
        tensors = load(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise ShardError(f"{path}: not a label shard ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise ShardError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    rows = json.loads(metadata["rows"])
    if not _known_tensors(tensors) or any(t.shape[0] != len(rows) for t in tensors.values()):
        raise ShardError(f"{path}: tensors {sorted(tensors)} do not match its {len(rows)} index rows")
    return tensors, rows


def _known_tensors(tensors: dict) -> bool:
    """Whether a shard's tensor names are the required ones plus optional ones only."""
    names = set(tensors)
    return set(TENSOR_DTYPES) <= names <= set(TENSOR_DTYPES) | set(OPTIONAL_TENSOR_DTYPES)


def read_shard_rows(path: str | Path) -> list[dict]:
    """Only the index rows of a shard (reads the small header, not the tensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable shard header ({exc})") from None
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != FORMAT:
        raise ShardError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    return json.loads(metadata["rows"])


def _metadata(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {})


def completed_records(directory: str | Path) -> dict[int, dict]:
    """Index rows (with ``shard`` and ``row`` filled in) of every sample already in a shard,
    by record position.

    Raises:
        ShardError: a record is in two shards (the directory was written by two runs at once).
    """
    done: dict[int, dict] = {}
    for path in shard_paths(directory):
        for position, row in enumerate(read_shard_rows(path)):
            record = row["record"]
            if record in done:
                raise ShardError(f"record {record} is in both {done[record]['shard']} and {path.name}")
            done[record] = {**row, "shard": path.name, "row": position}
    return done


def write_index(directory: str | Path, rows: Iterable[dict]) -> Path:
    """Atomically write ``index.jsonl`` from ``rows``, sorted by record position."""
    path = Path(directory) / INDEX_NAME
    ordered = sorted(rows, key=lambda row: row["record"])
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered).encode())
    return path


def read_index(directory: str | Path) -> list[dict]:
    """The rows of ``index.jsonl`` in ``directory``."""
    path = Path(directory) / INDEX_NAME
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
