"""SD-RPN the plain way, one sample at a time: the oracle of the fast path.

Stage 1 runs layers 0..K-1 and the RPN; the map goes to the CPU and is post-processed with NumPy
and scikit-image; the RoI is cut from the PIL image and resized by the processor itself; stage 2 is
a fresh call on the stage-2 input: both views through the vision tower, the whole
[prefix | RoI tokens | question] sequence through every layer. Nothing is
shared with the fast path's RoI code (``sdrpn.roi``, ``sdrpn.ops``, the static layouts and masks):
only the model adapter, the RPN module and the decode loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..models.base import ModelAdapter
from ..models.geometry import to_rgb_array
from ..roi import RoIOptions
from ..rpn import RPN
from .generation import Decoded, SamplingConfig, decode

__all__ = ["ReferenceRoI", "reference_roi", "reference_generate"]


@dataclass
class ReferenceRoI:
    """The RoI of one sample, computed on the CPU.

    Attributes:
        prob: (H, W) float64 blurred probabilities.
        boxes: kept component boxes ``[x0, y0, x1, y1)`` on the grid (grown when small).
        cells: (H, W) bool RoI cells.
        mode: "none", "box" or "mask".
        square: ``(x0, y0, side)`` of the source-pixel crop, or None.
        keep: (H * W,) bool tokens of the RoI view that enter stage 2, or None.
    """

    prob: np.ndarray
    boxes: list
    cells: np.ndarray
    mode: str
    square: tuple | None = None
    keep: np.ndarray | None = None


def _components(prob: np.ndarray, options: RoIOptions):
    """Kept component boxes and RoI cells, with scikit-image."""
    from skimage.measure import label, regionprops

    height, width = prob.shape
    labels = label(prob > options.threshold, connectivity=2 if options.connectivity == 8 else 1)
    boxes, cells = [], np.zeros(prob.shape, dtype=bool)
    regions = [r for r in regionprops(labels, intensity_image=prob) if options.drop_area < r.area <= options.max_area]
    if options.max_regions is not None:  # the strongest peaks; sorted() is stable, so ties keep label order
        strongest = sorted(regions, key=lambda r: -r.intensity_max)[:options.max_regions]
        regions = sorted(strongest, key=lambda r: r.label)
    for region in regions:
        y0, x0, y1, x1 = region.bbox
        cells |= labels == region.label
        if region.area < options.min_area:  # too small to read: a grow_to x grow_to box around its centre
            x0, x1 = _grow((x0 + x1 - 1) // 2, options.grow_to, width)
            y0, y1 = _grow((y0 + y1 - 1) // 2, options.grow_to, height)
            cells[y0:y1, x0:x1] = True
        boxes.append((x0, y0, x1, y1))
    return boxes, cells


def _grow(centre: int, size: int, extent: int) -> tuple[int, int]:
    if size >= extent:
        return 0, extent
    start = min(max(centre - size // 2, 0), extent - size)
    return start, start + size


def _square(box, width: int, height: int) -> tuple[int, int, int]:
    """The square crop around a source-pixel box (see ``sdrpn.models.geometry.square_crop_boxes``)."""
    x0, y0, x1, y1 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    side = max(x1 - x0, y1 - y0, 1)

    def place(start, extent, limit):
        if side > limit:
            return -((side - limit) // 2)
        return min(max(start - (side - extent) // 2, 0), limit - side)

    return place(x0, x1 - x0, width), place(y0, y1 - y0, height), side


def reference_roi(logits: np.ndarray, image: Image.Image, adapter: ModelAdapter, options: RoIOptions) -> ReferenceRoI:
    """Post-processes one RPN map on the CPU (scikit-image) and places the RoI view."""
    from skimage.filters import gaussian

    grid = adapter.image_grid
    geometry = adapter.geometry
    prob = 1.0 / (1.0 + np.exp(-logits.reshape(grid).astype(np.float64)))
    if options.blur:  # 3x3 Gaussian, sigma 1, mirrored edges
        prob = gaussian(prob, sigma=1.0, mode="mirror", truncate=1.0, preserve_range=True)
    boxes, cells = _components(prob, options)
    if options.strategy == "none" or not boxes:
        return ReferenceRoI(prob=prob, boxes=boxes, cells=cells, mode="none")
    mode = "mask" if options.strategy == "mask" and len(boxes) > 1 else "box"
    rows, cols = np.nonzero(cells)
    region = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)

    transform = geometry.transform(image.size)
    width, height = image.size
    cell_w, cell_h = geometry.input_size[1] / grid[1], geometry.input_size[0] / grid[0]
    view_box = (region[0] * cell_w, region[1] * cell_h, region[2] * cell_w, region[3] * cell_h)
    x0, y0, x1, y1 = transform.view_to_source(view_box)
    source_box = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                  min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    square = _square(source_box, width, height)

    if mode == "box":
        keep = np.ones(grid[0] * grid[1], dtype=bool)
    else:  # a token is kept when its patch centre lies inside the image on a RoI cell
        (a_x, a_y), (b_x, b_y) = transform.scale, transform.offset
        keep = np.zeros(grid, dtype=bool)
        for row in range(grid[0]):
            for col in range(grid[1]):
                source_x = square[0] + ((col + 0.5) * cell_w) * (square[2] / geometry.input_size[1])
                source_y = square[1] + ((row + 0.5) * cell_h) * (square[2] / geometry.input_size[0])
                cell_x = math.floor((source_x - b_x) / a_x / cell_w)
                cell_y = math.floor((source_y - b_y) / a_y / cell_h)
                keep[row, col] = (0 <= source_x < width and 0 <= source_y < height
                                  and 0 <= cell_x < grid[1] and 0 <= cell_y < grid[0] and cells[cell_y, cell_x])
        keep = keep.reshape(-1)
    return ReferenceRoI(prob=prob, boxes=boxes, cells=cells, mode=mode, square=square, keep=keep)


def _crop(image: Image.Image, square, pad_color) -> Image.Image:
    """The square crop as a PIL image; parts beyond the image show the pad colour."""
    x0, y0, side = square
    canvas = Image.new("RGB", (side, side), tuple(pad_color))
    canvas.paste(Image.fromarray(to_rgb_array(image)), (-x0, -y0))
    return canvas


def reference_generate(
    adapter: ModelAdapter,
    rpn: RPN,
    processor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor,
    images,
    options: RoIOptions,
    sampling: SamplingConfig,
    roi_logits: torch.Tensor | None = None,
    keep_logits: bool = False,
) -> tuple[list[Decoded], list[ReferenceRoI]]:
    """Two-stage generation for each sample alone; returns its decoded tokens and its RoI."""
    if processor is None:
        raise ValueError("the reference path crops with the processor: pass processor= (or its image processor)")
    image_processor = getattr(processor, "image_processor", processor)
    decoded, rois = [], []
    for sample in range(input_ids.shape[0]):
        real = attention_mask[sample].bool() if attention_mask is not None else slice(None)
        ids = input_ids[sample][real][None].to(adapter.device)
        embedded = adapter.embed(ids, pixel_values[sample : sample + 1])
        image_end = int(embedded.image_start[0]) + adapter.image_length

        # Stage 1: layers 0..K-1, RPN on the last prompt token.
        hidden = adapter.run_layers(embedded.inputs_embeds, 0, rpn.start_layer, embedded.position_ids)
        logits = rpn(hidden, ids.shape[1] - 1, embedded.image_start)
        if roi_logits is not None:
            logits = roi_logits[sample].reshape(logits.shape)
        roi = reference_roi(logits[0].float().cpu().numpy(), images[sample], adapter, options)
        rois.append(roi)

        # Stage 2 from scratch, as a plain two-image call would do it: both views through the vision
        # tower, [prefix | RoI tokens | question] through every layer.
        views = pixel_values[sample : sample + 1]
        if roi.mode != "none":
            crop = _crop(images[sample], roi.square, adapter.geometry.pad_color)
            crop_view = image_processor(crop, return_tensors="pt")["pixel_values"]
            views = torch.cat([views, crop_view.to(device=views.device, dtype=views.dtype)])
        features = adapter.encode_images(views)
        embeds = adapter.embed(ids, image_features=features[:1]).inputs_embeds
        parts = [embeds[:, :image_end]]
        if roi.mode != "none":
            parts.append(features[1:, torch.from_numpy(roi.keep).to(features.device)])
        parts.append(embeds[:, image_end:])
        sequence = torch.cat(parts, dim=1)
        positions = torch.arange(sequence.shape[1], device=sequence.device)[None]
        cache = adapter.new_cache()
        hidden = adapter.run_layers(sequence, 0, adapter.num_layers, positions, None, cache)
        decoded.append(decode(adapter, cache, adapter.logits(hidden[:, -1]), None,
                              torch.tensor([sequence.shape[1]], device=sequence.device), sampling, keep_logits))
    return decoded, rois
