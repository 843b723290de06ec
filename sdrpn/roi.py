"""From RPN logits to the second view: RoI mask, components, boxes, crop and token selection.

Every step runs on the device with static shapes and without host synchronisation (DESIGN
section 3.2):

    logits --roi_mask--> prob, mask --connected_components--> labels --component_boxes--> boxes
    --> mode + region (grid box) --> source-pixel rectangle --> stretched to the vision input
    (PIL-exact bilinear) + normalise --> pixel_values of the RoI view
    --> keep mask over the view's tokens (all for box upscaling; for masked upscaling the mask cut
        to the region, bilinear-resized to the token grid, > 0.5; none without a RoI)

By default every rule is the SD-RPN authors' release for LLaVA-1.5 (YuHengsss/SD-RPN 00876ac,
``get_batched_sub_images`` in ``LLaVA/llava/mm_utils.py`` ~904-970): 0 kept components: no second
view; 1: box upscaling of its (grown) box; >= 2: masked upscaling of the box around the whole
thresholded mask, dropped components included. Strategies: ``"mask"`` (that rule), ``"box"`` (box
upscaling of the box around every kept component's box, also for >= 2 components, where the authors'
``bbox`` mode encodes two crops or none), ``"masked"`` (masked upscaling of the box around the whole
mask whenever a cell passes the threshold, no component filters: the authors' Qwen2.5-VL rule,
``get_batched_sub_images`` in ``Qwen2.5-VL/qwen_src/mm_utils.py`` ~946-990) and ``"none"`` (never
a second view).

Views of different token grids in one batch (Qwen's aspect-keeping views) go through
:func:`propose_grids`, which post-processes each grid on its own and pads the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import ops
from .models.geometry import PIL_BILINEAR, ImageGeometry, resample_views, square_crop_boxes, to_rgb_array

__all__ = [
    "THRESHOLDS",
    "STRATEGIES",
    "RoIOptions",
    "RoIProposal",
    "SourceImages",
    "propose",
    "propose_grids",
    "edge_sink_cells",
    "forced_logits",
    "grid_box_crops",
    "grid_box_squares",
    "region_crops",
    "roi_views",
    "roi_token_keep",
    "roi_token_keep_grids",
    "MODE_NONE",
    "MODE_BOX",
    "MODE_MASK",
]

# The authors' per-benchmark RoI thresholds for LLaVA-1.5 (DESIGN section 2).
THRESHOLDS = {
    "textvqa": 0.15,
    "infovqa": 0.15,
    "chartqa": 0.15,
    "pope": 0.15,
    "docvqa": 0.1,
    "vstar": 0.1,
    "hrbench": 0.1,
    "ocrbench": 0.05,
}
STRATEGIES = ("mask", "masked", "box", "none")
MODE_NONE, MODE_BOX, MODE_MASK = 0, 1, 2


@dataclass(frozen=True)
class RoIOptions:
    """Post-processing of RPN maps (defaults: the authors' LLaVA-1.5 setting).

    Attributes:
        strategy: "mask", "masked", "box" or "none" (see the module docstring).
        threshold: probability threshold of the blurred map (strict ``>``).
        blur: 3x3 Gaussian blur (sigma 1) before thresholding.
        connectivity: 8 (or 4) for connected components.
        drop_area: components of at most this many cells are noise.
        max_area: components of more cells are dropped.
        min_area, grow_to: components of fewer than ``min_area`` cells grow to a box at least
            ``grow_to`` wide, as the authors grow them (see ``sdrpn.ops.component_boxes``).
        max_components: component slots reported per image (more are counted, not listed).
        max_regions: keep only this many components, those of the highest peak probability
            (ties: the first in raster order); None keeps them all, as the authors do. With 1,
            every RoI is the box upscaling of the strongest region; with more, masked upscaling
            keeps the chosen components' cells instead of the whole mask. For models whose maps
            often have far-apart components, where one loose enclosing crop is too coarse to read.
        edge_sink_above: maps of more cells than this have the first ``H // 4`` cells of column 0
            and the first ``W // 4`` cells of row 0 set to probability 0 before the blur, where
            large Qwen2.5-VL maps hold attention sinks their RPN never saw in training (the authors'
            rule, ``Qwen2.5-VL/qwen_src/mm_utils.py`` ~956-960, 768 cells); None never does.
        prune_above, prune_threshold: a sample whose original view has more tokens than
            ``prune_above`` and that gets a RoI drops, in stage 2, the original tokens that no
            question token scores above ``prune_threshold`` (sigmoid of the RPN head's best score
            from a question token): the authors' Qwen2.5-VL rule above 1024 tokens
            (``modeling_qwen2_5_vl.py`` ~1338-1376). None never prunes.
    """

    strategy: str = "mask"
    threshold: float = 0.15
    blur: bool = True
    connectivity: int = 8
    drop_area: int = 1
    max_area: int = 225
    min_area: int = 4
    grow_to: int = 3
    max_components: int = 16
    max_regions: int | None = None
    edge_sink_above: int | None = None
    prune_above: int | None = None
    prune_threshold: float = 0.01

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.max_regions is not None and self.max_regions < 1:
            raise ValueError(f"max_regions must be at least 1 (or None for all), got {self.max_regions}")


@dataclass
class RoIProposal:
    """Stage-1 result for a batch, all device tensors of static shape.

    Attributes:
        logits: (B, H, W) float32 RPN logits.
        prob: (B, H, W) float32 blurred probabilities.
        mask: (B, H, W) bool thresholded map.
        boxes: (B, M, 4) int32 component boxes ``[x0, y0, x1, y1)`` on the grid (grown when small).
        valid: (B, M) bool filled slots.
        counts: (B,) int32 components kept (all of them, including any beyond the M slots, up to
            ``max_regions``).
        cells: (B, H, W) bool cells of the original view that the second view shows: the region's
            box for box upscaling, the mask inside the region for masked upscaling, none without a RoI.
        region: (B, 4) int64 grid box ``[x0, y0, x1, y1)`` the second view is cut from (zeros
            without a RoI).
        mode: (B,) int64 ``MODE_NONE``, ``MODE_BOX`` or ``MODE_MASK`` per sample.
    """

    logits: torch.Tensor
    prob: torch.Tensor
    mask: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    cells: torch.Tensor
    region: torch.Tensor
    mode: torch.Tensor

    def to(self, device) -> RoIProposal:
        return RoIProposal(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def propose(logits: torch.Tensor, grid: tuple[int, int], options: RoIOptions) -> RoIProposal:
    """RoI cells, boxes and the upscaling mode of each sample from RPN logits.

    Args:
        logits: (B, H * W) or (B, H, W) RPN logits.
        grid: (H, W) of the token grid.
        options: post-processing settings.
    """
    batch = logits.shape[0]
    logits = logits.reshape(batch, *grid).float()
    if options.edge_sink_above is not None and grid[0] * grid[1] > options.edge_sink_above:
        logits = logits.masked_fill(edge_sink_cells(grid, logits.device), float("-inf"))
    prob, mask = ops.roi_mask(logits, options.threshold, options.blur)
    labels = ops.connected_components(mask, options.connectivity)

    # Components that pass the area filters (per-label pixel counts).
    flat = labels.reshape(batch, -1).long()
    label_area = torch.zeros(batch, grid[0] * grid[1] + 1, dtype=torch.long, device=logits.device)
    label_area.scatter_add_(1, flat, torch.ones_like(flat))
    kept_label = (label_area > options.drop_area) & (label_area <= options.max_area)
    kept_label[:, 0] = False  # background
    masked_source = mask
    if options.max_regions is not None:  # the other components become background before the boxes
        kept_label = _strongest(prob, flat, kept_label, options.max_regions)
        masked_source = kept_label.gather(1, flat).view(batch, *grid)
        labels = torch.where(masked_source, labels, 0)
    boxes, areas, valid, counts, overflow = ops.component_boxes(
        labels, options.max_components, options.drop_area, options.min_area, options.grow_to, options.max_area
    )
    total = counts.long() + overflow.long()
    if options.strategy == "none":
        mode = torch.zeros(batch, dtype=torch.long, device=logits.device)
    elif options.strategy == "box":
        mode = torch.where(total > 0, MODE_BOX, MODE_NONE)
    elif options.strategy == "masked":
        mode = torch.where(masked_source.flatten(1).any(dim=1), MODE_MASK, MODE_NONE)
    else:
        mode = torch.where(total > 1, MODE_MASK, torch.where(total > 0, MODE_BOX, MODE_NONE))

    # Box upscaling shows the box around the component boxes (one box with the "mask" strategy);
    # masked upscaling the box around the whole mask.
    box_region = _enclosing_boxes(boxes, valid)
    mask_region = _enclosing_box(masked_source)
    region = torch.where((mode == MODE_MASK)[:, None], mask_region, box_region)
    region = torch.where((mode > MODE_NONE)[:, None], region, torch.zeros_like(region))
    cells = torch.where((mode == MODE_MASK)[:, None, None], masked_source, _box_cells(region, grid))
    return RoIProposal(logits=logits, prob=prob, mask=mask, boxes=boxes, valid=valid, counts=total.int(),
                       cells=cells, region=region, mode=mode)


def edge_sink_cells(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(H, W) bool: the first ``H // 4`` cells of column 0 and ``W // 4`` cells of row 0."""
    cells = torch.zeros(grid, dtype=torch.bool, device=device)
    cells[: grid[0] // 4, 0] = True
    cells[0, : grid[1] // 4] = True
    return cells


def propose_grids(logits: torch.Tensor, grids: list[tuple[int, int]], options: RoIOptions) -> RoIProposal:
    """:func:`propose` for a batch whose samples have token grids of their own.

    Args:
        logits: (B, N) RPN logits, sample ``i`` in its first ``H_i * W_i`` entries.
        grids: per sample, ``(H_i, W_i)`` (read on the host).
        options: post-processing settings.

    Returns:
        The proposal with maps padded to the largest grid (logits -inf, probabilities 0, masks and
        cells False outside a sample's grid). Samples of one grid are processed together; every
        sample's result equals its own :func:`propose`.
    """
    grids = [tuple(int(side) for side in grid) for grid in grids]
    if len(set(grids)) == 1:
        return propose(logits[:, : grids[0][0] * grids[0][1]], grids[0], options)
    height, width = max(grid[0] for grid in grids), max(grid[1] for grid in grids)
    parts = {}
    for grid in sorted(set(grids)):
        rows = torch.tensor([i for i, g in enumerate(grids) if g == grid], device=logits.device)
        parts[grid] = (rows, propose(logits[rows, : grid[0] * grid[1]], grid, options))
    first = next(iter(parts.values()))[1]
    maps = {"logits": float("-inf"), "prob": 0.0, "mask": False, "cells": False}  # and their fill
    padded = {}
    for name in RoIProposal.__dataclass_fields__:
        sample = getattr(first, name)
        if name in maps:
            out = torch.full((len(grids), height, width), maps[name], dtype=sample.dtype, device=sample.device)
        else:
            out = torch.zeros((len(grids), *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
        for grid, (rows, proposal) in parts.items():
            if name in maps:
                out[rows, : grid[0], : grid[1]] = getattr(proposal, name)
            else:
                out[rows] = getattr(proposal, name)
        padded[name] = out
    return RoIProposal(**padded)


def _enclosing_boxes(boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 4) int64 box around the valid boxes of (B, M, 4) (zeros when none)."""
    boxes = boxes.long()
    big = torch.iinfo(torch.long).max
    low = torch.where(valid[..., None], boxes[..., :2], big).amin(dim=1)
    high = torch.where(valid[..., None], boxes[..., 2:], -1).amax(dim=1)
    box = torch.cat([low, high], dim=1)
    return torch.where(valid.any(dim=1, keepdim=True), box, torch.zeros_like(box))


def _box_cells(box: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool cells inside (B, 4) grid boxes ``[x0, y0, x1, y1)``."""
    rows = torch.arange(grid[0], device=box.device)[:, None]
    cols = torch.arange(grid[1], device=box.device)
    x0, y0, x1, y1 = (box[:, i, None, None] for i in range(4))
    return (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)


def _strongest(prob, flat_labels, kept_label, count: int):
    """``kept_label`` (B, L) narrowed to the ``count`` kept labels of highest peak probability
    (ties: the lower label, first in raster order)."""
    batch, labels = kept_label.shape
    peak = torch.zeros(batch, labels, dtype=prob.dtype, device=prob.device)
    peak.scatter_reduce_(1, flat_labels, prob.reshape(batch, -1), "amax", include_self=True)
    score = torch.where(kept_label, peak, torch.full_like(peak, -1.0))
    order = score.sort(dim=1, descending=True, stable=True).indices  # stable: equal peaks keep label order
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(labels, device=order.device).expand(batch, -1))
    return kept_label & (rank < count)


def _enclosing_box(cells: torch.Tensor) -> torch.Tensor:
    """(B, 4) int64 ``[x0, y0, x1, y1)`` enclosing the True cells of (B, H, W); zeros when none."""
    batch, height, width = cells.shape
    any_row, any_col = cells.any(dim=2), cells.any(dim=1)
    rows = torch.arange(height, device=cells.device)
    cols = torch.arange(width, device=cells.device)
    y0 = torch.where(any_row, rows, height).amin(dim=1)
    y1 = torch.where(any_row, rows + 1, 0).amax(dim=1)
    x0 = torch.where(any_col, cols, width).amin(dim=1)
    x1 = torch.where(any_col, cols + 1, 0).amax(dim=1)
    box = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(any_row.any(dim=1, keepdim=True), box, torch.zeros_like(box))


def forced_logits(boxes, grid: tuple[int, int], threshold: float = 0.15, blur: bool = True,
                  device=None) -> torch.Tensor:
    """(B, H, W) logits whose RoI mask (after blur and threshold) is exactly the given grid boxes.

    For tests and for benchmarks with random weights. ``boxes``: per sample a list of
    ``[x0, y0, x1, y1)`` boxes (possibly empty), at least 2 cells wide and tall and not touching
    each other. With blur, the probability inside is chosen so that the blurred box corners stay
    above the threshold while the cells next to the box stay below it.
    """
    if blur:
        side = math.exp(-0.5) / (1.0 + 2.0 * math.exp(-0.5))  # the blur's off-centre weight
        corner = (1.0 - side) ** 2  # a box corner keeps (centre + one side) weight along both axes
        low, high = threshold / corner, min(threshold / side, 1.0)
        if low >= 1.0:
            raise ValueError(f"no map survives a blurred threshold of {threshold} box-exactly; use threshold < {corner:.3f}")
        inside_prob = (low + high) / 2
        inside = math.log(inside_prob / (1.0 - inside_prob)) if inside_prob < 1.0 else 20.0
    else:
        inside = 20.0
    logits = torch.full((len(boxes), *grid), -20.0, device=device)
    for sample, sample_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in sample_boxes:
            logits[sample, y0:y1, x0:x1] = inside
    return logits


# ------------------------------------------------------------------------------------------------
# Source images and RoI views
# ------------------------------------------------------------------------------------------------


@dataclass
class SourceImages:
    """Source images uploaded once to the device, with their view geometry.

    Attributes:
        pixels: (B, 3, H_max, W_max) uint8 RGB, each image at the top-left corner (None without a
            view geometry).
        sizes: (B, 2) int64 ``(width, height)``.
        transforms: (B, 4) float64 exact view-to-source maps ``[a_x, b_x, a_y, b_y]``.
        crop_maps: (B, 4) float32 ``[pad_x, ratio_x, pad_y, ratio_y]`` of the RoI crops
            (:meth:`~sdrpn.models.geometry.ImageGeometry.crop_map`).
        max_side: the longest image side (bounds the crops).
        mean, std: (3, 1, 1) float32 normalisation constants, uploaded with the images.
        images: the RGB PIL images, for views the processor encodes on the host.

    Without a view geometry (families whose views keep the aspect ratio and are encoded by the
    processor), ``pixels``, ``transforms``, ``crop_maps``, ``mean`` and ``std`` are None and
    ``images`` is kept.
    """

    pixels: torch.Tensor | None
    sizes: torch.Tensor
    transforms: torch.Tensor | None
    crop_maps: torch.Tensor | None
    max_side: int
    mean: torch.Tensor | None
    std: torch.Tensor | None
    images: list | None = None

    @classmethod
    def from_pil(cls, images, geometry: ImageGeometry, device) -> SourceImages:
        """Converts PIL images as the processor does (RGB, alpha on white where it composites) and
        uploads them in one transfer."""
        arrays = [to_rgb_array(image) for image in images]
        sizes = [(array.shape[1], array.shape[0]) for array in arrays]
        known = geometry is not None
        return cls(
            pixels=_uploaded(arrays, device) if known else None,  # the processor crops PIL images instead
            sizes=torch.tensor(sizes, dtype=torch.long).to(device),
            transforms=geometry.transforms_tensor(sizes).to(device) if known else None,
            crop_maps=geometry.crop_maps_tensor(sizes).to(device) if known else None,
            max_side=max(max(size) for size in sizes),
            mean=torch.tensor(geometry.image_mean, dtype=torch.float32).view(3, 1, 1).to(device) if known else None,
            std=torch.tensor(geometry.image_std, dtype=torch.float32).view(3, 1, 1).to(device) if known else None,
            images=None if known else [Image.fromarray(array) for array in arrays],
        )


def _uploaded(arrays: list[np.ndarray], device) -> torch.Tensor:
    """(B, 3, H_max, W_max) uint8 images, each at the top-left corner, on ``device`` in one transfer."""
    height = max(array.shape[0] for array in arrays)
    width = max(array.shape[1] for array in arrays)
    canvas = np.zeros((len(arrays), height, width, 3), dtype=np.uint8)
    for index, array in enumerate(arrays):
        canvas[index, : array.shape[0], : array.shape[1]] = array
    pixels = torch.from_numpy(canvas)
    pin = torch.device(device).type == "cuda"
    return (pixels.pin_memory() if pin else pixels).to(device, non_blocking=True).permute(0, 3, 1, 2)


def grid_box_crops(boxes: torch.Tensor, sources: SourceImages, geometry: ImageGeometry,
                   grid: tuple[int, int]) -> torch.Tensor:
    """(B, 4) int64 source-pixel rectangles ``[x0, y0, width, height]`` of (B, 4) grid boxes.

    The authors' arithmetic (``get_bbox4src``, ``LLaVA/llava/ana_utils.py`` ~681-740): cells to view
    pixels, ``(v - pad) / ratio`` in float32, clamped to the image, truncated to whole pixels. A
    rectangle they would leave empty (a box wholly in the padding) keeps one pixel, where their
    crop would fail.
    """
    view_h, view_w = geometry.input_size
    pad_x, ratio_x, pad_y, ratio_y = (value[:, None] for value in sources.crop_maps.unbind(1))
    xs = (boxes[:, 0::2].float() * (view_w / grid[1]) - pad_x) / ratio_x
    ys = (boxes[:, 1::2].float() * (view_h / grid[0]) - pad_y) / ratio_y
    width, height = sources.sizes[:, 0:1], sources.sizes[:, 1:2]
    xs = torch.minimum(xs.clamp_min(0.0), width.float()).long()
    ys = torch.minimum(ys.clamp_min(0.0), height.float()).long()
    x0, y0 = torch.minimum(xs[:, 0], width[:, 0] - 1), torch.minimum(ys[:, 0], height[:, 0] - 1)
    x1, y1 = torch.maximum(xs[:, 1], x0 + 1), torch.maximum(ys[:, 1], y0 + 1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)


def grid_box_squares(boxes: torch.Tensor, sources: SourceImages, geometry: ImageGeometry,
                     grid: tuple[int, int]) -> torch.Tensor:
    """(B, 4) int64 aspect-keeping square crops ``[x0, y0, side, side]`` in source pixels around
    (B, 4) grid boxes mapped exactly (the views of ViCrop and res-scaling)."""
    view_h, view_w = geometry.input_size
    cell_w, cell_h = view_w / grid[1], view_h / grid[0]
    x0, y0, x1, y1 = boxes.double().unbind(1)
    a_x, b_x, a_y, b_y = sources.transforms.unbind(1)
    source_box = torch.stack([a_x * (x0 * cell_w) + b_x, a_y * (y0 * cell_h) + b_y,
                              a_x * (x1 * cell_w) + b_x, a_y * (y1 * cell_h) + b_y], dim=1)
    limits = sources.sizes.double().repeat(1, 2)
    source_box = torch.minimum(source_box.clamp_min(0.0), limits)
    return square_crop_boxes(source_box, sources.sizes)


def region_crops(proposal: RoIProposal, sources: SourceImages, geometry: ImageGeometry,
                 grid: tuple[int, int]) -> torch.Tensor:
    """(B, 4) int64 source-pixel rectangles ``[x0, y0, width, height]`` of each sample's region
    (the whole view's when there is no RoI, so that shapes stay static)."""
    has_roi = (proposal.mode > MODE_NONE)[:, None]
    whole = torch.tensor([0, 0, grid[1], grid[0]], device=proposal.region.device).expand_as(proposal.region)
    return grid_box_crops(torch.where(has_roi, proposal.region, whole), sources, geometry, grid)


def roi_views(crops: torch.Tensor, sources: SourceImages, geometry: ImageGeometry,
              resample: int = PIL_BILINEAR) -> torch.Tensor:
    """(B, 3, H, W) float32 ``pixel_values`` of the RoI views: each crop stretched to the vision
    input (bilinear, as the authors resize their crops, ``LLaVA/llava/mm_utils.py`` ~935-936, ~958).

    The processor's own resize and centre crop of an image already at its input size change
    nothing, so normalising is all that is left of it.
    """
    views = resample_views(sources.pixels, sources.sizes, crops, geometry.input_size, resample,
                           geometry.pad_color, sources.max_side)
    return geometry.normalize(views, sources.mean, sources.std)


def roi_token_keep(proposal: RoIProposal, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H * W) bool: which tokens of each RoI view enter stage 2.

    Box upscaling keeps them all; no RoI keeps none; masked upscaling keeps a token where the
    masked cells cut to the region, bilinear-resized to the view's token grid, exceed 0.5 (the
    authors' rule, ``LLaVA/llava/mm_utils.py`` ~950-965).
    """
    keep = resized_region_mask_above_half(proposal.cells, proposal.region, grid)
    mode = proposal.mode[:, None, None]
    keep = torch.where(mode == MODE_BOX, torch.ones_like(keep), keep & (mode == MODE_MASK))
    return keep.reshape(keep.shape[0], -1)


def roi_token_keep_grids(proposal: RoIProposal, grids: list[tuple[int, int]]) -> torch.Tensor:
    """(B, N) bool, :func:`roi_token_keep` for RoI views of a token grid each (``grids``, on the
    host, (0, 0) for a sample without a view): sample ``i``'s first ``H_i * W_i`` entries hold its
    keep mask, ``N`` is the largest grid's token count."""
    capacity = max([grid[0] * grid[1] for grid in grids] + [0])
    keep = torch.zeros(len(grids), capacity, dtype=torch.bool, device=proposal.mode.device)
    for index, grid in enumerate(grids):
        if grid[0] * grid[1] == 0:
            continue
        row = slice(index, index + 1)
        one = RoIProposal(**{name: getattr(proposal, name)[row] for name in RoIProposal.__dataclass_fields__})
        keep[index, : grid[0] * grid[1]] = roi_token_keep(one, tuple(grid))[0]
    return keep


def resized_region_mask_above_half(cells: torch.Tensor, region: torch.Tensor,
                                   out_size: tuple[int, int]) -> torch.Tensor:
    """(B, H_out, W_out) bool: where the cells inside each region box, resized bilinearly to
    ``out_size`` (half-pixel centres, edge clamping, no antialiasing: ``interpolate(mode="bilinear",
    align_corners=False)``), exceed 0.5. Static shapes.

    The weights of that resize are multiples of ``1 / (2 * out)``, so the value is computed exactly
    in integers. Float kernels agree except at exact ties (a value of 0.5, frequent on 0/1 masks),
    which their rounding settles either way, and differently on the CPU and on a GPU.
    """
    values = cells.long()
    row_index, row_weight = _linear_taps(region[:, 1], region[:, 3], out_size[0])  # (B, H_out, 2)
    col_index, col_weight = _linear_taps(region[:, 0], region[:, 2], out_size[1])  # (B, W_out, 2)
    samples = torch.arange(values.shape[0], device=values.device)[:, None, None]
    total = torch.zeros(values.shape[0], *out_size, dtype=torch.long, device=values.device)
    for row_tap in range(2):
        for col_tap in range(2):
            picked = values[samples, row_index[:, :, None, row_tap], col_index[:, None, :, col_tap]]
            total += picked * row_weight[:, :, None, row_tap] * col_weight[:, None, :, col_tap]
    return 2 * total > (2 * out_size[0]) * (2 * out_size[1])


def _linear_taps(start: torch.Tensor, end: torch.Tensor, out: int):
    """Bilinear resizing of ``end - start`` cells (from ``start``) to ``out``: input indices (B, out, 2)
    and integer weights (B, out, 2) in units of ``1 / (2 * out)``.

    Output ``i`` samples input coordinate ``(length * (2i + 1) - out) / (2 * out)``, clamped to the
    first and last cells.
    """
    length = (end - start).clamp_min(1)[:, None]
    unit = 2 * out
    position = (length * (2 * torch.arange(out, device=start.device) + 1) - out).clamp_min(0)
    first = torch.minimum(position // unit, length - 1)
    fraction = (position - first * unit).clamp(0, unit)
    second = first + (first < length - 1).long()
    index = torch.stack([first, second], dim=-1) + start[:, None, None]
    return index, torch.stack([unit - fraction, fraction], dim=-1)
