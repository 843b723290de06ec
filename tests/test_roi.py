"""RoI post-processing on the device against the plain CPU version (scikit-image, Python loops)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn.engine.reference import reference_roi
from sdrpn.models.geometry import ImageGeometry
from sdrpn.roi import (
    MODE_BOX,
    MODE_MASK,
    MODE_NONE,
    THRESHOLDS,
    RoIOptions,
    SourceImages,
    forced_logits,
    propose,
    propose_grids,
    region_crops,
    roi_token_keep,
)

GRID = (24, 24)
MODES = {"none": MODE_NONE, "box": MODE_BOX, "mask": MODE_MASK}


def _random_maps(batch, seed, grid=GRID):
    """Logit maps with blobs of every size: noise, small (grown), medium and too-large components."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.full((batch, *grid), -6.0)
    for sample in range(batch):
        for _ in range(int(torch.randint(0, 6, (1,), generator=generator))):
            height, width = (int(v) for v in torch.randint(1, min(12, *grid), (2,), generator=generator))
            y0 = int(torch.randint(0, grid[0] - height + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, grid[1] - width + 1, (1,), generator=generator))
            logits[sample, y0:y0 + height, x0:x0 + width] = 4.0
    return logits + torch.randn(logits.shape, generator=generator)


def _adapter(mode="crop"):
    geometry = ImageGeometry(mode=mode, input_size=(336, 336), shortest_edge=336)
    return SimpleNamespace(image_grid=GRID, geometry=geometry, roi_views_on_device=True)


@pytest.mark.parametrize("strategy", ["mask", "masked", "box", "none"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_regions", [None, 1, 2])
def test_proposal_matches_scikit_image(strategy, seed, max_regions):
    options = RoIOptions(strategy=strategy, threshold=0.15, max_regions=max_regions,
                         edge_sink_above=500 if strategy == "masked" else None)
    logits = _random_maps(8, seed)
    proposal = propose(logits.flatten(1), GRID, options)
    images = [Image.new("RGB", (500, 400))] * 8
    for sample in range(8):
        expected = reference_roi(logits[sample].numpy(), images[sample], _adapter(), options)
        np.testing.assert_allclose(proposal.prob[sample].numpy(), expected.prob, rtol=1e-5, atol=1e-6)
        assert np.array_equal(proposal.cells[sample].numpy(), expected.cells)
        assert int(proposal.counts[sample]) == len(expected.boxes)
        assert int(proposal.mode[sample]) == MODES[expected.mode]
        slots = proposal.valid[sample].sum()
        assert proposal.boxes[sample, :slots].tolist() == [list(box) for box in expected.boxes][:slots]
        if expected.mode != "none":
            assert tuple(proposal.region[sample].tolist()) == expected.region


def test_modes_follow_the_strategy():
    logits = forced_logits([[(2, 2, 6, 6)], [(2, 2, 5, 5), (10, 10, 14, 13)], []], GRID)
    for strategy, modes in [("mask", [MODE_BOX, MODE_MASK, MODE_NONE]), ("box", [MODE_BOX, MODE_BOX, MODE_NONE]),
                            ("none", [MODE_NONE] * 3)]:
        assert propose(logits, GRID, RoIOptions(strategy=strategy)).mode.tolist() == modes


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.15, 0.3, 0.5])
def test_forced_logits_give_exactly_the_boxes(threshold):
    boxes = [[(3, 4, 9, 8)], [(0, 0, 2, 2), (20, 21, 24, 24)], []]
    proposal = propose(forced_logits(boxes, GRID, threshold), GRID, RoIOptions(threshold=threshold))
    for sample, sample_boxes in enumerate(boxes):
        expected = torch.zeros(GRID, dtype=torch.bool)
        for x0, y0, x1, y1 in sample_boxes:
            expected[y0:y1, x0:x1] = True
        assert torch.equal(proposal.mask[sample], expected)
    with pytest.raises(ValueError, match="threshold"):
        forced_logits(boxes, GRID, threshold=0.6)


def test_component_filters():
    logits = torch.full((1, *GRID), -8.0)
    logits[0, 0, 0] = 8.0             # 1 cell (no blur here, cells are exact)
    proposal = propose(logits, GRID, RoIOptions(blur=False))
    assert proposal.counts.tolist() == [0]  # a single cell is noise
    logits[0, 5, 5:7] = 8.0           # 2 cells: kept, widened the authors' way (3 wide, 3 tall)
    logits[0, 10:26, 10:26] = 8.0     # 14 x 14 = 196 cells: kept; 16 x 16 would be too large
    proposal = propose(logits, GRID, RoIOptions(blur=False))
    assert proposal.counts.tolist() == [2]
    # columns [5, 7): middle 6, span 3 -> [int(4.5), int(7.5)) = [4, 7); row [5, 6): middle 5.5 -> [4, 7)
    assert proposal.boxes[0, :2].tolist() == [[4, 4, 7, 7], [10, 10, 24, 24]]
    logits[0, 9, 9:24] = 8.0          # 196 + 29 = 225 cells: still kept ...
    logits[0, 9:24, 9] = 8.0
    proposal = propose(logits, GRID, RoIOptions(blur=False))
    assert proposal.counts.tolist() == [2] and proposal.boxes[0, 1].tolist() == [9, 9, 24, 24]
    logits[0, 8, 9:24] = 8.0          # ... 240 cells: too large, dropped
    proposal = propose(logits, GRID, RoIOptions(blur=False))
    assert proposal.counts.tolist() == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_regions", [None, 1, 2])
def test_proposal_on_cuda_equals_the_cpu(max_regions):
    options = RoIOptions(threshold=0.15, max_regions=max_regions)
    logits = _random_maps(16, seed=7)
    on_cpu = propose(logits, GRID, options)
    on_cuda = propose(logits.cuda(), GRID, options)
    for name in on_cpu.__dataclass_fields__:
        expected, got = getattr(on_cpu, name), getattr(on_cuda, name).cpu()
        if expected.is_floating_point():
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got, expected), name


def test_max_regions_keeps_the_strongest_peaks():
    logits = torch.full((1, *GRID), -8.0)
    logits[0, 2:5, 2:5] = 1.0       # label 1, peak sigmoid(1)
    logits[0, 2, 10:12] = 3.0       # label 2, small (widened to [9, 12) x [1, 4)), the strongest
    logits[0, 12:16, 3:7] = 2.0     # label 3
    logits[0, 20:22, 20:23] = 2.0   # label 4, ties with label 3
    def kept(count, **changes):
        return propose(logits, GRID, RoIOptions(blur=False, max_regions=count, **changes))
    one = kept(1)
    assert one.counts.tolist() == [1] and one.mode.tolist() == [MODE_BOX]
    assert one.boxes[0][one.valid[0]].tolist() == [[9, 1, 12, 4]]
    assert one.cells[0].sum() == 9 and one.region[0].tolist() == [9, 1, 12, 4]
    two = kept(2)  # the tie goes to the first in raster order; the slots keep label order
    assert two.counts.tolist() == [2] and two.mode.tolist() == [MODE_MASK]
    assert two.boxes[0][two.valid[0]].tolist() == [[9, 1, 12, 4], [3, 12, 7, 16]]
    assert kept(None).counts.tolist() == kept(4).counts.tolist() == kept(9).counts.tolist() == [4]
    # The others are dropped before the boxes are made, so the strongest takes the single slot
    # (label 2 would come second among all four components).
    squeezed = kept(1, max_components=1)
    assert squeezed.counts.tolist() == [1] and squeezed.valid.tolist() == [[True]]
    assert squeezed.boxes[0].tolist() == [[9, 1, 12, 4]] and torch.equal(squeezed.cells, one.cells)


@pytest.mark.parametrize("geometry_mode", ["crop", "pad"])
@pytest.mark.parametrize("size", [(500, 400), (300, 900), (40, 25), (2000, 200)])
def test_crops_and_token_selection_match_the_reference(geometry_mode, size):
    adapter = _adapter(geometry_mode)
    options = RoIOptions(strategy="mask")
    logits = _random_maps(6, seed=size[0])
    proposal = propose(logits, GRID, options)
    images = [Image.new("RGB", size)] * 6
    sources = SourceImages.from_pil(images, adapter.geometry, "cpu")
    crops = region_crops(proposal, sources, adapter.geometry, GRID)
    keep = roi_token_keep(proposal, GRID)
    for sample in range(6):
        expected = reference_roi(logits[sample].numpy(), images[sample], adapter, options)
        if expected.mode == "none":
            assert not keep[sample].any()
            continue
        assert tuple(crops[sample].tolist()) == expected.crop
        assert np.array_equal(keep[sample].numpy(), expected.keep)
        if expected.mode == "box":
            assert keep[sample].all()


def test_masked_tokens_lie_under_the_mask():
    """Two RoI cells far apart in a square image: the kept view tokens cover them, not the gap."""
    adapter = _adapter("crop")
    logits = forced_logits([[(0, 0, 4, 4), (20, 20, 24, 24)]], GRID)
    proposal = propose(logits, GRID, RoIOptions())
    sources = SourceImages.from_pil([Image.new("RGB", (336, 336))], adapter.geometry, "cpu")
    crops = region_crops(proposal, sources, adapter.geometry, GRID)
    assert crops[0].tolist() == [0, 0, 336, 336]  # the enclosing region is the whole view
    keep = roi_token_keep(proposal, GRID).view(GRID)
    assert torch.equal(keep, proposal.cells[0])  # the region is the whole grid: exactly the mask


def test_masked_region_is_the_box_of_the_whole_mask():
    """The authors cut the masked view from the box around every thresholded cell, including a
    component the area filter dropped (``LLaVA/llava/mm_utils.py`` ~945-956), and keep its tokens."""
    logits = torch.full((1, *GRID), -8.0)
    logits[0, 2:5, 2:5] = 8.0      # kept
    logits[0, 10:13, 10:13] = 8.0  # kept
    logits[0, 20, 22] = 8.0        # one cell: dropped as noise, still inside the masked region
    proposal = propose(logits, GRID, RoIOptions(blur=False))
    assert proposal.counts.tolist() == [2] and proposal.mode.tolist() == [MODE_MASK]
    assert proposal.region[0].tolist() == [2, 2, 23, 21]
    assert torch.equal(proposal.cells[0], proposal.mask[0])


def test_box_region_is_the_grown_box_even_off_its_component():
    """At the right border the authors' widening stops at column W - 2, away from a component in
    the last column; the crop follows the box, as theirs does."""
    logits = torch.full((1, *GRID), -8.0)
    logits[0, 5:7, 23] = 8.0  # two cells in the last column
    proposal = propose(logits, GRID, RoIOptions(blur=False))
    assert proposal.mode.tolist() == [MODE_BOX]
    assert proposal.region[0].tolist() == [22, 4, 23, 7]  # columns [int(22.0), min(23, int(25.0)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_source_images_upload_once_in_rgb(mode):
    geometry = ImageGeometry(mode="crop", input_size=(336, 336), shortest_edge=336)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((30, 50, 3)) * 255).astype(np.uint8)).convert(mode),
              Image.fromarray((rng.random((70, 20, 3)) * 255).astype(np.uint8)).convert(mode)]
    sources = SourceImages.from_pil(images, geometry, "cpu")
    assert sources.pixels.shape == (2, 3, 70, 50) and sources.pixels.dtype == torch.uint8
    assert sources.sizes.tolist() == [[50, 30], [20, 70]] and sources.max_side == 70
    assert torch.equal(sources.transforms[1], geometry.transforms_tensor([(20, 70)])[0])


def test_threshold_presets_match_the_benchmarks():
    from sdrpn.eval.datasets import BENCHMARKS

    for name, threshold in THRESHOLDS.items():
        assert BENCHMARKS[name].threshold == threshold
    assert BENCHMARKS["jsonl"].threshold is None  # no preset: the RPN's own threshold


def test_invalid_options():
    with pytest.raises(ValueError, match="strategy"):
        RoIOptions(strategy="zoom")
    with pytest.raises(ValueError, match="threshold"):
        RoIOptions(threshold=1.5)
    with pytest.raises(ValueError, match="max_regions"):
        RoIOptions(max_regions=0)


def test_edge_sinks_of_large_maps_never_enter_the_mask():
    # Only the first H // 4 cells of column 0 and W // 4 of row 0 are high: above the cell count
    # they are zeroed (no RoI); at or below it they make one.
    grid = (30, 28)
    logits = torch.full((1, *grid), -20.0)
    logits[0, :7, 0] = 20.0
    logits[0, 0, :7] = 20.0
    above = propose(logits, grid, RoIOptions(strategy="masked", threshold=0.25, edge_sink_above=768))
    at = propose(logits, grid, RoIOptions(strategy="masked", threshold=0.25, edge_sink_above=840))
    assert int(above.mode[0]) == MODE_NONE and not above.mask.any()
    assert int(at.mode[0]) == MODE_MASK and at.mask[0, :7, 0].all()
    below = logits.clone()
    below[0, 7:10, 0:3] = 20.0  # a blob just below the zeroed run survives
    kept = propose(below, grid, RoIOptions(strategy="masked", threshold=0.25, edge_sink_above=768))
    assert kept.mask[0, 8, 1] and not kept.mask[0, :6, 0].any()


@pytest.mark.parametrize("strategy", ["mask", "masked"])
def test_grids_of_their_own_equal_each_sample_alone(strategy):
    grids = [(24, 24), (10, 31), (24, 24), (7, 5)]
    options = RoIOptions(strategy=strategy, threshold=0.15)
    maps = [_random_maps(1, seed, grid) for seed, grid in enumerate(grids)]
    width = max(h * w for h, w in grids)
    flat = torch.full((len(grids), width), float("-inf"))
    for index, one in enumerate(maps):
        flat[index, : one.numel()] = one.flatten()
    batch = propose_grids(flat, grids, options)
    for index, (one, grid) in enumerate(zip(maps, grids)):
        alone = propose(one.flatten(1), grid, options)
        for name in ("prob", "mask", "cells"):
            value = getattr(batch, name)[index]
            assert torch.equal(value[: grid[0], : grid[1]], getattr(alone, name)[0]), name
            assert not value[grid[0]:].bool().any() and not value[:, grid[1]:].bool().any(), name
        for name in ("boxes", "valid", "counts", "region", "mode"):
            assert torch.equal(getattr(batch, name)[index], getattr(alone, name)[0]), name
