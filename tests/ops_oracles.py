"""Assertions shared by the ops tests: independent oracles (scikit-image's labelling, and a plain
Python loop over its regions with the box filters of the op contract) and comparison with the
pure-PyTorch reference."""

from __future__ import annotations

import numpy as np
import skimage.measure
import torch

from sdrpn.ops import reference, testing


def skimage_labels(mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    return torch.stack(
        [
            torch.from_numpy(skimage.measure.label(image.numpy(), connectivity=connectivity // 4))
            for image in mask
        ]
    ).to(torch.int32)


def assert_labels_match_skimage(backend, mask: torch.Tensor, connectivity: int) -> None:
    labels = backend("connected_components", mask, connectivity)
    assert labels.dtype == torch.int32 and labels.shape == mask.shape
    expected = skimage_labels(mask.contiguous(), connectivity)
    assert torch.equal(labels, expected), f"{(labels != expected).sum()} pixels differ"


def grown_interval(lo: int, hi: int, min_width: int, extent: int) -> tuple[int, int]:
    """The authors' growth of one axis, in their float arithmetic (int() truncates toward zero)."""
    centre = (lo + hi) / 2
    width = max(min_width, hi - lo + 1)
    return max(0, int(centre - width / 2)), min(extent - 1, int(centre + width / 2))


def regionprops_boxes(labels: np.ndarray, max_components, drop_area, min_area, grow_to, max_area):
    """Plain Python loop over skimage's regions: the op's contract, one component at a time."""
    height, width = labels.shape
    kept = []
    for region in skimage.measure.regionprops(labels):
        area = int(region.area)
        if area <= drop_area or area > max_area:
            continue
        y0, x0, y1, x1 = (int(v) for v in region.bbox)
        if area < min_area:
            x0, x1 = grown_interval(x0, x1, grow_to, width)
            y0, y1 = grown_interval(y0, y1, grow_to, height)
        kept.append(([x0, y0, x1, y1], area))
    boxes = np.zeros((max_components, 4), np.int32)
    areas = np.zeros(max_components, np.int32)
    stored = kept[:max_components]
    for slot, (box, area) in enumerate(stored):
        boxes[slot], areas[slot] = box, area
    valid = np.arange(max_components) < len(stored)
    return boxes, areas, valid, len(stored), len(kept) - len(stored)


def assert_boxes_match_regionprops(backend, labels: torch.Tensor, settings) -> None:
    boxes, areas, valid, counts, overflow = backend("component_boxes", labels, *settings)
    batch, slots = labels.shape[0], settings[0]
    assert boxes.shape == (batch, slots, 4) and areas.shape == valid.shape == (batch, slots)
    assert counts.shape == overflow.shape == (batch,)
    assert boxes.dtype == areas.dtype == counts.dtype == overflow.dtype == torch.int32
    assert valid.dtype == torch.bool
    for b in range(batch):
        e_boxes, e_areas, e_valid, e_count, e_overflow = regionprops_boxes(labels[b].numpy(), *settings)
        assert boxes[b].tolist() == e_boxes.tolist()
        assert areas[b].tolist() == e_areas.tolist()
        assert valid[b].tolist() == e_valid.tolist()
        assert (counts[b].item(), overflow[b].item()) == (e_count, e_overflow)


def assert_matches_reference(backend, op: str, *arguments) -> None:
    comparison = testing.compare(op, arguments, backend(op, *arguments), getattr(reference, op)(*arguments))
    assert comparison.ok, (
        f"{op}: max error {comparison.max_error}, {comparison.mismatches} mismatches {comparison.detail}"
    )


def maybe_noncontiguous(tensor: torch.Tensor, contiguous: bool) -> torch.Tensor:
    return tensor if contiguous else testing.noncontiguous(tensor)
