"""Prompts rebuilt around other views of their images and prefilled in full: what the peer methods
run on (``res-scaling`` puts a sharper view in place of each row's image, ``vicrop`` adds a crop
after it).

Every row keeps views of its own grid and token count; rows are left-padded into one batch whose
positions count each row's real tokens and whose rotary positions come from the model's own code
(:meth:`~sdrpn.models.base.ModelAdapter.sequence_rope_positions`), so each row computes what it
would compute alone. Nothing here names a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import ModelAdapter, ModelInputs, default_position_ids
from .generation import Decoded, SamplingConfig, decode

__all__ = ["EncodedView", "encode_views", "prompt_rows", "with_image_replaced", "with_view_added",
           "with_question", "embed_rows", "prefill_and_decode"]


@dataclass
class EncodedView:
    """One view through the vision tower.

    Attributes:
        features: (n, hidden) its tokens, in the language model's dtype.
        additions: injection layer -> (n, hidden) features added to its tokens after that layer.
        grid: its token grid ``(rows, cols)``.
    """

    features: torch.Tensor
    additions: dict[int, torch.Tensor]
    grid: tuple[int, int]


def encode_views(adapter: ModelAdapter, vision_input) -> list[EncodedView]:
    """Every view of a vision input, encoded once."""
    features, injected = adapter.encode_views_full(vision_input)
    grids = adapter.view_grids(vision_input)
    return [EncodedView(feature, {layer: views[index] for layer, views in injected.items()}, tuple(grid))
            for index, (feature, grid) in enumerate(zip(features, grids))]


def prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each prompt's real tokens (padding on either side removed), on the host."""
    input_ids = input_ids.cpu()
    if attention_mask is None:
        return list(input_ids)
    return [ids[real] for ids, real in zip(input_ids, attention_mask.cpu().bool())]


def _image_end(adapter: ModelAdapter, ids: torch.Tensor) -> tuple[int, int]:
    """``(first, end)`` of the row's image tokens (one contiguous run)."""
    image = (ids == adapter.image_token_id).nonzero().flatten()
    if image.numel() == 0:
        raise ValueError("every prompt must hold its image tokens; build prompts with the model's processor")
    return int(image[0]), int(image[-1]) + 1


def with_image_replaced(adapter: ModelAdapter, ids: torch.Tensor, count: int) -> torch.Tensor:
    """``ids`` with its image tokens replaced by ``count`` image tokens (a view of another size)."""
    first, end = _image_end(adapter, ids)
    return torch.cat([ids[:first], ids.new_full((count,), adapter.image_token_id), ids[end:]])


def with_view_added(adapter: ModelAdapter, ids: torch.Tensor, count: int) -> torch.Tensor:
    """``ids`` with a second view of ``count`` tokens after its image, where stage 2 puts the RoI
    view and framed as the family frames it (``adapter.roi_block_ids``, ``adapter.prefix_tail``)."""
    insert = _image_end(adapter, ids)[1] + adapter.prefix_tail
    before, after = (ids.new_tensor(part) for part in adapter.roi_block_ids)
    return torch.cat([ids[:insert], before, ids.new_full((count,), adapter.image_token_id), after, ids[insert:]])


def with_question(adapter: ModelAdapter, ids: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """``ids`` up to its image (and the family's ``prefix_tail``), then the tokens ``question``."""
    return torch.cat([ids[: _image_end(adapter, ids)[1] + adapter.prefix_tail], question.to(ids.dtype)])


def embed_rows(adapter: ModelAdapter, rows: list[torch.Tensor], views: list[list[EncodedView]],
               pad_token_id: int) -> ModelInputs:
    """The rows (1-D token ids whose image tokens hold ``views[row]``, in order), left-padded and
    embedded, with layer and rotary positions and the views' injected features.

    ``image_start`` and ``image_lengths`` describe each row's first view.
    """
    device = adapter.device
    length = max(row.shape[0] for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, length - row.shape[0]:] = row
        mask[index, length - row.shape[0]:] = True
    counts = (ids == adapter.image_token_id).sum(dim=1).tolist()
    expected = [sum(v.features.shape[0] for v in row_views) for row_views in views]
    if counts != expected:
        raise ValueError(f"image tokens per row {counts} do not match the views' tokens {expected}")
    ids, mask = ids.to(device), mask.to(device)
    is_image = (ids == adapter.image_token_id)[..., None]
    embeds = adapter.embed_ids(ids)
    ordered = [view for row_views in views for view in row_views]
    embeds = embeds.masked_scatter(is_image, torch.cat([v.features for v in ordered]).to(embeds.dtype))
    additions = {layer: torch.zeros_like(embeds).masked_scatter(
                     is_image, torch.cat([v.additions[layer] for v in ordered]).to(embeds.dtype))
                 for layer in ordered[0].additions}
    rope = adapter.sequence_rope_positions(ids, [v.grid for v in ordered], mask)
    real = mask.sum(dim=1)
    delta = None if rope is None else rope.masked_fill(~mask[None], 0).amax(dim=(0, 2)) + 1 - real
    positions = torch.arange(length, device=device)
    first = [row_views[0].features.shape[0] for row_views in views]
    return ModelInputs(
        inputs_embeds=embeds, position_ids=default_position_ids(mask), attention_mask=mask,
        image_start=torch.where(is_image[..., 0], positions, length).amin(dim=1), image_length=max(first),
        rope_position_ids=rope, rope_delta=delta, image_lengths=torch.tensor(first, device=device),
        layer_additions=additions or None,
    )


def prefill_and_decode(adapter: ModelAdapter, inputs: ModelInputs, sampling: SamplingConfig,
                       keep_logits: bool) -> Decoded:
    """One prefill of the embedded rows through every layer, then the shared decode loop."""
    key_mask = None if bool(inputs.attention_mask.all()) else inputs.attention_mask
    cache = adapter.new_cache()
    hidden = adapter.run_layers(inputs.inputs_embeds, 0, adapter.num_layers, inputs.position_ids, key_mask, cache,
                                inputs.rope_position_ids, inputs.layer_additions)
    return decode(adapter, cache, adapter.logits(hidden[:, -1]), key_mask, inputs.attention_mask.sum(dim=1),
                  sampling, keep_logits, inputs.rope_delta)
