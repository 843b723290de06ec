"""From RPN logits to the second view: RoI mask, components, boxes, crop and token selection.

Every step runs on the device with static shapes and without host synchronisation (DESIGN
section 3.2):

    logits --roi_mask--> prob, mask --connected_components--> labels --component_boxes--> boxes
    --> RoI cells (kept components) + strategy --> region (grid box) --> square crop in source pixels
    --> PIL-exact resize + normalise --> pixel_values of the RoI view
    --> keep mask over the view's tokens (all for box upscaling, the ones under the RoI cells for
        masked upscaling, none without a RoI)

Strategies: ``"mask"`` (1 component: box upscaling, >= 2: masked upscaling), ``"box"`` (always box
upscaling of the region enclosing all components) and ``"none"`` (never a second view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .models.geometry import ImageGeometry, resample_views, square_crop_boxes, to_rgb_array

__all__ = [
    "THRESHOLDS",
    "STRATEGIES",
    "RoIOptions",
    "RoIProposal",
    "SourceImages",
    "propose",
    "forced_logits",
    "grid_box_squares",
    "region_squares",
    "roi_views",
    "roi_token_keep",
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
STRATEGIES = ("mask", "box", "none")
MODE_NONE, MODE_BOX, MODE_MASK = 0, 1, 2


@dataclass(frozen=True)
class RoIOptions:
    """Post-processing of RPN maps (defaults: the authors' LLaVA-1.5 setting).

    Attributes:
        strategy: "mask", "box" or "none".
        threshold: probability threshold of the blurred map (strict ``>``).
        blur: 3x3 Gaussian blur (sigma 1) before thresholding.
        connectivity: 8 (or 4) for connected components.
        drop_area: components of at most this many cells are noise.
        max_area: components of more cells are dropped.
        min_area, grow_to: components of fewer than ``min_area`` cells become ``grow_to`` squares.
        max_components: component slots reported per image (more are counted, not listed).
        max_regions: keep only this many components, those of the highest peak probability
            (ties: the first in raster order); None keeps them all, as the authors do. With 1,
            every RoI is the box upscaling of the strongest region.
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
        cells: (B, H, W) bool RoI cells: the pixels of kept components and the grown boxes.
        region: (B, 4) int64 grid box enclosing ``cells`` (zeros without a RoI).
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
    prob, mask = ops.roi_mask(logits, options.threshold, options.blur)
    labels = ops.connected_components(mask, options.connectivity)

    # RoI cells: the pixels of the components that pass the area filters (per-label pixel counts) ...
    flat = labels.reshape(batch, -1).long()
    label_area = torch.zeros(batch, grid[0] * grid[1] + 1, dtype=torch.long, device=logits.device)
    label_area.scatter_add_(1, flat, torch.ones_like(flat))
    kept_label = (label_area > options.drop_area) & (label_area <= options.max_area)
    kept_label[:, 0] = False  # background
    if options.max_regions is not None:
        kept_label = _strongest(prob, flat, kept_label, options.max_regions)
    cells = kept_label.gather(1, flat).view(batch, *grid)
    if options.max_regions is not None:  # the other components become background before the boxes
        labels = torch.where(cells, labels, 0)
    boxes, areas, valid, counts, overflow = ops.component_boxes(
        labels, options.max_components, options.drop_area, options.min_area, options.grow_to, options.max_area
    )
    total = counts.long() + overflow.long()
    # ... and the grown boxes of the small ones.
    rows = torch.arange(grid[0], device=logits.device)[:, None]
    cols = torch.arange(grid[1], device=logits.device)
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
    in_box = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)  # (B, M, H, W)
    small = valid & (areas < options.min_area)
    cells = cells | (in_box & small[..., None, None]).any(dim=1)

    region = _enclosing_box(cells)
    if options.strategy == "none":
        mode = torch.zeros(batch, dtype=torch.long, device=logits.device)
    elif options.strategy == "box":
        mode = torch.where(total > 0, MODE_BOX, MODE_NONE)
    else:
        mode = torch.where(total > 1, MODE_MASK, torch.where(total > 0, MODE_BOX, MODE_NONE))
    return RoIProposal(logits=logits, prob=prob, mask=mask, boxes=boxes, valid=valid, counts=total.int(),
                       cells=cells, region=region, mode=mode)


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
        pixels: (B, 3, H_max, W_max) uint8 RGB, each image at the top-left corner.
        sizes: (B, 2) int64 ``(width, height)``.
        transforms: (B, 4) float64 view-to-source maps ``[a_x, b_x, a_y, b_y]``.
        max_side: the longest image side (bounds the crop squares).
        mean, std: (3, 1, 1) float32 normalisation constants, uploaded with the images.
    """

    pixels: torch.Tensor
    sizes: torch.Tensor
    transforms: torch.Tensor
    max_side: int
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_pil(cls, images, geometry: ImageGeometry, device) -> SourceImages:
        """Converts PIL images as the processor does (RGB, alpha on white where it composites) and
        uploads them in one transfer."""
        arrays = [to_rgb_array(image) for image in images]
        height = max(array.shape[0] for array in arrays)
        width = max(array.shape[1] for array in arrays)
        canvas = np.zeros((len(arrays), height, width, 3), dtype=np.uint8)
        for index, array in enumerate(arrays):
            canvas[index, : array.shape[0], : array.shape[1]] = array
        pixels = torch.from_numpy(canvas)
        sizes = [(array.shape[1], array.shape[0]) for array in arrays]
        pin = torch.device(device).type == "cuda"
        return cls(
            pixels=(pixels.pin_memory() if pin else pixels).to(device, non_blocking=True).permute(0, 3, 1, 2),
            sizes=torch.tensor(sizes, dtype=torch.long).to(device),
            transforms=geometry.transforms_tensor(sizes).to(device),
            max_side=max(max(size) for size in sizes),
            mean=torch.tensor(geometry.image_mean, dtype=torch.float32).view(3, 1, 1).to(device),
            std=torch.tensor(geometry.image_std, dtype=torch.float32).view(3, 1, 1).to(device),
        )


def grid_box_squares(boxes: torch.Tensor, sources: SourceImages, geometry: ImageGeometry,
                     grid: tuple[int, int]) -> torch.Tensor:
    """(B, 3) int64 square crops ``[x0, y0, side]`` in source pixels around (B, 4) grid boxes."""
    view_h, view_w = geometry.input_size
    cell_w, cell_h = view_w / grid[1], view_h / grid[0]
    x0, y0, x1, y1 = boxes.double().unbind(1)
    a_x, b_x, a_y, b_y = sources.transforms.unbind(1)
    # Grid cells -> view pixels -> source pixels, clipped to the image.
    source_box = torch.stack([a_x * (x0 * cell_w) + b_x, a_y * (y0 * cell_h) + b_y,
                              a_x * (x1 * cell_w) + b_x, a_y * (y1 * cell_h) + b_y], dim=1)
    limits = sources.sizes.double().repeat(1, 2)
    source_box = torch.minimum(source_box.clamp_min(0.0), limits)
    return square_crop_boxes(source_box, sources.sizes)


def region_squares(proposal: RoIProposal, sources: SourceImages, geometry: ImageGeometry,
                   grid: tuple[int, int]) -> torch.Tensor:
    """(B, 3) int64 square crops ``[x0, y0, side]`` in source pixels around each sample's region
    (the whole kept view when there is no RoI, so that shapes stay static)."""
    has_roi = (proposal.mode > MODE_NONE)[:, None]
    whole = torch.stack([torch.zeros_like(proposal.region[:, 0]), torch.zeros_like(proposal.region[:, 0]),
                         torch.full_like(proposal.region[:, 0], grid[1]),
                         torch.full_like(proposal.region[:, 0], grid[0])], dim=1)
    return grid_box_squares(torch.where(has_roi, proposal.region, whole), sources, geometry, grid)


def roi_views(squares: torch.Tensor, sources: SourceImages, geometry: ImageGeometry) -> torch.Tensor:
    """(B, 3, H, W) float32 ``pixel_values`` of the RoI views (square crops resized as PIL does)."""
    views = resample_views(sources.pixels, sources.sizes, squares, geometry.input_size, geometry.resample,
                           geometry.pad_color, sources.max_side)
    return geometry.normalize(views, sources.mean, sources.std)


def roi_token_keep(proposal: RoIProposal, squares: torch.Tensor, sources: SourceImages,
                   geometry: ImageGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H * W) bool: which tokens of each RoI view enter stage 2.

    Box upscaling keeps them all; masked upscaling keeps a token when the centre of its patch lies
    inside the image on a RoI cell of the original view; no RoI keeps none.
    """
    device = squares.device
    view_h, view_w = geometry.input_size
    rows = (torch.arange(grid[0], device=device, dtype=torch.float64) + 0.5) * (view_h / grid[0])
    cols = (torch.arange(grid[1], device=device, dtype=torch.float64) + 0.5) * (view_w / grid[1])
    x0, y0, side = (squares[:, i].double() for i in range(3))
    # Patch centres of the RoI view in source pixels, then in cells of the original view.
    source_x = x0[:, None] + cols[None] * (side[:, None] / view_w)  # (B, W)
    source_y = y0[:, None] + rows[None] * (side[:, None] / view_h)  # (B, H)
    a_x, b_x, a_y, b_y = (t[:, None] for t in sources.transforms.unbind(1))
    cell_x = torch.floor((source_x - b_x) / a_x / (view_w / grid[1])).long()
    cell_y = torch.floor((source_y - b_y) / a_y / (view_h / grid[0])).long()
    width, height = sources.sizes[:, 0, None].double(), sources.sizes[:, 1, None].double()
    ok_x = (cell_x >= 0) & (cell_x < grid[1]) & (source_x >= 0) & (source_x < width)
    ok_y = (cell_y >= 0) & (cell_y < grid[0]) & (source_y >= 0) & (source_y < height)
    batch = squares.shape[0]
    flat_index = cell_y.clamp(0, grid[0] - 1)[:, :, None] * grid[1] + cell_x.clamp(0, grid[1] - 1)[:, None, :]
    on_cells = proposal.cells.reshape(batch, -1).gather(1, flat_index.reshape(batch, -1)).view(batch, *grid)
    under_mask = on_cells & ok_y[:, :, None] & ok_x[:, None, :]
    mode = proposal.mode[:, None, None]
    keep = torch.where(mode == MODE_BOX, torch.ones_like(under_mask), under_mask & (mode == MODE_MASK))
    return keep.reshape(batch, -1)
