"""How well a RoI finds the region a question is about: box IoU with the ground-truth boxes of the
synthetic testbed, for pseudo-labels (on the grid) and for the engine's RoIs (in source pixels).

Every RoI is reduced to the box enclosing all of it, in source pixels; a question without any RoI
scores 0. The same rule for labels, RPN maps and raw attention keeps them comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["box_iou", "enclosing_box", "prediction_ious", "label_ious", "mean", "random_zoom_bound"]

Box = Sequence[float]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1)`` boxes (0 when either is empty)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def enclosing_box(boxes: Iterable[Box]) -> tuple[float, float, float, float] | None:
    """The box enclosing all ``boxes``, or None when there are none."""
    boxes = list(boxes)
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _iou_or_zero(boxes: Iterable[Box], truth: Box) -> float:
    region = enclosing_box(boxes)
    return 0.0 if region is None else box_iou(region, truth)


def prediction_ious(records: Sequence[dict], truths: dict[str, Box]) -> dict[str, float]:
    """question id -> IoU of a method's RoI (the ``boxes`` of its ``sdrpn eval`` predictions, in
    source pixels) with the ground truth; questions without a ground-truth box are left out."""
    return {str(r["question_id"]): _iou_or_zero(r.get("boxes") or [], truths[str(r["question_id"])])
            for r in records if str(r["question_id"]) in truths}


def _cover_chance(box: Box, size: tuple[int, int]) -> float:
    """At most the chance that a box of ``box``'s size, placed uniformly at random inside an image of
    ``size``, covers a given point: per axis, an extent ``e`` of ``E`` covers it for at most ``e`` of
    the ``E - e`` positions."""
    chance = 1.0
    for extent, total in ((box[2] - box[0], size[0]), (box[3] - box[1], size[1])):
        chance *= 1.0 if extent >= total / 2 else extent / (total - extent)
    return chance


def random_zoom_bound(records: Sequence[dict], sizes: dict[str, tuple[int, int]]) -> float | None:
    """The most a random zoom with a method's RoI sizes could gain over the baseline: the mean chance
    that a box the size of each question's RoI, at a random place, covers the detail, as if every
    covered number were read. A gain above it needs the RoI to be in the right place."""
    chances = [0.0 if (region := enclosing_box(r.get("boxes") or [])) is None
               else _cover_chance(region, sizes[str(r["question_id"])])
               for r in records if str(r["question_id"]) in sizes]
    return mean(chances)


def _foreground_box(labels: torch.Tensor) -> tuple[int, int, int, int] | None:
    rows, cols = torch.nonzero(labels == 1, as_tuple=True)
    if rows.numel() == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def label_ious(label_dir: str | Path, geometry, truths: dict[str, Box], image_root: str | Path) -> dict[str, float]:
    """question id -> IoU of each valid pseudo-label's foreground box (mapped from the grid to source
    pixels through the processor's geometry) with the ground truth."""
    from PIL import Image

    from ..distill.shards import read_index, read_shard

    label_dir, image_root = Path(label_dir), Path(image_root)
    shards: dict[str, dict] = {}
    ious = {}
    for row in read_index(label_dir):
        question_id = str(row["question_id"])
        if not row["valid"] or question_id not in truths:
            continue
        if row["shard"] not in shards:
            shards[row["shard"]] = read_shard(label_dir / row["shard"])[0]
        labels = shards[row["shard"]]["labels"][row["row"]]
        cells = _foreground_box(labels)
        with Image.open(image_root / row["image"]) as image:  # the header only: the size
            size = image.size
        region = None if cells is None else geometry.transform(size).grid_to_source(cells, tuple(labels.shape))
        ious[question_id] = 0.0 if region is None else box_iou(region, truths[question_id])
    return ious


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
