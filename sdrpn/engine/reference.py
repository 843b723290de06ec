"""SD-RPN the plain way, one sample at a time: the oracle of the fast path.

Stage 1 runs layers 0..K-1 and the RPN; the map goes to the CPU and is post-processed with NumPy
and scikit-image; the RoI is cut from the PIL image and resized by the processor itself; stage 2 is
a fresh call on the stage-2 input: both views through the vision tower, the whole
[prefix | RoI tokens | question] sequence through every layer. Nothing is
shared with the fast path's RoI code (``sdrpn.roi``, ``sdrpn.ops``, the static layouts and masks):
only the model adapter, the RPN module and the decode loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

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
        cells: (H, W) bool cells of the original view that the second view shows.
        mode: "none", "box" or "mask".
        region: the grid box ``[x0, y0, x1, y1)`` the second view is cut from, or None.
        crop: ``(x0, y0, width, height)`` of the source-pixel rectangle, or None.
        keep: (H * W,) bool tokens of the RoI view that enter stage 2, or None.
    """

    prob: np.ndarray
    boxes: list
    cells: np.ndarray
    mode: str
    region: tuple | None = None
    crop: tuple | None = None
    keep: np.ndarray | None = None


def _components(labels: np.ndarray, prob: np.ndarray, options: RoIOptions):
    """Kept component boxes and the labels of the kept components, with scikit-image."""
    from skimage.measure import regionprops

    height, width = prob.shape
    regions = [r for r in regionprops(labels, intensity_image=prob) if options.drop_area < r.area <= options.max_area]
    if options.max_regions is not None:  # the strongest peaks; sorted() is stable, so ties keep label order
        strongest = sorted(regions, key=lambda r: -r.intensity_max)[:options.max_regions]
        regions = sorted(strongest, key=lambda r: r.label)
    boxes = []
    for region in regions:
        y0, x0, y1, x1 = region.bbox
        if region.area < options.min_area:  # too small to read: widened as the authors widen it
            x0, x1 = _widen(x0, x1, width, options.grow_to)
            y0, y1 = _widen(y0, y1, height, options.grow_to)
        boxes.append((x0, y0, x1, y1))
    return boxes, [region.label for region in regions]


def _widen(start: int, stop: int, extent: int, minimum: int) -> tuple[int, int]:
    """The authors' widening of a small component's extent ``[start, stop)``: a span of
    ``max(minimum, stop - start + 1)`` around its midpoint, both ends truncated toward zero, the
    start kept >= 0 and the end <= extent - 1 (``LLaVA/llava/ana_utils.py`` ~795-803)."""
    middle, span = (start + stop) / 2, max(minimum, stop - start + 1)
    return max(0, int(middle - span / 2)), min(extent - 1, int(middle + span / 2))


def _enclosing(cells: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(cells)
    return (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def _source_rectangle(region, image_size, geometry, grid) -> tuple[int, int, int, int]:
    """``(x0, y0, width, height)`` of a grid box in source pixels: the authors' mapping in float32
    (see ``ImageGeometry.crop_map``), clamped, truncated, at least one pixel."""
    pad_x, ratio_x, pad_y, ratio_y = (np.float32(v) for v in geometry.crop_map(image_size))
    cell_w = np.float32(geometry.input_size[1] / grid[1])
    cell_h = np.float32(geometry.input_size[0] / grid[0])
    width, height = image_size
    xs = [int(min(max((np.float32(v) * cell_w - pad_x) / ratio_x, 0), width)) for v in region[0::2]]
    ys = [int(min(max((np.float32(v) * cell_h - pad_y) / ratio_y, 0), height)) for v in region[1::2]]
    x0, y0 = min(xs[0], width - 1), min(ys[0], height - 1)
    return x0, y0, max(xs[1], x0 + 1) - x0, max(ys[1], y0 + 1) - y0


def _bilinear_keep(cells: np.ndarray, region, grid) -> np.ndarray:
    """(H * W,) bool: the region's cells resized bilinearly (half-pixel centres, edges clamped) to
    the grid, above one half, in exact fractions."""
    x0, y0, x1, y1 = region
    cut = cells[y0:y1, x0:x1].astype(int)

    def taps(length, out):
        result = []
        for i in range(out):
            source = max(Fraction(length * (2 * i + 1) - out, 2 * out), Fraction(0))
            first = min(int(source), length - 1)
            weight = min(max(source - first, Fraction(0)), Fraction(1))
            result.append((first, min(first + 1, length - 1), 1 - weight, weight))
        return result

    keep = np.zeros(grid, dtype=bool)
    for row, (r0, r1, wr0, wr1) in enumerate(taps(cut.shape[0], grid[0])):
        for col, (c0, c1, wc0, wc1) in enumerate(taps(cut.shape[1], grid[1])):
            value = (wr0 * (wc0 * cut[r0, c0] + wc1 * cut[r0, c1]) + wr1 * (wc0 * cut[r1, c0] + wc1 * cut[r1, c1]))
            keep[row, col] = value > Fraction(1, 2)
    return keep.reshape(-1)


def reference_roi(logits: np.ndarray, image: Image.Image, adapter: ModelAdapter, options: RoIOptions) -> ReferenceRoI:
    """Post-processes one RPN map on the CPU (scikit-image) and places the RoI view."""
    from skimage.filters import gaussian
    from skimage.measure import label

    grid = adapter.image_grid
    prob = 1.0 / (1.0 + np.exp(-logits.reshape(grid).astype(np.float64)))
    if options.blur:  # 3x3 Gaussian, sigma 1, mirrored edges
        prob = gaussian(prob, sigma=1.0, mode="mirror", truncate=1.0, preserve_range=True)
    mask = prob > options.threshold
    labels = label(mask, connectivity=2 if options.connectivity == 8 else 1)
    boxes, kept = _components(labels, prob, options)
    empty = np.zeros(grid, dtype=bool)
    if options.strategy == "none" or not boxes:
        return ReferenceRoI(prob=prob, boxes=boxes, cells=empty, mode="none")
    if options.strategy == "mask" and len(boxes) > 1:
        # The box around the whole mask (the chosen components' cells with max_regions).
        mode, cells = "mask", mask if options.max_regions is None else np.isin(labels, kept)
        region = _enclosing(cells)
    else:
        mode = "box"
        region = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        cells = empty.copy()
        cells[region[1]:region[3], region[0]:region[2]] = True
    crop = _source_rectangle(region, image.size, adapter.geometry, grid)
    keep = np.ones(grid[0] * grid[1], dtype=bool) if mode == "box" else _bilinear_keep(cells, region, grid)
    return ReferenceRoI(prob=prob, boxes=boxes, cells=cells, mode=mode, region=region, crop=crop, keep=keep)


def _roi_view(image: Image.Image, crop, input_size) -> Image.Image:
    """The crop stretched to the vision input with PIL's bilinear filter, as the authors make it."""
    x0, y0, width, height = crop
    rgb = Image.fromarray(to_rgb_array(image))
    return rgb.crop((x0, y0, x0 + width, y0 + height)).resize((input_size[1], input_size[0]), Image.BILINEAR)


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
            view = _roi_view(images[sample], roi.crop, adapter.geometry.input_size)
            crop_view = image_processor(view, return_tensors="pt")["pixel_values"]
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
