"""The authors' pseudo-label pickle as label shards, ready for ``sdrpn train`` (``sdrpn import-labels``).

Their release (YuHengsss/SD-RPN commit 00876ac) ships its labelling run as one pickle, a list of
dicts written by ``LLaVA/llava/eval/model_vqa_label.py`` (~133-186):

* ``question_id`` (a string), ``image`` (a path below their dataset folder), ``prompt`` (the
  question, with the dataset's answer-format suffix), ``text`` (the model's own greedy answer);
* ``sink_attn``: 576 float16 values, the attention from the answer tokens to the image tokens,
  averaged over those tokens and over all heads of layer 2 (7B; their 13B uses heads 17 and 22 of
  layer 16);
* ``grounding_attn_o2i``: 576 float16 values, the same from heads 13, 24 and 26 of layer 14 (7B),
  with the sink tokens already zeroed by the script (the in-place ``*=`` at ~142-143);
* ``grounding_attn_q2i``: the same from the question tokens; their training never reads it.

Their training derives the labels when it loads a sample (``LLaVA/llava/train/train.py:832-842``,
``create_pseudo_labels`` in ``LLaVA/llava/mm_utils.py:350-457``): sinks are the tokens with
``sink_attn >= 1e-3``; on the grounding with the sinks zeroed, foreground above 0.2 of the peak,
background below 0.1 of the peak outside the foreground box, and the whole sample ignored when that
box covers half the grid or more. That is :func:`sdrpn.distill.labels.assign_labels` with those
settings, which computes them here once, in float64 as their numpy code does.

The output is what ``sdrpn label`` writes (:mod:`sdrpn.distill.shards`): atomic shards, ``index.jsonl``,
``issues.jsonl`` and ``run.json`` (the source pickle and its digest, the label settings, the
``vicuna_v1`` prompt and the pad-to-square view the maps were read with). A record that cannot be
used is reported with its position and reason and skipped. Rerun into the same directory, the
import resumes: records already in a shard are kept, the rest are written; another pickle, grid or
image root there is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..distill.label_job import ISSUES_NAME, SETTINGS_FORMAT, SETTINGS_NAME, stuck_foreground_warning
from ..distill.labels import assign_labels, is_valid
from ..distill.records import RecordProblem
from ..issues import issues_summary, report_issue
from ..distill.shards import (atomic_write, completed_records, next_sequence, remove_temporary_files, shard_name,
                              write_index, write_shard)
from ..errors import UserError
from ..prompts import template_named
from . import AUTHORS_GEOMETRY, AUTHORS_TEMPLATE
from .safe_pickle import load_data_pickle

__all__ = ["import_labels", "ImportSummary", "AUTHORS_LABEL_RULES", "AUTHORS_SINK_THRESHOLD", "AUTHORS_GRID"]

AUTHORS_SINK_THRESHOLD = 1e-3  # train.py:785 roi_sink_threshold
AUTHORS_LABEL_RULES = {"tau_fg": 0.2,         # train.py:786 roi_binary_coeff
                       "tau_bg": 0.1,         # mm_utils.py:350 bg_coff
                       "max_box_frac": 0.5,   # mm_utils.py:350 max_ratio_limit
                       "min_peak": 0.0, "blur_box": False}
AUTHORS_GRID = (24, 24)
MAP_KEYS = ("sink_attn", "grounding_attn_o2i")
TEXT_KEYS = ("image", "prompt", "text")
SOURCE_FORMAT = "sd-rpn-authors-pickle"


@dataclass(frozen=True)
class AuthorsSample:
    """One usable record: its position in the pickle, texts, and float64 maps of H*W values."""

    record: int
    question_id: str
    image: str
    question: str
    answer: str
    sink_attn: np.ndarray
    grounding: np.ndarray


@dataclass(frozen=True)
class SkippedRecord:
    """A pickle record that was skipped; summarised with the other commands' issues
    (:func:`sdrpn.issues.issues_summary`)."""

    record: int
    question_id: str | None
    reason: str
    action = "skipped"  # not a field: issues.jsonl holds record, question_id and reason

    def __str__(self) -> str:
        ident = f" (question_id {self.question_id})" if self.question_id is not None else ""
        return f"record {self.record}{ident}: skipped: {self.reason}"


@dataclass
class ImportSummary:
    """What one import did; ``total_*`` count the whole output directory."""

    imported: int = 0
    valid: int = 0
    already_done: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    total_samples: int = 0
    total_valid: int = 0
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"imported {self.imported} samples in this run ({self.valid} with valid labels); "
                 f"{self.already_done} were already done",
                 f"output: {self.total_samples} samples, {self.total_valid} with valid labels"]
        skipped = issues_summary(self.skipped)
        if skipped:
            lines.append(f"{skipped} (listed in {ISSUES_NAME})")
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


def read_sample(position: int, item, grid: tuple[int, int], image_root: Path | None) -> AuthorsSample:
    """The sample of record ``position``.

    Raises:
        RecordProblem: "kind: detail" of what makes the record unusable.
    """
    if not isinstance(item, dict):
        raise RecordProblem(f"not a record: expected a dict, got {type(item).__name__}")
    missing = [key for key in ("question_id", *TEXT_KEYS, *MAP_KEYS) if key not in item]
    if missing:
        raise RecordProblem(f"missing keys: {', '.join(missing)}")
    for key in TEXT_KEYS:
        if not isinstance(item[key], str) or (key != "text" and not item[key].strip()):
            raise RecordProblem(f"bad text: '{key}' must be a{' non-empty' if key != 'text' else ''} string, "
                                f"got {item[key]!r:.40}")
    if image_root is not None and not (image_root / item["image"]).is_file():
        raise RecordProblem(f"image not found: {image_root / item['image']}")
    sink_attn, grounding = (attention_map(item[key], key, grid) for key in MAP_KEYS)
    return AuthorsSample(position, str(item["question_id"]), item["image"], item["prompt"], item["text"],
                         sink_attn, grounding)


def attention_map(value, key: str, grid: tuple[int, int]) -> np.ndarray:
    """A stored attention map as float64 (exact for their float16), flattened row-major like their
    ``.flatten()``; the shapes they write, finite, and within [0, 1] as attention weights are."""
    height, width = grid
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise RecordProblem(f"not numbers: {key} is a list of something else") from None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise RecordProblem(f"not numbers: {key} is {getattr(value, 'dtype', type(value).__name__)}")
    if value.shape not in ((height * width,), (height, width)):
        raise RecordProblem(f"wrong shape: {key} has shape {value.shape}, expected ({height * width},) or "
                            f"({height}, {width}) for the {height}x{width} grid")
    values = value.astype(np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise RecordProblem(f"NaN or infinite values: {key}")
    if values.min() < 0.0 or values.max() > 1.0:
        raise RecordProblem(f"values outside [0, 1]: {key} spans [{values.min():.3g}, {values.max():.3g}], "
                            f"not attention weights")
    return values


def label_tensors(samples: list[AuthorsSample], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``grounding`` (n, H, W), ``sink`` and ``labels`` of ``samples`` by the authors' rule."""
    grounding = torch.from_numpy(np.stack([sample.grounding for sample in samples]))
    # Their sink rule (mm_utils.py:377, 383) on the head mean they stored; float64 gives the same
    # comparisons as their float16 arrays against 1e-3 (no float16 lies between 1e-3 and its rounding).
    sink = torch.from_numpy(np.stack([sample.sink_attn for sample in samples])) >= AUTHORS_SINK_THRESHOLD
    labels = assign_labels(grounding, sink, grid, **AUTHORS_LABEL_RULES)
    return {"grounding": grounding.view(-1, *grid), "sink": sink.view(-1, *grid), "labels": labels}


# ------------------------------------------------------------------------------------------------
# The import
# ------------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_settings(pickle_path: Path, records: int, grid: tuple[int, int], image_root: Path | None) -> dict:
    """``run.json`` of an import: what a resumed import must share, and what ``sdrpn train`` reads
    (``image_root``, the label rules under ``options``)."""
    settings = {"format": SETTINGS_FORMAT,
                "source": {"format": SOURCE_FORMAT, "pickle": str(pickle_path.resolve()),
                           "sha256": file_digest(pickle_path), "records": records},
                "grid": list(grid),
                # how the maps were read, for sdrpn train to read the images the same way
                "prompt": template_named(AUTHORS_TEMPLATE).to_dict(), "geometry": AUTHORS_GEOMETRY,
                "options": {**AUTHORS_LABEL_RULES, "sink_threshold": AUTHORS_SINK_THRESHOLD, "source": SOURCE_FORMAT}}
    if image_root is not None:
        settings["image_root"] = str(image_root.resolve())
    return settings


def check_settings(out_dir: Path, settings: dict) -> None:
    """Record the import's settings, or refuse an output directory written with others."""
    path = out_dir / SETTINGS_NAME
    if not path.exists():
        atomic_write(path, (json.dumps(settings, indent=1) + "\n").encode())
        return
    found = json.loads(path.read_text())
    if found != settings:
        changed = sorted(key for key in set(found) | set(settings) if found.get(key) != settings.get(key))
        raise UserError(f"{out_dir} holds labels made from another source or with other settings (changed: "
                        f"{', '.join(changed)}); pass another --out, or delete it to start over")


def import_labels(pickle_path: str | Path, out_dir: str | Path, grid: tuple[int, int] = AUTHORS_GRID,
                  image_root: str | Path | None = None, shard_size: int = 256, progress: bool = True) -> ImportSummary:
    """Import the authors' pseudo-label pickle into ``out_dir``; see the module docstring.

    Raises:
        RefusedPickle: the pickle names a global other than plain data and numpy arrays.
        UserError: it does not hold a list, or ``out_dir`` holds another import.
    """
    from tqdm import tqdm

    pickle_path, out_dir = Path(pickle_path), Path(out_dir)
    image_root = Path(image_root) if image_root is not None else None
    items = load_data_pickle(pickle_path)
    if not isinstance(items, list):
        raise UserError(f"{pickle_path} holds {type(items).__name__}, expected a list of records (dicts with "
                        f"question_id, image, prompt, text, {', '.join(MAP_KEYS)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out_dir)
    check_settings(out_dir, import_settings(pickle_path, len(items), grid, image_root))

    done = completed_records(out_dir)
    summary = ImportSummary(already_done=len(done))
    sequence = next_sequence(out_dir, 0)
    pending: list[AuthorsSample] = []

    def flush() -> None:
        nonlocal sequence
        tensors = label_tensors(pending, grid)
        valid = is_valid(tensors["labels"]).tolist()
        rows = [{"record": s.record, "question_id": s.question_id, "image": s.image, "question": s.question,
                 "answer": s.answer, "valid": v} for s, v in zip(pending, valid)]
        write_shard(out_dir / shard_name(0, sequence), tensors, rows)
        sequence += 1
        summary.imported += len(rows)
        summary.valid += sum(valid)
        pending.clear()

    bar = tqdm(total=len(items), unit="record", desc="import", disable=not progress, dynamic_ncols=True)
    for position, item in enumerate(items):
        bar.update()
        if position in done:
            continue
        try:
            pending.append(read_sample(position, item, grid, image_root))
        except RecordProblem as problem:
            question_id = item.get("question_id") if isinstance(item, dict) else None
            issue = SkippedRecord(position, None if question_id is None else str(question_id), str(problem))
            summary.skipped.append(issue)
            report_issue("import-labels", issue, bar.write)
            continue
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    bar.close()

    rows = completed_records(out_dir)
    write_index(out_dir, rows.values())
    atomic_write(out_dir / ISSUES_NAME, "".join(json.dumps(asdict(issue)) + "\n" for issue in summary.skipped).encode())
    summary.total_samples = len(rows)
    summary.total_valid = sum(row["valid"] for row in rows.values())
    stuck = stuck_foreground_warning(out_dir, list(rows.values()))
    summary.warnings = [stuck] if stuck else []
    return summary
