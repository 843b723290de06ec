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
        keep: (H' * W',) bool tokens of the RoI view that enter stage 2, or None.
        view_grid: the RoI view's token grid ``(H', W')``, or None.
        dropped: original-view tokens pruned from stage 2 (``RoIOptions.prune_above``).
    """

    prob: np.ndarray
    boxes: list
    cells: np.ndarray
    mode: str
    region: tuple | None = None
    crop: tuple | None = None
    keep: np.ndarray | None = None
    view_grid: tuple | None = None
    dropped: int = 0


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


def reference_roi(logits: np.ndarray, image: Image.Image, adapter: ModelAdapter, options: RoIOptions,
                  grid: tuple[int, int] | None = None, view_grid: tuple[int, int] | None = None) -> ReferenceRoI:
    """Post-processes one RPN map on the CPU (scikit-image) and places the RoI view.

    ``grid``: the map's token grid (default: the family's fixed one). ``view_grid``: the RoI view's
    token grid, where it is known before the crop (fixed-size views, the default); otherwise
    ``keep`` is left None, for :func:`reference_keep` once the view is encoded.
    """
    from skimage.filters import gaussian
    from skimage.measure import label

    grid = tuple(grid or adapter.image_grid)
    logits = logits.reshape(grid).astype(np.float64)
    if options.edge_sink_above is not None and grid[0] * grid[1] > options.edge_sink_above:
        logits[: grid[0] // 4, 0] = -np.inf  # the authors zero these probabilities
        logits[0, : grid[1] // 4] = -np.inf
    prob = 1.0 / (1.0 + np.exp(-logits))
    if options.blur:  # 3x3 Gaussian, sigma 1, mirrored edges
        prob = gaussian(prob, sigma=1.0, mode="mirror", truncate=1.0, preserve_range=True)
    mask = prob > options.threshold
    labels = label(mask, connectivity=2 if options.connectivity == 8 else 1)
    boxes, kept = _components(labels, prob, options)
    empty = np.zeros(grid, dtype=bool)
    chosen = mask if options.max_regions is None else np.isin(labels, kept)
    whole_mask = options.strategy == "masked" and chosen.any()
    if options.strategy == "none" or not (boxes or whole_mask):
        return ReferenceRoI(prob=prob, boxes=boxes, cells=empty, mode="none")
    if whole_mask or (options.strategy == "mask" and len(boxes) > 1):
        # The box around the whole mask (the chosen components' cells with max_regions).
        mode, cells = "mask", chosen
        region = _enclosing(cells)
    else:
        mode = "box"
        region = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        cells = empty.copy()
        cells[region[1]:region[3], region[0]:region[2]] = True
    if adapter.roi_views_on_device:
        crop = _source_rectangle(region, image.size, adapter.geometry, grid)
        view_grid = view_grid or tuple(adapter.image_grid)
    else:  # the family's own mapping of a grid box to source pixels
        crop = tuple(_family_rectangle(adapter, region, grid, image))
    roi = ReferenceRoI(prob=prob, boxes=boxes, cells=cells, mode=mode, region=region, crop=crop)
    return reference_keep(roi, view_grid) if view_grid is not None else roi


def reference_keep(roi: ReferenceRoI, view_grid: tuple[int, int]) -> ReferenceRoI:
    """``roi`` with the tokens of its view (of ``view_grid`` tokens) that enter stage 2."""
    count = view_grid[0] * view_grid[1]
    roi.view_grid = tuple(view_grid)
    roi.keep = np.ones(count, dtype=bool) if roi.mode == "box" else _bilinear_keep(roi.cells, roi.region, view_grid)
    return roi


def _family_rectangle(adapter: ModelAdapter, region, grid, image: Image.Image) -> list[int]:
    """The family's own source rectangle of a grid box (views the processor sizes)."""
    from ..roi import SourceImages

    sources = SourceImages.from_pil([image], adapter.geometry, "cpu")
    return adapter.roi_source_rects(torch.tensor([region]), torch.tensor([grid]), sources)[0].tolist()


def reference_generate(
    adapter: ModelAdapter,
    rpn: RPN,
    processor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values,
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
        view = adapter.select_view(pixel_values, sample)
        grid = adapter.view_grids(view)[0]
        embedded = adapter.embed(ids, view)
        image_end = int(embedded.image_start[0]) + grid[0] * grid[1]

        # Stage 1: layers 0..K-1, RPN on the last prompt token.
        hidden = adapter.run_layers(embedded.inputs_embeds, 0, rpn.start_layer, embedded.position_ids,
                                    rope_position_ids=embedded.rope_position_ids, additions=embedded.layer_additions)
        count = grid[0] * grid[1]
        prunes = options.prune_above is not None and count > options.prune_above
        logits = rpn(hidden, ids.shape[1] - 1, embedded.image_start, rope_position_ids=embedded.rope_position_ids,
                     image_lengths=[count], question_start=image_end if prunes else None)
        logits, question = logits if prunes else (logits, None)
        if roi_logits is not None:  # (B, H, W), a row's grid at its top left, or (B, H * W)
            forced = roi_logits[sample]
            logits = forced.reshape(grid) if forced.ndim == 1 else forced[: grid[0], : grid[1]]
        roi = reference_roi(logits.float().cpu().numpy(), images[sample], adapter, options, grid)
        rois.append(roi)

        # Stage 2 from scratch, as a plain two-image call would do it: both views through the vision
        # tower, [prefix | RoI block | question] through every layer, the RoI's dropped tokens
        # removed after the model's own code placed every token (the authors' way).
        features, injected = adapter.encode_views_full(view)
        grids, sequence_ids = [grid], ids
        selected = torch.ones(ids.shape[1], dtype=torch.bool)
        if roi.mode != "none":
            x0, y0, width, height = roi.crop
            picture = Image.fromarray(to_rgb_array(images[sample])).crop((x0, y0, x0 + width, y0 + height))
            roi_view = adapter.roi_vision_input([picture], image_processor)
            roi_grid = adapter.view_grids(roi_view)[0]
            reference_keep(roi, roi_grid)
            roi_features, roi_injected = adapter.encode_views_full(roi_view)
            features = features + roi_features
            injected = {layer: views + roi_injected[layer] for layer, views in injected.items()}
            before, after = (torch.tensor(part, dtype=torch.long, device=ids.device) for part in adapter.roi_block_ids)
            block = torch.full((roi_grid[0] * roi_grid[1],), adapter.image_token_id, device=ids.device)
            insert = image_end + adapter.prefix_tail  # where the RoI block goes
            sequence_ids = torch.cat([ids[0, :insert], before, block, after, ids[0, insert:]])[None]
            grids.append(roi_grid)
            keep = torch.from_numpy(roi.keep)
            if question is not None:  # original tokens no question token looks at are dropped
                selected[image_end - count:image_end] = question[0].sigmoid().cpu() > options.prune_threshold
                roi.dropped = int((~selected).sum())
            selected = torch.cat([selected[:insert], torch.ones(len(before), dtype=torch.bool), keep,
                                  torch.ones(len(after), dtype=torch.bool), selected[insert:]])
        embeds = adapter.embed_ids(sequence_ids)
        is_image = (sequence_ids == adapter.image_token_id)[..., None]
        embeds = embeds.masked_scatter(is_image, torch.cat(features).to(embeds.dtype))
        # Injected features at every image token of both views, zeros elsewhere.
        additions = {layer: torch.zeros_like(embeds).masked_scatter(is_image, torch.cat(views).to(embeds.dtype))
                     for layer, views in injected.items()}
        rope = adapter.sequence_rope_positions(sequence_ids, grids)
        selected = selected.to(embeds.device)
        sequence = embeds[:, selected]
        additions = {layer: values[:, selected] for layer, values in additions.items()}
        rope = None if rope is None else rope[:, :, selected]
        length = sequence.shape[1]
        positions = torch.arange(length, device=sequence.device)[None]
        cache = adapter.new_cache()
        hidden = adapter.run_layers(sequence, 0, adapter.num_layers, positions, None, cache, rope, additions)
        rope_delta = None if rope is None else (rope.amax() + 1 - length).reshape(1)
        decoded.append(decode(adapter, cache, adapter.logits(hidden[:, -1]), None,
                              torch.tensor([length], device=sequence.device), sampling, keep_logits, rope_delta))
    return decoded, rois
