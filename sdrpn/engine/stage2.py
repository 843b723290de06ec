"""Stage 2: the RoI view and the prefill that reuses stage 1's keys and values (DESIGN section 3.1).

Stage 1 computed layers 0..K-1 for [prefix | question]. The stage-2 sequence is
[prefix | RoI tokens | question], whose prefix is identical, so:

1. crop the cache of layers 0..K-1 back to the prefix (E tokens);
2. run the new tokens [RoI slots | question block] through layers 0..K-1 against that cache;
3. concatenate stage 1's prefix states at layer K with the new states and run layers K..L-1 over the
   whole sequence (their caches were empty).

The result equals a full re-prefill of the stage-2 sequence. RoI tokens occupy C slots per row; a
row keeps its first ``n`` slots (``n`` = its RoI token count, 0 without a RoI) and masks the rest,
and positions skip the masked slots, so each row computes what it would compute alone with exactly
its ``n`` tokens. A family may frame the RoI tokens with tokens of its own (Qwen's
``<|vision_start|> ... <|vision_end|>``, ``adapter.roi_block_ids``), present only in rows with a
RoI, and place them on rotary axes of their own (M-RoPE: each kept token at its cell of the RoI
view's full grid, the text after the view moved on by the grid's longer side).

Two modes. Sync-free (the default on GPUs): C = H * W, static shapes, no value read back to the
host between the stages. Trimmed (the default on the CPU, where reading a device value costs
nothing): C = the longest row's ``n``, stage 2 is skipped when no row has a RoI, and attention runs
without a mask when nothing is masked. Families whose RoI view has a size of its own (Qwen: the
processor encodes the crop at its pixel budget) read the RoI boxes on the host and run trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.base import ModelAdapter
from ..roi import MODE_NONE, SourceImages, roi_token_keep, roi_token_keep_grids, roi_views
from .layout import PromptLayout
from .stage1 import Stage1

__all__ = ["Prefill", "RoITokens", "continue_prefill", "roi_rects", "roi_tokens", "run_stage2"]


@dataclass
class Prefill:
    """A finished prefill, ready for decoding.

    Attributes:
        logits: (B, V) logits of the last prompt position.
        attention_mask: (B, S) bool key mask of the whole prompt, or None without padding.
        next_position: (B,) int64 position of the first generated token.
        cache: every layer holds the S prompt tokens.
        roi_lengths: (B,) int64 RoI tokens inserted per row.
        rope_delta: (B,) rotary minus layer position of the generated tokens (multi-axis RoPE), or None.
        dropped: (B,) int64 original-view tokens pruned from the prompt (``RoIOptions.prune_above``).
    """

    logits: torch.Tensor
    attention_mask: torch.Tensor | None
    next_position: torch.Tensor
    cache: object
    roi_lengths: torch.Tensor
    rope_delta: torch.Tensor | None = None
    dropped: torch.Tensor | None = None


@dataclass
class RoITokens:
    """The second view's tokens, packed to the front of C slots per row.

    Attributes:
        embeds: (B, C, hidden) RoI token features, zeros beyond each row's length.
        lengths: (B,) int64 tokens kept per row.
        crops: (B, 4) int64 source-pixel rectangle ``[x0, y0, width, height]`` of each view.
        keep: (B, N) bool which tokens of the view were kept (before packing).
        grids: (B, 2) int64 token grid ``(H, W)`` of each RoI view ((0, 0) without one).
        cells: (B, C, 2) int64 ``(row, col)`` of each packed token on its view's grid, where the
            family places image tokens on rotary axes of their own; else None.
        additions: injection layer -> (B, C, hidden) features added to the packed tokens after that
            layer (Qwen3-VL's deepstack), packed like ``embeds``; None for families without.
    """

    embeds: torch.Tensor
    lengths: torch.Tensor
    crops: torch.Tensor
    keep: torch.Tensor
    grids: torch.Tensor
    cells: torch.Tensor | None = None
    additions: dict[int, torch.Tensor] | None = None


def roi_tokens(adapter: ModelAdapter, stage1: Stage1, sources: SourceImages, sync_free: bool = True,
               image_processor=None) -> RoITokens:
    """Crops, resizes and encodes the RoI views and selects their tokens.

    Views of the family's fixed input size are cut, resized and encoded on the device. ``sync_free``:
    keep C = H * W slots per row (static shapes, nothing read back); otherwise the slots are trimmed
    to the longest row's token count, read on the host (free on the CPU, one small copy on a GPU).
    Views of a size of their own (``adapter.roi_views_on_device`` False) are cut from the PIL images
    and encoded by ``image_processor`` at its pixel budget, which reads the boxes on the host.
    """
    if not adapter.roi_views_on_device:
        return _host_roi_tokens(adapter, stage1, sources, image_processor)
    grid, geometry = adapter.image_grid, adapter.geometry
    crops = roi_rects(adapter, stage1.proposal, stage1.grids, sources)
    features = adapter.encode_images(roi_views(crops, sources, geometry))
    keep = roi_token_keep(stage1.proposal, grid)
    capacity = features.shape[1] if sync_free else int(keep.sum(dim=1).max())
    embeds, lengths = ops.pack_tokens_padded(features, keep, capacity)
    grids = torch.tensor(grid, device=keep.device).expand(keep.shape[0], 2)
    cells = _packed_cells(keep, grids, capacity) if stage1.rope_position_ids is not None else None
    return RoITokens(embeds=embeds, lengths=lengths, crops=crops, keep=keep, grids=grids, cells=cells)


def roi_rects(adapter: ModelAdapter, proposal, grids: list[tuple[int, int]], sources: SourceImages) -> torch.Tensor:
    """(B, 4) int64 source-pixel rectangles ``[x0, y0, width, height]`` of each row's RoI view,
    through the family's mapping (``adapter.roi_source_rects``); the whole view's where a row has no
    RoI, so that shapes stay static."""
    grids = torch.tensor(grids, device=proposal.region.device)
    whole = torch.cat([torch.zeros_like(grids), grids.flip(1)], dim=1)
    regions = torch.where((proposal.mode > MODE_NONE)[:, None], proposal.region, whole)
    return adapter.roi_source_rects(regions, grids, sources)


def _host_roi_tokens(adapter: ModelAdapter, stage1: Stage1, sources: SourceImages, image_processor) -> RoITokens:
    """RoI views encoded by the processor, one crop per row with a RoI (see :func:`roi_tokens`)."""
    if image_processor is None:
        raise ValueError("this model's RoI view is encoded by its processor: pass the processor to the engine")
    proposal, batch = stage1.proposal, stage1.proposal.mode.shape[0]
    device = proposal.mode.device
    rows = (proposal.mode > MODE_NONE).nonzero().flatten().tolist()
    crops = adapter.roi_source_rects(proposal.region, torch.tensor(stage1.grids, device=device), sources)
    crops = torch.where((proposal.mode > MODE_NONE)[:, None], crops.to(device), 0)
    view_grids = [(0, 0)] * batch
    features, injected = [], {}
    if rows:
        pictures = [sources.images[row].crop((x0, y0, x0 + w, y0 + h))
                    for row, (x0, y0, w, h) in zip(rows, crops[rows].tolist())]
        vision = adapter.roi_vision_input(pictures, image_processor)
        features, injected = adapter.encode_views_full(vision)
        for row, grid in zip(rows, adapter.view_grids(vision)):
            view_grids[row] = grid
    keep = roi_token_keep_grids(proposal, view_grids)
    capacity = int(keep.sum(dim=1).max()) if keep.shape[1] else 0

    def packed(per_view):  # the rows' views padded to (B, N, hidden), then their kept tokens packed
        padded = torch.zeros(batch, keep.shape[1], adapter.hidden_size, dtype=adapter.dtype, device=device)
        for row, feature in zip(rows, per_view):
            padded[row, : feature.shape[0]] = feature
        return ops.pack_tokens_padded(padded, keep, capacity)

    embeds, lengths = packed(features)
    additions = {layer: packed(per_view)[0] for layer, per_view in injected.items()} or None
    grids = torch.tensor(view_grids, dtype=torch.long, device=device)
    cells = _packed_cells(keep, grids, capacity) if stage1.rope_position_ids is not None else None
    return RoITokens(embeds=embeds, lengths=lengths, crops=crops, keep=keep, grids=grids, cells=cells,
                     additions=additions)


def _packed_cells(keep: torch.Tensor, grids: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, capacity, 2) ``(row, col)`` of the kept tokens in packing order (row-major on each grid)."""
    order = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices[:, :capacity]  # kept indices first, in order
    width = grids[:, 1:].clamp_min(1)
    return torch.stack([order // width, order % width], dim=-1)


def continue_prefill(adapter: ModelAdapter, stage1: Stage1, layout: PromptLayout, start_layer: int) -> Prefill:
    """No second view: stage 1's states at layer K continue through layers K..L-1."""
    hidden = adapter.run_layers(stage1.hidden, start_layer, adapter.num_layers, stage1.position_ids,
                                stage1.attention_mask, stage1.cache, stage1.rope_position_ids)
    return Prefill(
        logits=adapter.logits(hidden[:, -1]),
        attention_mask=stage1.attention_mask,
        next_position=layout.prefix_tokens + layout.question_tokens,
        cache=stage1.cache,
        roi_lengths=torch.zeros_like(layout.prefix_tokens),
        rope_delta=stage1.rope_delta,
    )


def run_stage2(adapter: ModelAdapter, stage1: Stage1, layout: PromptLayout, roi: RoITokens,
               start_layer: int, sync_free: bool = True) -> Prefill:
    """The KV-reusing prefill of [prefix | RoI block | question].

    ``sync_free=False`` lets attention run without a mask when no row has padding or empty slots
    (read on the host), which lets SDPA use its causal kernels.
    """
    prefix, capacity = layout.prefix_length, roi.embeds.shape[1]
    batch, device = layout.batch_size, roi.embeds.device
    before_ids, after_ids = adapter.roi_block_ids
    has_view = (roi.lengths > 0)[:, None]
    block_valid = torch.cat([has_view.expand(batch, len(before_ids)),
                             torch.arange(capacity, device=device) < roi.lengths[:, None],
                             has_view.expand(batch, len(after_ids))], dim=1)
    block_tokens = block_valid.sum(dim=1)
    unmasked = not sync_free and not layout.padded and bool(block_valid.all())

    # Positions: the block's real tokens right after the prefix; the question moves by their count.
    index = torch.arange(block_valid.shape[1], device=device)
    real_before = block_valid.long().cumsum(dim=1) - block_valid.long()
    block_positions = layout.prefix_tokens[:, None] + torch.where(block_valid, real_before, index)
    question_positions = stage1.position_ids[:, prefix:] + block_tokens[:, None]
    new_positions = torch.cat([block_positions, question_positions], dim=1)
    new_rope, rope_delta = _block_rope(adapter, stage1, layout, roi, block_positions, question_positions)
    prefix_mask = (stage1.attention_mask[:, :prefix] if stage1.attention_mask is not None
                   else torch.ones(batch, prefix, dtype=torch.bool, device=device))
    question_mask = (stage1.attention_mask[:, prefix:] if stage1.attention_mask is not None
                     else torch.ones(batch, layout.question_length, dtype=torch.bool, device=device))
    pruned = _pruned_prefix(stage1, layout, roi)
    if pruned is not None:
        prefix_mask = prefix_mask & ~pruned
        unmasked = False
    attention_mask = None if unmasked else torch.cat([prefix_mask, block_valid, question_mask], dim=1)

    # 1-2. Layers 0..K-1: the new tokens against the cached prefix (recomputed without the pruned
    # tokens, which the prefix's own states saw in stage 1).
    if pruned is None:
        cache, prefix_hidden = stage1.cache, stage1.hidden[:, :prefix]
        if layout.question_length:
            cache.crop(-layout.question_length)
    else:
        cache = adapter.new_cache()
        prefix_rope = None if stage1.rope_position_ids is None else stage1.rope_position_ids[:, :, :prefix]
        prefix_additions = {layer: values[:, :prefix] for layer, values in (stage1.layer_additions or {}).items()}
        prefix_hidden = adapter.run_layers(stage1.inputs_embeds[:, :prefix], 0, start_layer,
                                           stage1.position_ids[:, :prefix], prefix_mask, cache, prefix_rope,
                                           prefix_additions)
    dtype = stage1.inputs_embeds.dtype
    parts = [_wrapper_embeds(adapter, before_ids, batch, dtype), roi.embeds.to(dtype),
             _wrapper_embeds(adapter, after_ids, batch, dtype), stage1.inputs_embeds[:, prefix:]]
    additions = None
    if roi.additions:  # injected features on the RoI tokens only
        def around(values):
            return torch.cat([parts[0].new_zeros(parts[0].shape), values.to(dtype),
                              parts[2].new_zeros(parts[2].shape), parts[3].new_zeros(parts[3].shape)], dim=1)

        additions = {layer: around(values) for layer, values in roi.additions.items()}
    new = adapter.run_layers(torch.cat(parts, dim=1), 0, start_layer, new_positions, attention_mask, cache, new_rope,
                             additions)

    # 3. Layers K..L-1 over the whole sequence.
    hidden = torch.cat([prefix_hidden, new], dim=1)
    positions = torch.cat([stage1.position_ids[:, :prefix], new_positions], dim=1)
    rope = None if new_rope is None else torch.cat([stage1.rope_position_ids[:, :, :prefix], new_rope], dim=2)
    hidden = adapter.run_layers(hidden, start_layer, adapter.num_layers, positions, attention_mask, cache, rope)
    return Prefill(
        logits=adapter.logits(hidden[:, -1]),
        attention_mask=attention_mask,
        next_position=layout.prefix_tokens + block_tokens + layout.question_tokens,
        cache=cache,
        roi_lengths=roi.lengths,
        rope_delta=rope_delta,
        dropped=None if pruned is None else pruned.sum(dim=1),
    )


def _pruned_prefix(stage1: Stage1, layout: PromptLayout, roi: RoITokens) -> torch.Tensor | None:
    """(B, E) bool prefix tokens dropped from stage 2 (``RoIOptions.prune_above``: original-view
    tokens no question token looks at, in rows that got a RoI), or None when none is (read on the
    host; pruning families run trimmed)."""
    if stage1.pruned is None:
        return None
    pruned = stage1.pruned & (roi.lengths > 0)[:, None]
    if not bool(pruned.any()):
        return None
    prefix = layout.prefix_length
    columns = (layout.image_start[:, None] + torch.arange(pruned.shape[1], device=pruned.device)).clamp_max(prefix - 1)
    keys = torch.zeros(pruned.shape[0], prefix, dtype=torch.int32, device=pruned.device)
    # amax: slots beyond a row's image tokens (clamped onto its last one) never unset a pruned token
    return keys.scatter_reduce(1, columns, pruned.int(), reduce="amax").bool()


def _wrapper_embeds(adapter: ModelAdapter, ids: tuple[int, ...], batch: int, dtype) -> torch.Tensor:
    """(B, len(ids), hidden) embeddings of the RoI block's framing tokens."""
    tokens = torch.tensor(ids, dtype=torch.long, device=adapter.device)
    return adapter.embed_ids(tokens).to(dtype)[None].expand(batch, -1, -1)


def _block_rope(adapter: ModelAdapter, stage1: Stage1, layout: PromptLayout, roi: RoITokens,
                block_positions: torch.Tensor, question_positions: torch.Tensor):
    """Rotary positions of [RoI block | question] and the rows' rotary delta after it, for families
    with multi-axis RoPE (``(None, None)`` otherwise).

    The framing tokens before the view continue the text after the original image (stage 1's
    delta); the view's tokens sit at their cells from the rotary position after them; the text
    after the view continues from there plus ``adapter.image_rope_advance``.
    """
    if stage1.rope_position_ids is None:
        return None, None
    before, after = (len(ids) for ids in adapter.roi_block_ids)
    capacity = roi.embeds.shape[1]
    delta = stage1.rope_delta
    base = layout.prefix_tokens + delta + before
    view = adapter.image_rope_positions(base, roi.cells[..., 0], roi.cells[..., 1])
    advance = adapter.image_rope_advance(roi.grids, roi.lengths)
    after_delta = delta + torch.where(roi.lengths > 0, advance - roi.lengths, 0)
    rope = torch.cat([
        adapter.text_rope_positions(block_positions[:, :before], delta),
        view,
        adapter.text_rope_positions(block_positions[:, before + capacity:], after_delta),
        adapter.text_rope_positions(question_positions, after_delta),
    ], dim=2)
    return rope, after_delta
