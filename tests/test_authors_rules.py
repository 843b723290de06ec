"""Our connected components and component boxes against the authors' own rules, box for box.

``authors_boxes`` below transcribes the part of ``get_bbox_from_noisy_map`` that follows the
threshold in the authors' release (YuHengsss/SD-RPN commit 00876ac, ``LLaVA/llava/ana_utils.py``
~769-808, called with ``min_area=4, max_area=15 * 15`` from ``LLaVA/llava/mm_utils.py`` ~922-924):
8-connected labels from scikit-image, then per label in order: a single cell is skipped, a
component of fewer than 4 cells gets its box grown by their rule, one of more than 225 cells is
skipped, and every other box is kept as it is. It is written independently of our implementation,
in plain NumPy and Python floats, as they compute it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import skimage.measure
import torch

import sdrpn.ops
from sdrpn.ops import testing

SIDE = 24  # the LLaVA-1.5 token grid
SLOTS = SIDE * SIDE // 4  # 8-connected components are at least one cell apart: at most 144


# ------------------------------------------------------------------------------------------------
# The authors' rules


def _authors_growth(lo: int, hi: int, extent: int) -> tuple[int, int]:
    """Their growth of a small component's [lo, hi) along one axis; int() truncates toward zero."""
    centre = (lo + hi) / 2
    wanted = max(3, hi - lo + 1)
    return max(0, int(centre - wanted / 2)), min(extent - 1, int(centre + wanted / 2))


def authors_boxes(mask: np.ndarray) -> list[list[int]]:
    """[x0, y0, x1, y1) boxes of one thresholded map, in label order, as the authors compute them."""
    height, width = mask.shape
    labelled, count = skimage.measure.label(mask, connectivity=2, return_num=True)
    boxes = []
    for value in range(1, count + 1):
        rows, cols = np.nonzero(labelled == value)
        area = rows.size
        x0, x1 = int(cols.min()), int(cols.max()) + 1
        y0, y1 = int(rows.min()), int(rows.max()) + 1
        if area == 1:  # noise and sinks
            continue
        if area < 4:
            x0, x1 = _authors_growth(x0, x1, width)
            y0, y1 = _authors_growth(y0, y1, height)
        if area > 225:
            continue
        boxes.append([x0, y0, x1, y1])
    return boxes


# ------------------------------------------------------------------------------------------------
# Masks: random, tiny components everywhere, every small shape at every border, huge components


def _random_density_masks(rng: np.random.Generator) -> np.ndarray:
    densities = rng.uniform(0.02, 0.9, size=(160, 1, 1))
    return rng.random((160, SIDE, SIDE)) < densities


def _small_shapes() -> list[np.ndarray]:
    """Every 8-connected shape of 1 to 3 cells, cropped to its box: lines, diagonals and bends."""
    shapes = {}
    for size in (1, 2, 3):
        for cells in itertools.combinations(range(9), size):
            window = np.zeros(9, bool)
            window[list(cells)] = True
            window = window.reshape(3, 3)
            if skimage.measure.label(window, connectivity=2).max() != 1:
                continue
            rows, cols = np.nonzero(window)
            shape = window[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            shapes[shape.tobytes() + bytes(shape.shape)] = shape
    return list(shapes.values())


def _offsets(length: int) -> list[int]:
    """Start positions that touch the near border, sit one cell inside it, the middle, and the far
    border likewise (where the authors' end clamp bites)."""
    far = SIDE - length
    return sorted({0, 1, far // 2, far - 1, far})


def _shapes_at_borders() -> np.ndarray:
    masks = []
    for shape in _small_shapes():
        for top in _offsets(shape.shape[0]):
            for left in _offsets(shape.shape[1]):
                mask = np.zeros((SIDE, SIDE), bool)
                mask[top : top + shape.shape[0], left : left + shape.shape[1]] = shape
                masks.append(mask)
    return np.stack(masks)


def _scattered_tiny_components(rng: np.random.Generator) -> np.ndarray:
    """Dozens of 1- to 3-cell shapes stamped at random places (some of them touch or merge)."""
    shapes = _small_shapes()
    masks = np.zeros((60, SIDE, SIDE), bool)
    for mask in masks:
        for _ in range(rng.integers(10, 60)):
            shape = shapes[rng.integers(len(shapes))]
            top = rng.integers(SIDE - shape.shape[0] + 1)
            left = rng.integers(SIDE - shape.shape[1] + 1)
            mask[top : top + shape.shape[0], left : left + shape.shape[1]] |= shape
    return masks


def _huge_components(rng: np.random.Generator) -> np.ndarray:
    """Components around the 225-cell limit and far beyond it, next to small ones."""
    masks = []
    for side in (14, 15, 16, 24):
        mask = np.zeros((SIDE, SIDE), bool)
        mask[:side, :side] = True
        masks.append(mask)
    limit = np.zeros((SIDE, SIDE), bool)
    limit[:15, :15] = True
    limit[15, 0] = True  # 226 cells
    limit[SIDE - 1, SIDE - 2 :] = True  # and a 2-cell component in the far corner
    masks.append(limit)
    frame = np.zeros((SIDE, SIDE), bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True  # 92 cells touching every border
    masks.append(frame)
    dense = rng.random((20, SIDE, SIDE)) < rng.uniform(0.55, 0.95, size=(20, 1, 1))
    return np.concatenate([np.stack(masks), dense])


def _roi_like_masks(rng: np.random.Generator) -> np.ndarray:
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    blobs = testing.blob_masks(30, SIDE, SIDE, generator)
    adversarial = torch.stack([make(SIDE, SIDE) for make in testing.ADVERSARIAL_MASKS.values()])
    return torch.cat([blobs, adversarial]).numpy()


MASK_FAMILIES = {
    "random_densities": _random_density_masks,
    "small_shapes_at_borders": lambda rng: _shapes_at_borders(),
    "scattered_tiny_components": _scattered_tiny_components,
    "huge_components": _huge_components,
    "roi_like": _roi_like_masks,
}


def family_masks(name: str) -> np.ndarray:
    return MASK_FAMILIES[name](np.random.default_rng(sorted(MASK_FAMILIES).index(name)))


# ------------------------------------------------------------------------------------------------
# Comparison


def our_boxes(backend, masks: np.ndarray) -> list[list[list[int]]]:
    """Boxes of each mask from our ops on one backend, with the authors' filters."""
    labels = backend("connected_components", torch.from_numpy(masks), 8)
    boxes, _, _, counts, overflow = backend("component_boxes", labels, SLOTS, 1, 4, 3, 225)
    assert overflow.eq(0).all()
    return [boxes[b, : counts[b]].tolist() for b in range(len(masks))]


def assert_same_boxes(ours: list[list[list[int]]], masks: np.ndarray) -> None:
    for index, (mask, boxes) in enumerate(zip(masks, ours)):
        expected = authors_boxes(mask)
        assert boxes == expected, f"mask {index}:\n{mask.astype(int)}\nours {boxes}\ntheirs {expected}"


@pytest.mark.parametrize("family", list(MASK_FAMILIES))
def test_boxes_match_the_authors(backend, family):
    masks = family_masks(family)
    assert_same_boxes(our_boxes(backend, masks), masks)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))],
)
def test_public_ops_defaults_are_the_authors(device):
    # sdrpn.ops runs the compiled kernels when they are built, else the reference; its default
    # filters must be the authors'.
    masks = np.concatenate([family_masks("small_shapes_at_borders"), family_masks("random_densities")[:40]])
    labels = sdrpn.ops.connected_components(torch.from_numpy(masks).to(device), 8)
    boxes, _, _, counts, overflow = (output.cpu() for output in sdrpn.ops.component_boxes(labels, SLOTS))
    assert overflow.eq(0).all()
    assert_same_boxes([boxes[b, : counts[b]].tolist() for b in range(len(masks))], masks)


def _misses_a_cell(mask: np.ndarray, box: list[int]) -> bool:
    x0, y0, x1, y1 = box
    return bool(mask[y0:y1, x0:x1].sum() < mask.sum())


def test_masks_cover_the_adversarial_cases():
    """The families are as large and as nasty as they claim."""
    families = {name: family_masks(name) for name in MASK_FAMILIES}
    assert sum(len(masks) for masks in families.values()) >= 300
    assert all(masks.shape[1:] == (SIDE, SIDE) for masks in families.values())
    assert [int(shape.sum()) for shape in _small_shapes()].count(2) == 4  # row, column, two diagonals

    # Every grown width the rule can give appears, including boxes clamped at the far border that
    # miss a cell of their own component.
    grown = [(mask, authors_boxes(mask)) for mask in families["small_shapes_at_borders"] if mask.sum() > 1]
    assert all(len(boxes) == 1 for _, boxes in grown)
    assert {boxes[0][2] - boxes[0][0] for _, boxes in grown} == {1, 2, 3, 4}
    assert {boxes[0][3] - boxes[0][1] for _, boxes in grown} == {1, 2, 3, 4}
    assert any(_misses_a_cell(mask, boxes[0]) for mask, boxes in grown)

    areas = [
        region.area
        for mask in families["huge_components"]
        for region in skimage.measure.regionprops(skimage.measure.label(mask, connectivity=2))
    ]
    assert max(areas) > 225 and 225 in areas
