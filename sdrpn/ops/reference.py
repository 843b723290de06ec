"""Pure-PyTorch reference implementations of the sdrpn ops.

They define the semantics the compiled kernels must reproduce, run on any device, are vectorised
over the batch, and serve as the fallback when the compiled extension is unavailable. They do not
validate their arguments: call them through :mod:`sdrpn.ops` for checked inputs.

Apart from :func:`connected_components` (an iterative algorithm that checks for convergence) and
:func:`pack_tokens` (whose output size depends on the data), none of them synchronises with the
host.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "rpn_scores",
    "roi_mask",
    "connected_components",
    "component_boxes",
    "pack_tokens",
    "pack_tokens_padded",
    "unpack_tokens",
]

# 1-D Gaussian with sigma 1 on the taps (-1, 0, 1), normalised to sum 1.
_GAUSS_TAIL = math.exp(-0.5)
BLUR_SIDE = _GAUSS_TAIL / (1.0 + 2.0 * _GAUSS_TAIL)
BLUR_CENTRE = 1.0 / (1.0 + 2.0 * _GAUSS_TAIL)


def rpn_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Mean over heads and query rows of the scaled per-head dot products.

    Args:
        q: (B, Q, D) query states, float32 / bfloat16 / float16.
        k: (B, N, D) key states, same dtype as ``q``.
        num_heads: number of heads; ``D`` is split into ``num_heads`` slices of ``D / num_heads``.
        scale: factor applied to every dot product.

    Returns:
        (B, N) float32: ``out[b, n] = mean_{h, i} (q[b, i, h] . k[b, n, h]) * scale``, computed in
        float32 from the inputs converted element by element.
    """
    batch, queries, dim = q.shape
    head_dim = dim // num_heads
    q_heads = q.float().reshape(batch, queries, num_heads, head_dim)
    k_heads = k.float().reshape(batch, k.shape[1], num_heads, head_dim)
    dots = torch.einsum("bqhd,bnhd->bn", q_heads, k_heads)
    return dots * (scale / (queries * num_heads))


def _reflect_neighbours(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the previous and next element along a dimension with reflect padding.

    Mirrors without repeating the edge (-1 -> 1, size -> size - 2); a dimension of size 1 is its
    own neighbour.
    """
    index = torch.arange(size, device=device)
    if size == 1:
        return index, index
    before = (index - 1).abs()
    after = (size - 1) - ((size - 2) - index).abs()
    return before, after


def _blur_along(values: torch.Tensor, dim: int) -> torch.Tensor:
    before, after = _reflect_neighbours(values.shape[dim], values.device)
    return (
        BLUR_SIDE * values.index_select(dim, before)
        + BLUR_CENTRE * values
        + BLUR_SIDE * values.index_select(dim, after)
    )


def roi_mask(logits: torch.Tensor, threshold: float, blur: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-of-interest probability map and mask.

    Args:
        logits: (B, H, W) float32 / bfloat16 / float16 logits.
        threshold: mask threshold in [0, 1].
        blur: apply the 3x3 Gaussian blur (sigma 1, reflect padding, weights summing to 1) to the
            probabilities, horizontally then vertically.

    Returns:
        ``(prob, mask)``: (B, H, W) float32 probabilities ``sigmoid(logits)`` (blurred if ``blur``)
        and the (B, H, W) bool mask ``prob > threshold``.
    """
    prob = torch.sigmoid(logits.float())
    if blur and prob.numel() > 0:
        prob = _blur_along(_blur_along(prob, 2), 1)
    return prob, prob > threshold


def _neighbour_pairs(mask: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into ``mask.flatten()``) of every pair of adjacent foreground pixels."""
    batch, height, width = mask.shape
    flat_index = torch.arange(mask.numel(), device=mask.device).reshape(batch, height, width)
    # Forward half of the neighbourhood: every undirected edge appears once.
    steps = [(0, 1), (1, 0)] if connectivity == 4 else [(0, 1), (1, -1), (1, 0), (1, 1)]
    sources, targets = [], []
    for dy, dx in steps:
        x_from, x_to = max(0, -dx), width - max(0, dx)
        here = (slice(None), slice(0, height - dy), slice(x_from, x_to))
        there = (slice(None), slice(dy, height), slice(x_from + dx, x_to + dx))
        both = mask[here] & mask[there]
        sources.append(flat_index[here][both])
        targets.append(flat_index[there][both])
    return torch.cat(sources), torch.cat(targets)


def _compress(parent: torch.Tensor) -> torch.Tensor:
    """Pointer jumping until every pixel points directly at the root of its tree."""
    while True:
        grandparent = parent[parent]
        if torch.equal(grandparent, parent):
            return parent
        parent = grandparent


def connected_components(mask: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Connected-component labelling, numbered in raster order like ``skimage.measure.label``.

    Union-find with min-hooking and pointer jumping on the flat pixel index: every tree root is
    the smallest pixel index of its tree, and each round hooks the larger root of every edge that
    joins two trees onto the smaller one, then compresses the trees to stars. The number of rounds
    grows with the number of local minima along a component, not with its length, so long thin
    shapes such as spirals converge in a few rounds. The root of a finished component is its first
    pixel in raster order, so numbering the roots in order gives skimage's labels.

    Args:
        mask: (B, H, W) bool foreground mask.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).

    Returns:
        (B, H, W) int32 labels: 0 for background, components numbered 1..n per image in raster
        order of their first pixel.
    """
    batch, height, width = mask.shape
    mask = mask.contiguous()
    sources, targets = _neighbour_pairs(mask, connectivity)
    parent = torch.arange(mask.numel(), device=mask.device)
    while sources.numel() > 0:
        root_a, root_b = parent[sources], parent[targets]
        joins = root_a != root_b
        if not bool(joins.any()):
            break
        # Later rounds only need the edges that still join two trees.
        sources, targets = sources[joins], targets[joins]
        root_a, root_b = root_a[joins], root_b[joins]
        parent.scatter_reduce_(0, torch.maximum(root_a, root_b), torch.minimum(root_a, root_b), "amin")
        parent = _compress(parent)

    flat_mask = mask.reshape(-1)
    is_root = flat_mask & (parent == torch.arange(parent.numel(), device=parent.device))
    root_number = is_root.reshape(batch, height * width).cumsum(1, dtype=torch.int32).reshape(-1)
    labels = torch.where(flat_mask, root_number[parent], 0)
    return labels.to(torch.int32).reshape(batch, height, width)


def _grow_interval(
    lo: torch.Tensor, hi: torch.Tensor, min_width: int, extent: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of the authors' growth of a small component's tight extent ``[lo, hi)``.

    A window of width ``max(min_width, hi - lo + 1)`` centred on ``(lo + hi) / 2``, both ends
    truncated toward zero, the start clamped at 0 and the end at ``extent - 1``. Twice each end is
    an integer, so truncating integer division reproduces their float arithmetic exactly.
    """
    width = (hi - lo + 1).clamp(min=min_width)
    start = (lo + hi - width).div(2, rounding_mode="trunc").clamp(min=0)
    end = (lo + hi + width).div(2, rounding_mode="trunc").clamp(max=extent - 1)
    return start, end


def component_boxes(
    labels: torch.Tensor,
    max_components: int,
    drop_area: int = 1,
    min_area: int = 4,
    grow_to: int = 3,
    max_area: int = 225,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Filtered per-component boxes in fixed-size slots.

    For each component c (label value in ``[1, H * W]``; other values count as background) with
    pixel area ``a`` and tight box ``[x0, y0, x1, y1)`` (x = column, y = row), in this order:
    ``a <= drop_area`` drops it (noise); ``a > max_area`` drops it (too large);
    ``a < min_area`` grows its box as the authors do (YuHengsss/SD-RPN commit 00876ac,
    ``LLaVA/llava/ana_utils.py``, ``get_bbox_from_noisy_map``, lines ~795-803): per axis, with the
    wanted width ``w = max(grow_to, x1 - x0 + 1)``, the box becomes
    ``[max(0, trunc((x0 + x1 - w) / 2)), min(W - 1, trunc((x0 + x1 + w) / 2)))``, and rows alike
    with H. Their end is clamped at ``W - 1``, not ``W``: at the right or bottom border a grown box
    can be narrow and even miss the component's last column or row. With the defaults (areas 2
    and 3 grow) a grown box is 3 or 4 cells wide away from the borders, 2 or 3 at the left or top
    border and 1 to 3 at the right or bottom one. Kept components fill the first slots in label
    order.

    Args:
        labels: (B, H, W) int32 labels, e.g. from :func:`connected_components`.
        max_components: number of slots M.

    Returns:
        ``(boxes, areas, valid, counts, overflow)``: boxes (B, M, 4) int32 ``[x0, y0, x1, y1]``,
        areas (B, M) int32 pixel counts (of the component, not of a grown box), valid (B, M) bool,
        counts (B,) int32 filled slots, overflow (B,) int32 kept components that did not fit.
        Unused slots hold zeros and ``valid = False``.
    """
    batch, height, width = labels.shape
    device = labels.device
    pixels = height * width
    slots = max_components

    flat = labels.reshape(batch, pixels).long()
    # Out-of-range labels go to bin 0 with the background, which is discarded.
    bins = torch.where((flat >= 1) & (flat <= pixels), flat, 0)
    row = torch.arange(height, device=device).repeat_interleave(width).expand(batch, pixels)
    col = torch.arange(width, device=device).repeat(height).expand(batch, pixels)

    def reduce(values: torch.Tensor, how: str, initial: int) -> torch.Tensor:
        out = torch.full((batch, pixels + 1), initial, dtype=torch.long, device=device)
        return out.scatter_reduce_(1, bins, values, how)[:, 1:]

    area = reduce(torch.ones_like(bins), "sum", 0)
    x0, y0 = reduce(col, "amin", width), reduce(row, "amin", height)
    x1, y1 = reduce(col + 1, "amax", 0), reduce(row + 1, "amax", 0)

    kept = (area > drop_area) & (area <= max_area)
    small = area < min_area
    grown_x0, grown_x1 = _grow_interval(x0, x1, grow_to, width)
    grown_y0, grown_y1 = _grow_interval(y0, y1, grow_to, height)
    box = torch.stack(
        [
            torch.where(small, grown_x0, x0),
            torch.where(small, grown_y0, y0),
            torch.where(small, grown_x1, x1),
            torch.where(small, grown_y1, y1),
        ],
        dim=-1,
    )

    # Compact the kept components in label order; the extra slot M collects everything else.
    rank = kept.cumsum(1) - 1
    slot = torch.where(kept & (rank < slots), rank, slots)
    boxes = torch.zeros(batch, slots + 1, 4, dtype=torch.long, device=device)
    boxes.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, 4), box)
    areas = torch.zeros(batch, slots + 1, dtype=torch.long, device=device).scatter_(1, slot, area)
    total_kept = kept.sum(1)
    counts = total_kept.clamp(max=slots)
    valid = torch.arange(slots, device=device) < counts.unsqueeze(1)
    boxes = torch.where(valid.unsqueeze(-1), boxes[:, :slots], 0)
    areas = torch.where(valid, areas[:, :slots], 0)
    return (
        boxes.to(torch.int32),
        areas.to(torch.int32),
        valid,
        counts.to(torch.int32),
        (total_kept - counts).to(torch.int32),
    )


def keep_offsets(keep: torch.Tensor) -> torch.Tensor:
    """(B + 1,) int64 offsets of the kept rows of each sample in the packed layout."""
    counts = keep.sum(1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def pack_tokens(features: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs the kept token rows of every sample into one (sum(keep), D) tensor.

    Args:
        features: (B, N, D) features of any floating dtype.
        keep: (B, N) bool, rows to keep.

    Returns:
        ``(packed, offsets)``: packed (sum(keep), D) with the kept rows in batch-major, then token
        order, and int64 offsets (B + 1,) with the rows of sample b in ``offsets[b]:offsets[b+1]``.
    """
    return features[keep], keep_offsets(keep)


def _token_ranks(keep: torch.Tensor) -> torch.Tensor:
    """Position of every token among the kept tokens of its sample (meaningful where kept)."""
    return keep.long().cumsum(1) - 1


def pack_tokens_padded(
    features: torch.Tensor, keep: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static-shape packing: the kept rows of each sample in a (B, capacity, D) tensor.

    Args:
        features: (B, N, D) features of any floating dtype.
        keep: (B, N) bool, rows to keep.
        capacity: rows stored per sample.

    Returns:
        ``(packed, lengths)``: packed (B, capacity, D) with the first ``capacity`` kept rows of each
        sample, zeros after them, and lengths (B,) int64 = number of kept rows, which exceeds
        ``capacity`` when rows did not fit.
    """
    batch, tokens, dim = features.shape
    lengths = keep.sum(1)
    # A stable sort puts the kept tokens first, in token order: source[b, j] is the j-th kept
    # token of sample b (meaningful for j < lengths[b]).
    source = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :capacity]
    rows = features[torch.arange(batch, device=features.device).unsqueeze(1), source]
    stored = torch.arange(source.shape[1], device=features.device) < lengths.unsqueeze(1)
    packed = features.new_zeros(batch, capacity, dim)
    packed[:, : source.shape[1]] = torch.where(stored.unsqueeze(-1), rows, 0)
    return packed, lengths


def unpack_tokens(packed: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_tokens`: scatters packed rows back to their token positions.

    Args:
        packed: (P, D) packed rows of any floating dtype.
        offsets: (B + 1,) int64 row offsets of every sample in ``packed``.
        keep: (B, N) bool, positions the rows go to, in order.

    Returns:
        (B, N, D) with the j-th kept position of sample b holding ``packed[offsets[b] + j]`` and
        zeros elsewhere. Kept positions beyond the sample's rows (inconsistent offsets) are zero.
        ``unpack_tokens(*pack_tokens(f, keep), keep) == f * keep[..., None]``.
    """
    batch, tokens = keep.shape
    rows, dim = packed.shape
    start = offsets[:-1].unsqueeze(1)
    length = (offsets[1:] - offsets[:-1]).unsqueeze(1)
    rank = _token_ranks(keep)
    source = start + rank
    present = keep & (rank < length) & (source >= 0) & (source < rows)
    if rows == 0:
        return packed.new_zeros(batch, tokens, dim)
    gathered = packed[torch.where(present, source, 0).reshape(-1)].reshape(batch, tokens, dim)
    return torch.where(present.unsqueeze(-1), gathered, 0)
