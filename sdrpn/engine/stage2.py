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
its ``n`` tokens.

Two modes. Sync-free (the default on GPUs): C = H * W, static shapes, no value read back to the
host between the stages. Trimmed (the default on the CPU, where reading a device value costs
nothing): C = the longest row's ``n``, stage 2 is skipped when no row has a RoI, and attention runs
without a mask when nothing is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.base import ModelAdapter
from ..roi import SourceImages, region_crops, roi_token_keep, roi_views
from .layout import PromptLayout
from .stage1 import Stage1

__all__ = ["Prefill", "RoITokens", "continue_prefill", "roi_tokens", "run_stage2"]


@dataclass
class Prefill:
    """A finished prefill, ready for decoding.

    Attributes:
        logits: (B, V) logits of the last prompt position.
        attention_mask: (B, S) bool key mask of the whole prompt, or None without padding.
        next_position: (B,) int64 position of the first generated token.
        cache: every layer holds the S prompt tokens.
        roi_lengths: (B,) int64 RoI tokens inserted per row.
    """

    logits: torch.Tensor
    attention_mask: torch.Tensor | None
    next_position: torch.Tensor
    cache: object
    roi_lengths: torch.Tensor


@dataclass
class RoITokens:
    """The second view's tokens, packed to the front of C slots per row.

    Attributes:
        embeds: (B, C, hidden) RoI token features, zeros beyond each row's length.
        lengths: (B,) int64 tokens kept per row.
        crops: (B, 4) int64 source-pixel rectangle ``[x0, y0, width, height]`` of each view.
        keep: (B, C) bool which tokens of the view were kept (before packing).
    """

    embeds: torch.Tensor
    lengths: torch.Tensor
    crops: torch.Tensor
    keep: torch.Tensor


def roi_tokens(adapter: ModelAdapter, stage1: Stage1, sources: SourceImages, sync_free: bool = True) -> RoITokens:
    """Crops, resizes and encodes the RoI views on the device and selects their tokens.

    ``sync_free``: keep C = H * W slots per row (static shapes, nothing read back). Otherwise the
    slots are trimmed to the longest row's token count, read on the host (free on the CPU, one
    small copy on a GPU).
    """
    grid, geometry = adapter.image_grid, adapter.geometry
    crops = region_crops(stage1.proposal, sources, geometry, grid)
    features = adapter.encode_images(roi_views(crops, sources, geometry))
    keep = roi_token_keep(stage1.proposal, grid)
    capacity = features.shape[1] if sync_free else int(keep.sum(dim=1).max())
    embeds, lengths = ops.pack_tokens_padded(features, keep, capacity)
    return RoITokens(embeds=embeds, lengths=lengths, crops=crops, keep=keep)


def continue_prefill(adapter: ModelAdapter, stage1: Stage1, layout: PromptLayout, start_layer: int) -> Prefill:
    """No second view: stage 1's states at layer K continue through layers K..L-1."""
    hidden = adapter.run_layers(stage1.hidden, start_layer, adapter.num_layers, stage1.position_ids,
                                stage1.attention_mask, stage1.cache)
    return Prefill(
        logits=adapter.logits(hidden[:, -1]),
        attention_mask=stage1.attention_mask,
        next_position=layout.prefix_tokens + layout.question_tokens,
        cache=stage1.cache,
        roi_lengths=torch.zeros_like(layout.prefix_tokens),
    )


def run_stage2(adapter: ModelAdapter, stage1: Stage1, layout: PromptLayout, roi: RoITokens,
               start_layer: int, sync_free: bool = True) -> Prefill:
    """The KV-reusing prefill of [prefix | RoI tokens | question].

    ``sync_free=False`` lets attention run without a mask when no row has padding or empty slots
    (read on the host), which lets SDPA use its causal kernels.
    """
    prefix, capacity = layout.prefix_length, roi.embeds.shape[1]
    batch, device = layout.batch_size, roi.embeds.device
    slots = torch.arange(capacity, device=device)
    slot_valid = slots < roi.lengths[:, None]
    unmasked = not sync_free and not layout.padded and bool(slot_valid.all())

    # Positions: RoI token j of a row sits right after its prefix; the question moves by the RoI length.
    roi_positions = layout.prefix_tokens[:, None] + slots
    question_positions = stage1.position_ids[:, prefix:] + roi.lengths[:, None]
    new_positions = torch.cat([roi_positions, question_positions], dim=1)
    prefix_mask = (stage1.attention_mask[:, :prefix] if stage1.attention_mask is not None
                   else torch.ones(batch, prefix, dtype=torch.bool, device=device))
    question_mask = (stage1.attention_mask[:, prefix:] if stage1.attention_mask is not None
                     else torch.ones(batch, layout.question_length, dtype=torch.bool, device=device))
    attention_mask = None if unmasked else torch.cat([prefix_mask, slot_valid, question_mask], dim=1)

    # 1-2. Layers 0..K-1: the new tokens against the cached prefix.
    cache = stage1.cache
    if layout.question_length:
        cache.crop(-layout.question_length)
    new = torch.cat([roi.embeds.to(stage1.inputs_embeds.dtype), stage1.inputs_embeds[:, prefix:]], dim=1)
    new = adapter.run_layers(new, 0, start_layer, new_positions, attention_mask, cache)

    # 3. Layers K..L-1 over the whole sequence.
    hidden = torch.cat([stage1.hidden[:, :prefix], new], dim=1)
    positions = torch.cat([stage1.position_ids[:, :prefix], new_positions], dim=1)
    hidden = adapter.run_layers(hidden, start_layer, adapter.num_layers, positions, attention_mask, cache)
    return Prefill(
        logits=adapter.logits(hidden[:, -1]),
        attention_mask=attention_mask,
        next_position=layout.prefix_tokens + roi.lengths + layout.question_tokens,
        cache=cache,
        roi_lengths=roi.lengths,
    )
