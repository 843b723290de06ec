"""Peer methods on the same engine, for benchmarks and evaluation, for every model family.

* ``res-scaling``: each image's view at twice its side, 4x visual tokens in place of the original
  ones (the adapter's :meth:`~sdrpn.models.base.ModelAdapter.scaled_vision_input`: LLaVA's view
  resampled to twice the vision input with interpolated position embeddings; Qwen's image at 4x
  the pixel budget of its view); no training, no RoI.
* ``vicrop``: the training-free peer (ViCrop, relative attention). The attention of the last prompt
  token to the image at one middle layer (``adapter.vicrop_attention_layer``: 14 of 32 for
  LLaVA-1.5, 22 of 28 for Qwen2.5-VL, ViCrop's own choices) is computed for the question and for
  the generic prompt "Write a general description of the image."; their ratio is the map, on each
  view's own grid. A sliding-window rule picks the crop: six square windows of 1.0 to 2.0 times
  ``adapter.vicrop_window`` (in source pixels); for each size the position with the largest sum;
  among the sizes the one with the largest (sum - mean of the 4 neighbouring windows) / area. The
  crop joins the prompt as a second view after the first, framed and placed where SD-RPN's RoI view
  goes (:mod:`sdrpn.engine.views`).

Both decode with the shared loop. Rows keep their own grids; a batch equals each row alone.
"""

from __future__ import annotations

import torch

from ..models.base import ModelInputs
from ..roi import SourceImages
from .methods import GenerationRequest, MethodResult, register_method
from .views import (embed_rows, encode_views, prefill_and_decode, prompt_rows, with_image_replaced, with_question,
                    with_view_added)

__all__ = ["GENERIC_PROMPT", "WINDOW_SCALES", "RESOLUTION_FACTOR", "res_scaling_method", "vicrop_method",
           "vicrop_layer", "relative_attention", "select_window"]

GENERIC_PROMPT = "Write a general description of the image."
WINDOW_SCALES = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
RESOLUTION_FACTOR = 2  # res-scaling's views: twice the side, four times the tokens


def vicrop_layer(num_layers: int, reference: tuple[int, int] = (14, 32)) -> int:
    """The layer whose attention ViCrop reads in a model of ``num_layers``: ``reference`` is (layer,
    depth) of the model ViCrop chose it for, kept at the same relative depth (never deeper than it)."""
    layer, depth = reference
    return min(layer, max(num_layers * layer // depth, 1))


def _require_images(request: GenerationRequest) -> None:
    if request.images is None:
        raise ValueError("this method resamples the source images: pass images=[...] (one per prompt)")


@register_method("res-scaling")
def res_scaling_method(engine, request: GenerationRequest) -> MethodResult:
    """Each row's image replaced by its view at twice the side (4x the image tokens)."""
    _require_images(request)
    adapter = engine.adapter
    sources = SourceImages.from_pil(request.images, adapter.geometry, adapter.device)
    grids = adapter.view_grids(request.pixel_values)
    views = encode_views(adapter, adapter.scaled_vision_input(sources, grids, RESOLUTION_FACTOR,
                                                               engine.image_processor))
    rows = [with_image_replaced(adapter, ids, view.features.shape[0])
            for ids, view in zip(prompt_rows(request.input_ids, request.attention_mask), views)]
    inputs = embed_rows(adapter, rows, [[view] for view in views], request.sampling.pad_token_id)
    decoded = prefill_and_decode(adapter, inputs, request.sampling, request.keep_logits)
    return MethodResult(tokens=decoded.tokens, logits=decoded.logits, roi=None, roi_tokens=None,
                        visual_tokens=inputs.image_lengths)


# ------------------------------------------------------------------------------------------------
# ViCrop
# ------------------------------------------------------------------------------------------------


def _last_token_attention(adapter, inputs: ModelInputs, layer: int) -> torch.Tensor:
    """(B, S) attention of each row's last token to every key at ``layer``, mean over heads (softmax
    over all keys, computed from that layer's q/k only)."""
    mask = inputs.attention_mask
    hidden = adapter.run_layers(inputs.inputs_embeds, 0, layer, inputs.position_ids, mask, None,
                                inputs.rope_position_ids, inputs.layer_additions)
    q, k = adapter.attention_qk(layer, hidden, inputs.position_ids, inputs.rope_position_ids)
    k = k.repeat_interleave(adapter.num_heads // adapter.num_kv_heads, dim=1)
    scores = (q[:, :, -1:] @ k.transpose(-1, -2)).float() / adapter.head_dim**0.5  # (B, H, 1, S)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)[:, :, 0].mean(dim=1)


def _image_rows(weights: torch.Tensor, inputs: ModelInputs, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each row's weights on its (first) view's tokens, on that view's grid."""
    return [weights[row, start : start + rows * cols].view(rows, cols)
            for row, (start, (rows, cols)) in enumerate(zip(inputs.image_start.tolist(), grids))]


def relative_attention(adapter, question: ModelInputs, generic: ModelInputs, layer: int,
                       grids: list[tuple[int, int]], eps: float = 1e-8) -> list[torch.Tensor]:
    """Per row, the (rows, cols) ratio of the question's to the generic prompt's attention on the
    image tokens of a view of ``grids[row]``."""
    ratios = zip(_image_rows(_last_token_attention(adapter, question, layer), question, grids),
                 _image_rows(_last_token_attention(adapter, generic, layer), generic, grids))
    return [asked / (general + eps) for asked, general in ratios]


def _window_sums(grid_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H - height + 1, W - width + 1) sums of every height x width window of a (H, W) map."""
    integral = torch.nn.functional.pad(grid_map.cumsum(0).cumsum(1), (1, 0, 1, 0))
    return (integral[height:, width:] - integral[:-height, width:] - integral[height:, :-width]
            + integral[:-height, :-width])


def select_window(grid_map: torch.Tensor, cell_size: tuple[float, float], window: tuple[int, int],
                  scales=WINDOW_SCALES) -> torch.Tensor:
    """ViCrop's window on one (H, W) map: (4,) int64 grid box ``[x0, y0, x1, y1)``.

    Args:
        grid_map: the relative attention on the token grid.
        cell_size: (width, height) of one grid cell in source pixels.
        window: (height, width) of the unit window in pixels (the vision input for LLaVA).
    """
    grid_h, grid_w = grid_map.shape
    best_scores, best_boxes = [], []
    for scale in scales:
        # Window side in cells (rounded, at least one cell, at most the grid).
        width = min(max(round(scale * window[1] / cell_size[0]), 1), grid_w)
        height = min(max(round(scale * window[0] / cell_size[1]), 1), grid_h)
        sums = _window_sums(grid_map, height, width)
        index = sums.flatten().argmax()
        row, col = index // sums.shape[1], index % sums.shape[1]
        neighbours = torch.stack([
            sums[(row - 1).clamp_min(0), col], sums[(row + 1).clamp_max(sums.shape[0] - 1), col],
            sums[row, (col - 1).clamp_min(0)], sums[row, (col + 1).clamp_max(sums.shape[1] - 1)],
        ])
        best_scores.append((sums[row, col] - neighbours.mean()) / (width * height))
        best_boxes.append(torch.stack([col, row, col + width, row + height]))
    return torch.stack(best_boxes)[torch.stack(best_scores).argmax()]


def _generic_question(engine) -> torch.Tensor:
    """Token ids of the generic prompt after its image (and the family's ``prefix_tail``)."""
    tokenizer = getattr(engine.processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("vicrop tokenizes its generic prompt: SDRPN(model, rpn, processor) with a full processor")
    ids = tokenizer(engine.prompt(GENERIC_PROMPT), add_special_tokens=False)["input_ids"]
    image = [i for i, token in enumerate(ids) if token == engine.adapter.image_token_id]
    return torch.tensor(ids[image[-1] + 1 + engine.adapter.prefix_tail:] if image else ids, dtype=torch.long)


@register_method("vicrop")
def vicrop_method(engine, request: GenerationRequest) -> MethodResult:
    """ViCrop with relative attention; the crop joins the prompt as a second view."""
    _require_images(request)
    adapter = engine.adapter
    pad = request.sampling.pad_token_id
    views = encode_views(adapter, request.pixel_values)
    grids = [view.grid for view in views]
    rows = prompt_rows(request.input_ids, request.attention_mask)
    alone = [[view] for view in views]
    generic_question = _generic_question(engine)
    question = embed_rows(adapter, rows, alone, pad)
    generic = embed_rows(adapter, [with_question(adapter, ids, generic_question) for ids in rows], alone, pad)
    layer = vicrop_layer(adapter.num_layers, adapter.vicrop_attention_layer)
    ratios = relative_attention(adapter, question, generic, layer, grids)

    cells = adapter.source_cell_sizes(grids, request.images)
    boxes = torch.stack([select_window(ratio, cell, adapter.vicrop_window) for ratio, cell in zip(ratios, cells)])
    sources = SourceImages.from_pil(request.images, adapter.geometry, adapter.device)
    crops, rects = adapter.crop_vision_input(boxes, grids, sources, engine.image_processor)
    crop_views = encode_views(adapter, crops)
    rows = [with_view_added(adapter, ids, crop.features.shape[0]) for ids, crop in zip(rows, crop_views)]
    inputs = embed_rows(adapter, rows, [[view, crop] for view, crop in zip(views, crop_views)], pad)
    decoded = prefill_and_decode(adapter, inputs, request.sampling, request.keep_logits)
    visual = torch.tensor([view.features.shape[0] + crop.features.shape[0] for view, crop in zip(views, crop_views)])
    # The crops ``[x0, y0, width, height]`` in source pixels are vicrop's RoI.
    return MethodResult(tokens=decoded.tokens, logits=decoded.logits, roi=rects, roi_tokens=None,
                        visual_tokens=visual.to(adapter.device))
