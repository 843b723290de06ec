"""Stage 1: the prompt through layers 0..K-1 (kept in the cache), the RPN, and the RoI proposal.

Everything here has static shapes given the layout, and nothing reads device values on the host,
so the RPN + post-processing part can be compiled (``compile=True``) or captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import ModelAdapter
from ..roi import RoIOptions, RoIProposal, propose_grids
from ..rpn import RPN
from .layout import PromptLayout

__all__ = ["Stage1", "run_stage1", "rpn_proposal", "forced_map"]


@dataclass
class Stage1:
    """What stage 2 reuses.

    Attributes:
        hidden: (B, E + Q, hidden) states entering layer K.
        inputs_embeds: (B, E + Q, hidden) layer-0 inputs (the question block is reused as is).
        position_ids: (B, E + Q) positions.
        attention_mask: (B, E + Q) bool key mask, or None when the batch has no padding.
        cache: layers 0..K-1 hold the keys and values of all E + Q tokens.
        proposal: the RoI proposal.
        grids: per row, the token grid ``(H, W)`` of its view (host).
        rope_position_ids: (P, B, E + Q) rotary positions (multi-axis RoPE), else None.
        rope_delta: (B,) rotary minus layer position of the text after the image, or None.
        layer_additions: features the family adds inside early layers (see :mod:`sdrpn.models.base`).
        pruned: (B, N) bool original-view tokens to drop in stage 2 if the row gets a RoI
            (``RoIOptions.prune_above``), or None.
    """

    hidden: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: object
    proposal: RoIProposal
    grids: list[tuple[int, int]]
    rope_position_ids: torch.Tensor | None = None
    rope_delta: torch.Tensor | None = None
    layer_additions: dict | None = None
    pruned: torch.Tensor | None = None


def rpn_proposal(rpn: RPN, hidden: torch.Tensor, image_start: torch.Tensor, attention_mask, position_ids,
                 grids: list[tuple[int, int]], options: RoIOptions, roi_logits: torch.Tensor | None = None,
                 rope_position_ids: torch.Tensor | None = None,
                 image_lengths: torch.Tensor | None = None,
                 question_start: int | None = None) -> tuple[RoIProposal, torch.Tensor | None]:
    """RPN logits of the last prompt token against the image tokens, then the RoI proposal; with
    ``question_start``, also each image token's best score from a question token (else None).

    ``grids``: each row's token grid; ``image_lengths`` (B,) its image tokens where the grids differ.
    ``roi_logits`` (B, H, W), when given, replaces the RPN's map after it ran (tests and benchmarks
    force RoIs of known shape this way; the RPN's cost is still paid); with grids of their own, row
    ``i`` reads its top-left ``H_i x W_i`` cells.
    """
    logits = rpn(hidden, hidden.shape[1] - 1, image_start, attention_mask, position_ids, rope_position_ids,
                 image_lengths, question_start)
    logits, question = logits if question_start is not None else (logits, None)
    if roi_logits is not None:
        logits = forced_map(roi_logits.to(device=logits.device, dtype=logits.dtype), grids, logits.shape)
    return propose_grids(logits, grids, options), question


def forced_map(maps: torch.Tensor, grids: list[tuple[int, int]], shape) -> torch.Tensor:
    """(B, N) logits in the RPN's layout from (B, H, W) maps whose row ``i`` holds its grid top-left."""
    if len(set(grids)) == 1:
        return maps.reshape(shape)
    flat = torch.full(shape, float("-inf"), dtype=maps.dtype, device=maps.device)
    for index, (height, width) in enumerate(grids):
        flat[index, : height * width] = maps[index, :height, :width].reshape(-1)
    return flat


def run_stage1(adapter: ModelAdapter, rpn: RPN, layout: PromptLayout, pixel_values,
               options: RoIOptions, roi_logits: torch.Tensor | None = None, proposal_fn=rpn_proposal) -> Stage1:
    """Early-exit prefill to layer K, then the RPN and the RoI proposal.

    Args:
        layout: the prompts, already on the device.
        pixel_values: the original views' vision input (the processor's output).
        proposal_fn: :func:`rpn_proposal` or a compiled version of it.
    """
    grids = adapter.view_grids(pixel_values)
    embedded = adapter.embed(layout.input_ids, pixel_values, layout.attention_mask, validate=False)
    attention_mask = embedded.attention_mask if layout.padded else None
    rope = embedded.rope_position_ids
    cache = adapter.new_cache()
    hidden = adapter.run_layers(embedded.inputs_embeds, 0, rpn.start_layer, embedded.position_ids,
                                attention_mask, cache, rope, embedded.layer_additions)
    # Views of the family's fixed grid need no per-row counts (nor their host read in the RPN).
    counts = [rows * cols for rows, cols in grids]
    lengths = None if set(grids) == {tuple(adapter.image_grid)} else counts  # host ints: no read under compile
    prunes = options.prune_above is not None and max(counts) > options.prune_above
    proposal, question = proposal_fn(rpn, hidden, layout.image_start, attention_mask, embedded.position_ids,
                                     grids, options, roi_logits, rope, lengths,
                                     layout.prefix_length - layout.tail if prunes else None)
    pruned = None
    if prunes:  # only rows above the token count prune; the rest keep every token
        large = torch.tensor([count > options.prune_above for count in counts], device=question.device)
        pruned = (question.sigmoid() <= options.prune_threshold) & large[:, None] & torch.isfinite(question)
    return Stage1(hidden=hidden, inputs_embeds=embedded.inputs_embeds, position_ids=embedded.position_ids,
                  attention_mask=attention_mask, cache=cache, proposal=proposal, grids=grids,
                  rope_position_ids=rope, rope_delta=embedded.rope_delta, layer_additions=embedded.layer_additions,
                  pruned=pruned)
