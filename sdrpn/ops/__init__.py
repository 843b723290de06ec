"""The compiled ops of the SD-RPN hot path.

Each function validates its arguments (``TypeError`` for wrong types and dtypes, ``ValueError`` for
wrong shapes, devices and ranges), then runs the compiled kernel ``torch.ops.sdrpn.<name>`` for
the tensors' device, or the pure-PyTorch reference in :mod:`sdrpn.ops.reference` when the
extension or that device's kernels were not built (see :func:`backends`). Non-contiguous inputs
are accepted. Outputs have static shapes except for :func:`pack_tokens`, and no compiled kernel
synchronises with the host except :func:`pack_tokens`, whose output size is data dependent (the
reference :func:`connected_components` checks convergence on the host).

Run ``python -m sdrpn.ops.validate`` after building to check the compiled kernels on your machine.
"""

from __future__ import annotations

import torch

from . import _checks, reference
from ._extension import BACKENDS, ExtensionWarning, use_compiled

__all__ = [
    "ExtensionWarning",
    "backends",
    "rpn_scores",
    "roi_mask",
    "connected_components",
    "component_boxes",
    "pack_tokens",
    "pack_tokens_padded",
    "unpack_tokens",
]


def backends() -> tuple[str, ...]:
    """Device types with compiled kernels, e.g. ``("cpu",)`` or ``("cpu", "cuda")``.

    Empty when the extension ``sdrpn._C`` is not built or failed to import.
    """
    return BACKENDS


def rpn_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """RPN logits: mean over heads and query rows of the scaled per-head dot products.

    Args:
        q: (B, Q, D) query states, float32, bfloat16 or float16, Q >= 1.
        k: (B, N, D) key states, same dtype and device as ``q``.
        num_heads: number of heads; D must be a positive multiple of it.
        scale: factor applied to each per-head dot product; ``None`` means
            ``1 / sqrt(D / num_heads)``.

    Returns:
        (B, N) float32 with ``out[b, n] = mean_{h, i} (q[b, i, h] . k[b, n, h]) * scale``, where
        ``x[h]`` is the h-th slice of D / num_heads features. Accumulated in float32.
    """
    num_heads, scale = _checks.rpn_scores(q, k, num_heads, scale)
    if use_compiled(q.device):
        return torch.ops.sdrpn.rpn_scores(q, k, num_heads, scale)
    return reference.rpn_scores(q, k, num_heads, scale)


def roi_mask(logits: torch.Tensor, threshold: float, blur: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability map and region-of-interest mask from RPN logits.

    ``prob = sigmoid(logits)``, then (if ``blur``) a 3x3 Gaussian blur with sigma 1, weights summing
    to 1 and reflect padding (mirrored without repeating the edge); ``mask = prob > threshold``.

    Args:
        logits: (B, H, W) float32, bfloat16 or float16 logits (computed in float32).
        threshold: finite float in [0, 1].
        blur: whether to blur the probabilities.

    Returns:
        ``(prob, mask)``: (B, H, W) float32 probabilities and (B, H, W) bool mask.
    """
    threshold, blur = _checks.roi_mask(logits, threshold, blur)
    if use_compiled(logits.device):
        return torch.ops.sdrpn.roi_mask(logits, threshold, blur)
    return reference.roi_mask(logits, threshold, blur)


def connected_components(mask: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Connected-component labels, numbered like ``skimage.measure.label``.

    Args:
        mask: (B, H, W) bool foreground mask.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).

    Returns:
        (B, H, W) int32: 0 for background, components numbered 1..n per image in raster
        (row-major) order of their first pixel.
    """
    connectivity = _checks.connected_components(mask, connectivity)
    if use_compiled(mask.device):
        return torch.ops.sdrpn.connected_components(mask, connectivity)
    return reference.connected_components(mask, connectivity)


def component_boxes(
    labels: torch.Tensor,
    max_components: int,
    drop_area: int = 1,
    min_area: int = 4,
    grow_to: int = 3,
    max_area: int = 225,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Filtered bounding boxes of labelled components, in M = ``max_components`` fixed slots.

    For each component (label values in [1, H * W]; other values count as background) with pixel
    area ``a`` and tight box ``[x0, y0, x1, y1)`` (x = column, y = row), in this order:

    * ``a <= drop_area``: dropped as noise;
    * ``a > max_area``: dropped as too large;
    * ``a < min_area``: the box grows by the authors' rule (YuHengsss/SD-RPN commit 00876ac,
      ``LLaVA/llava/ana_utils.py`` ~795-803): per axis, with ``w = max(grow_to, x1 - x0 + 1)``, it
      becomes ``[max(0, trunc((x0 + x1 - w) / 2)), min(W - 1, trunc((x0 + x1 + w) / 2)))``, rows
      alike with H. The end is clamped at ``W - 1``, so at the right or bottom border the box can
      be narrow and miss the component's last column or row.

    Kept components fill the slots in label order; those beyond M are counted in ``overflow``.

    Args:
        labels: (B, H, W) int32 labels, as produced by :func:`connected_components`.
        max_components: number of slots M >= 1.
        drop_area: components with at most this many pixels are dropped (>= 0).
        min_area: components with fewer pixels get a grown box.
        grow_to: minimum width and height wanted for a grown box (>= 1).
        max_area: components with more pixels are dropped (>= 1).

    Returns:
        ``(boxes, areas, valid, counts, overflow)``: boxes (B, M, 4) int32 ``[x0, y0, x1, y1]``,
        areas (B, M) int32 pixel counts of the components, valid (B, M) bool, counts (B,) int32
        filled slots, overflow (B,) int32 kept components that did not fit. Unused slots hold
        zeros and ``valid = False``.
    """
    filters = _checks.component_boxes(labels, max_components, drop_area, min_area, grow_to, max_area)
    if use_compiled(labels.device):
        return torch.ops.sdrpn.component_boxes(labels, *filters)
    return reference.component_boxes(labels, *filters)


def pack_tokens(features: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs the kept token rows of a batch into one tensor.

    The output size depends on ``keep``, so this op reads one number back to the host; use
    :func:`pack_tokens_padded` for static shapes.

    Args:
        features: (B, N, D) features of any floating dtype.
        keep: (B, N) bool rows to keep, on the same device.

    Returns:
        ``(packed, offsets)``: packed (sum(keep), D) with the kept rows in batch-major, then token
        order; offsets (B + 1,) int64 with the rows of sample b in ``packed[offsets[b]:offsets[b + 1]]``.
    """
    _checks.pack_tokens(features, keep)
    if use_compiled(features.device):
        return torch.ops.sdrpn.pack_tokens(features, keep)
    return reference.pack_tokens(features, keep)


def pack_tokens_padded(
    features: torch.Tensor, keep: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs the kept token rows of each sample into a fixed number of slots.

    Args:
        features: (B, N, D) features of any floating dtype.
        keep: (B, N) bool rows to keep, on the same device.
        capacity: rows stored per sample (>= 0).

    Returns:
        ``(packed, lengths)``: packed (B, capacity, D) with the first ``capacity`` kept rows of
        each sample and zeros after them; lengths (B,) int64 number of kept rows per sample,
        larger than ``capacity`` when rows did not fit (compare on the device, no host sync).
    """
    capacity = _checks.pack_tokens_padded(features, keep, capacity)
    if use_compiled(features.device):
        return torch.ops.sdrpn.pack_tokens_padded(features, keep, capacity)
    return reference.pack_tokens_padded(features, keep, capacity)


def unpack_tokens(packed: torch.Tensor, offsets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scatters packed rows back to their token positions; the inverse of :func:`pack_tokens`.

    ``unpack_tokens(*pack_tokens(f, keep), keep)`` equals ``f * keep[..., None]`` exactly.

    Args:
        packed: (P, D) rows of any floating dtype.
        offsets: (B + 1,) int64 row offsets of each sample in ``packed``.
        keep: (B, N) bool positions that receive the rows of each sample, in order.

    Returns:
        (B, N, D) tensor of ``packed``'s dtype: the j-th kept position of sample b holds
        ``packed[offsets[b] + j]``; other positions are zero.

    ``offsets`` must be the ones :func:`pack_tokens` returned for ``keep``. Inconsistent offsets
    never cause out-of-bounds reads: the CPU kernel rejects them (``RuntimeError``); where checking
    them would need a host synchronisation (CUDA, and the reference), the kept positions they do
    not cover are zero.
    """
    _checks.unpack_tokens(packed, offsets, keep)
    if use_compiled(packed.device):
        return torch.ops.sdrpn.unpack_tokens(packed, offsets, keep)
    return reference.unpack_tokens(packed, offsets, keep)
