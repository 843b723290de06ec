"""The second view against the authors' rules: upscaling mode, region, crop rectangle, kept tokens.

Each rule is transcribed here from the authors' release (YuHengsss/SD-RPN commit 00876ac), written
independently of ``sdrpn.roi``:

* mode (``get_batched_sub_images``, ``LLaVA/llava/mm_utils.py`` ~917-921 with ``upscale_method =
  'mask'`` from ``lmms-eval/lmms_eval/models/llava.py`` ~115): fewer than two boxes from
  ``get_bbox_from_noisy_map`` -> box upscaling of the one box (none without a box); two or more ->
  masked upscaling;
* masked region (~945-952 and ``get_foreground_bbox_torch`` ~461-496): the box around every cell of
  the thresholded map;
* crop rectangle (``get_bbox4src``, ``LLaVA/llava/ana_utils.py`` ~681-740): grid -> view pixels ->
  minus the padding, divided by the resize ratio, in float32 tensors; clamped; ``.long()``;
* kept tokens (~952-963): the thresholded map cut to the region, bilinear-resized to 24 x 24
  (``align_corners=False``), above 0.5. The transcription evaluates the resize in exact fractions;
  their float kernel differs only at exact ties (a value of exactly 0.5), checked below too.

At least 300 maps (or boxes) per rule, random and adversarial.
"""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdrpn.models.geometry import ImageGeometry
from sdrpn.roi import (
    MODE_BOX,
    MODE_MASK,
    MODE_NONE,
    RoIOptions,
    SourceImages,
    grid_box_crops,
    propose,
    roi_token_keep,
)
from test_authors_rules import authors_boxes

GRID = (24, 24)
VIEW = 336
SIZES = [(336, 336), (500, 375), (375, 500), (640, 427), (1024, 768), (2000, 200), (200, 2000), (31, 17),
         (17, 31), (4000, 3000), (999, 1001), (3, 500), (777, 333), (1, 1), (1280, 720)]


# ------------------------------------------------------------------------------------------------
# The authors' rules


def authors_mode(mask: np.ndarray) -> tuple[str, list[int] | None]:
    """(mode, grid box of the second view) as their inference decides it."""
    boxes = authors_boxes(mask)
    if not boxes:
        return "none", None
    if len(boxes) == 1:
        return "box", boxes[0]
    rows, cols = np.nonzero(mask)
    return "mask", [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def authors_source_box(grid_box, image_size) -> list[int]:
    """``get_bbox4src`` for one box: float32 tensor arithmetic with Python-float scalars."""
    width, height = image_size
    box = torch.tensor([grid_box], dtype=torch.float32)
    box[:, 0::2] *= VIEW / GRID[1]
    box[:, 1::2] *= VIEW / GRID[0]
    ratio = min(VIEW / width, VIEW / height)
    box[:, 0::2] -= (VIEW - int(width * ratio)) / 2
    box[:, 1::2] -= (VIEW - int(height * ratio)) / 2
    box = box / ratio
    box[:, 0::2] = torch.clamp(box[:, 0::2], min=0, max=width)
    box[:, 1::2] = torch.clamp(box[:, 1::2], min=0, max=height)
    return box.long()[0].tolist()


def authors_resized(mask: np.ndarray, region) -> np.ndarray:
    """(24, 24) exact values of the mask cut to the region, resized bilinearly to 24 x 24 (half-pixel
    centres, clamped edges) as ``interpolate(mode="bilinear", align_corners=False)`` defines it."""
    x0, y0, x1, y1 = region
    cut = mask[y0:y1, x0:x1].astype(int)

    def source(i, length, out):
        position = max(Fraction(length, out) * (i + Fraction(1, 2)) - Fraction(1, 2), Fraction(0))
        low = min(int(position), length - 1)
        high = low + 1 if low < length - 1 else low
        fraction = min(max(position - low, Fraction(0)), Fraction(1))
        return low, high, fraction

    values = np.empty(GRID, dtype=object)
    for row in range(GRID[0]):
        r0, r1, fy = source(row, cut.shape[0], GRID[0])
        for col in range(GRID[1]):
            c0, c1, fx = source(col, cut.shape[1], GRID[1])
            top = (1 - fx) * cut[r0, c0] + fx * cut[r0, c1]
            bottom = (1 - fx) * cut[r1, c0] + fx * cut[r1, c1]
            values[row, col] = (1 - fy) * top + fy * bottom
    return values


def authors_kept_tokens(mask: np.ndarray, region) -> np.ndarray:
    """(24 * 24,) bool: the tokens they keep, those whose resized value is above 0.5."""
    return (authors_resized(mask, region) > Fraction(1, 2)).reshape(-1).astype(bool)


# ------------------------------------------------------------------------------------------------
# Maps


def _maps(count: int, seed: int) -> np.ndarray:
    """Thresholded maps: random blobs of every size, scattered cells, dense noise, border cases."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((count, *GRID), dtype=bool)
    for index in range(count):
        kind = index % 4
        if kind == 0:  # a few rectangles of any size, some touching the borders
            for _ in range(rng.integers(0, 6)):
                h, w = rng.integers(1, 13, size=2)
                y, x = rng.integers(0, GRID[0] - h + 1), rng.integers(0, GRID[1] - w + 1)
                maps[index, y:y + h, x:x + w] = True
        elif kind == 1:  # scattered small components (areas 1-3 grow, 1 is dropped)
            maps[index] = rng.random(GRID) < rng.uniform(0.01, 0.08)
        elif kind == 2:  # dense noise: many components, some too large
            maps[index] = rng.random(GRID) < rng.uniform(0.2, 0.7)
        else:  # two small components, one in a corner or on the last row/column
            maps[index, rng.integers(0, 24), 23] = True
            maps[index, rng.integers(0, 23), 23] = True
            y, x = rng.integers(0, 22, size=2)
            maps[index, y:y + 2, x:x + rng.integers(1, 3)] = True
    return maps


def _propose(maps: np.ndarray):
    """Our proposal on exact masks (no blur: the blur and threshold are checked elsewhere)."""
    logits = torch.from_numpy(np.where(maps, 20.0, -20.0)).float()
    return propose(logits, GRID, RoIOptions(blur=False, threshold=0.5, max_components=GRID[0] * GRID[1] // 4))


# ------------------------------------------------------------------------------------------------
# Rules


def test_mode_and_region_follow_the_authors():
    maps = _maps(400, seed=0)
    proposal = _propose(maps)
    names = {MODE_NONE: "none", MODE_BOX: "box", MODE_MASK: "mask"}
    seen = set()
    for index, mask in enumerate(maps):
        mode, region = authors_mode(mask)
        seen.add(mode)
        assert names[int(proposal.mode[index])] == mode, index
        if region is not None:
            assert proposal.region[index].tolist() == region, index
    assert seen == {"none", "box", "mask"}


def test_kept_tokens_follow_the_authors():
    maps = _maps(400, seed=1)
    proposal = _propose(maps)
    keep = roi_token_keep(proposal, GRID)
    masked = 0
    for index, mask in enumerate(maps):
        mode, region = authors_mode(mask)
        if mode == "mask":
            masked += 1
            assert np.array_equal(keep[index].numpy(), authors_kept_tokens(mask, region)), index
        else:
            assert bool(keep[index].all()) == (mode == "box") and bool(keep[index].any()) == (mode == "box")
    assert masked >= 150


def test_their_float_resize_differs_only_at_exact_ties():
    """``F.interpolate`` in float32 (what their code calls) against the exact fractions: any
    disagreement is a token whose exact value is 0.5, which float rounding settles either way."""
    maps = _maps(300, seed=2)
    ties = 0
    for mask in maps:
        mode, region = authors_mode(mask)
        if mode != "mask":
            continue
        x0, y0, x1, y1 = region
        cut = torch.from_numpy(mask[y0:y1, x0:x1]).float()[None, None]
        float_keep = (F.interpolate(cut, size=GRID, mode="bilinear", align_corners=False) > 0.5)[0, 0].numpy()
        exact = authors_resized(mask, region)
        for row, col in zip(*np.nonzero(float_keep != (exact > Fraction(1, 2)))):
            assert exact[row, col] == Fraction(1, 2)
            ties += 1
    assert ties < 40  # rare: a handful of tokens over hundreds of maps


@pytest.mark.parametrize("size", SIZES)
def test_crop_rectangles_follow_the_authors_in_pad_geometry(size):
    geometry = ImageGeometry(mode="pad", input_size=(VIEW, VIEW), shortest_edge=VIEW)
    rng = np.random.default_rng(size[0] * 7 + size[1])
    boxes = []
    for _ in range(24):
        x0, y0 = rng.integers(0, 24, size=2)
        x1, y1 = rng.integers(x0 + 1, 25), rng.integers(y0 + 1, 25)
        boxes.append([int(x0), int(y0), int(x1), int(y1)])
    boxes += [[0, 0, 24, 24], [0, 0, 1, 1], [23, 23, 24, 24], [11, 0, 13, 24], [0, 11, 24, 13]]
    sources = SourceImages.from_pil([Image.new("RGB", size)] * len(boxes), geometry, "cpu")
    crops = grid_box_crops(torch.tensor(boxes), sources, geometry, GRID)
    for box, (x0, y0, width, height) in zip(boxes, crops.tolist()):
        ax0, ay0, ax1, ay1 = authors_source_box(box, size)
        if ax1 > ax0 and ay1 > ay0:
            assert [x0, y0, x0 + width, y0 + height] == [ax0, ay0, ax1, ay1], box
        else:  # their crop would be empty (a box in the padding): ours keeps one pixel at the same place
            assert width >= 1 and height >= 1 and x0 <= max(ax0, 0) and y0 <= max(ay0, 0)


@pytest.mark.parametrize("size", SIZES)
def test_crop_rectangles_in_crop_geometry_cover_the_exact_source_box(size):
    """llava-hf's centre crop (which the authors never use): the same float32 form with the crop's
    exact offset and scale, so each edge is the exact source coordinate truncated, within float32
    rounding."""
    geometry = ImageGeometry(mode="crop", input_size=(VIEW, VIEW), shortest_edge=VIEW)
    rng = np.random.default_rng(size[0] + 3 * size[1])
    boxes = [[int(v) for v in (x0, y0, rng.integers(x0 + 1, 25), rng.integers(y0 + 1, 25))]
             for x0, y0 in rng.integers(0, 24, size=(24, 2))]
    sources = SourceImages.from_pil([Image.new("RGB", size)] * len(boxes), geometry, "cpu")
    crops = grid_box_crops(torch.tensor(boxes), sources, geometry, GRID).tolist()
    transform = geometry.transform(size)
    for box, (x0, y0, width, height) in zip(boxes, crops):
        exact = transform.grid_to_source(box, GRID)
        for start, extent, (want_start, want_end) in ((x0, width, exact[0::2]), (y0, height, exact[1::2])):
            assert abs(start - int(want_start)) <= 1 and start <= want_start + 1e-3, (box, exact)
            if int(want_end) <= start:  # under a pixel: one pixel is kept
                assert extent == 1, (box, exact)
            else:
                assert abs(start + extent - int(want_end)) <= 1 and start + extent <= want_end + 1e-3, (box, exact)
