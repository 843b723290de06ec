"""Peer methods on the same engine, for benchmarks and evaluation.

* ``res-scaling``: the vision tower at twice the input resolution (interpolated position
  embeddings), 4x visual tokens in place of the original ones; no training, no RoI.
* ``vicrop``: the training-free peer (ViCrop, relative attention). The attention of the last prompt
  token to the image at one middle layer (14 for LLaVA-1.5-7B) is computed for the question and
  for the generic prompt "Write a general description of the image."; their ratio is the map. A
  sliding-window rule picks the crop: six square windows of 1.0 to 2.0 times the vision input size
  (in source pixels); for each size the position with the largest sum; among the sizes the one with
  the largest (sum - mean of the 4 neighbouring windows) / area. The crop is appended as a second
  image after the first.

Both decode with the shared loop; all of their work runs on the device.
"""

from __future__ import annotations

import torch

from ..models.base import default_position_ids
from ..models.geometry import resample_views
from ..roi import SourceImages, grid_box_squares, roi_views
from .generation import decode
from .methods import GenerationRequest, MethodResult, layout_of, register_method

__all__ = ["GENERIC_PROMPT", "WINDOW_SCALES", "res_scaling_method", "vicrop_method", "vicrop_layer",
           "relative_attention", "select_window"]

GENERIC_PROMPT = "Write a general description of the image."
WINDOW_SCALES = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
VICROP_LAYER = 14  # LLaVA-1.5-7B's 32 layers; other depths scale with the layer count


def vicrop_layer(num_layers: int) -> int:
    """The layer whose attention ViCrop reads: 14 of 32, at the same relative depth elsewhere."""
    return min(VICROP_LAYER, max(num_layers * VICROP_LAYER // 32, 1))


def _require_images(request: GenerationRequest) -> None:
    if request.images is None:
        raise ValueError("this method resamples the source images: pass images=[...] (one per prompt)")


def _prefill_and_decode(engine, request, embeds, attention_mask, padded, visual_tokens, roi=None) -> MethodResult:
    """Plain prefill of a prompt given as embeddings, then the shared decode loop."""
    adapter = engine.adapter
    key_mask = attention_mask if padded else None
    cache = adapter.new_cache()
    hidden = adapter.run_layers(embeds, 0, adapter.num_layers, default_position_ids(attention_mask), key_mask, cache)
    decoded = decode(adapter, cache, adapter.logits(hidden[:, -1]), key_mask, attention_mask.sum(dim=1),
                     request.sampling, request.keep_logits)
    return MethodResult(tokens=decoded.tokens, logits=decoded.logits, roi=roi, roi_tokens=None,
                        visual_tokens=visual_tokens)


def _whole_view_boxes(batch: int, grid: tuple[int, int], device) -> torch.Tensor:
    return torch.tensor([[0, 0, grid[1], grid[0]]], device=device).expand(batch, 4)


@register_method("res-scaling")
def res_scaling_method(engine, request: GenerationRequest) -> MethodResult:
    """The original view's source region at twice the resolution, 4x the image tokens."""
    _require_images(request)
    adapter, geometry = engine.adapter, engine.adapter.geometry
    layout = layout_of(engine, request)
    batch, device = layout.batch_size, adapter.device
    sources = SourceImages.from_pil(request.images, geometry, device)
    squares = grid_box_squares(_whole_view_boxes(batch, adapter.image_grid, device), sources, geometry,
                               adapter.image_grid)
    size = (2 * geometry.input_size[0], 2 * geometry.input_size[1])
    views = resample_views(sources.pixels, sources.sizes, squares, size, geometry.resample, geometry.pad_color,
                           sources.max_side)
    features = adapter.encode_images(geometry.normalize(views, sources.mean, sources.std),
                                     interpolate_pos_encoding=True)
    image_start = layout.prefix_length - adapter.image_length
    embeds = adapter.embed_ids(layout.input_ids)
    sequence = torch.cat([embeds[:, :image_start], features.to(embeds.dtype), embeds[:, layout.prefix_length:]], 1)
    mask = layout.attention_mask
    mask = torch.cat([mask[:, :image_start], mask.new_ones(batch, features.shape[1]), mask[:, layout.prefix_length:]], 1)
    visual = torch.full((batch,), features.shape[1], device=device)
    return _prefill_and_decode(engine, request, sequence, mask, layout.padded, visual)


# ------------------------------------------------------------------------------------------------
# ViCrop
# ------------------------------------------------------------------------------------------------


def _last_token_attention(adapter, embeds, attention_mask, layer: int, image_start: int) -> torch.Tensor:
    """(B, N) attention of the last token to the image tokens at ``layer``, mean over heads
    (softmax over all keys, computed from that layer's q/k only)."""
    positions = default_position_ids(attention_mask)
    hidden = adapter.run_layers(embeds, 0, layer, positions, attention_mask)
    q, k = adapter.attention_qk(layer, hidden, positions)
    k = k.repeat_interleave(adapter.num_heads // adapter.num_kv_heads, dim=1)
    scores = (q[:, :, -1:] @ k.transpose(-1, -2)).float() / adapter.head_dim**0.5  # (B, H, 1, S)
    scores = scores.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)[:, :, 0, image_start : image_start + adapter.image_length]
    return weights.mean(dim=1)


def relative_attention(adapter, question_embeds, question_mask, generic_embeds, generic_mask, layer: int,
                       image_start: int, eps: float = 1e-8) -> torch.Tensor:
    """(B, H, W) ratio of the question's to the generic prompt's attention on the image tokens."""
    question = _last_token_attention(adapter, question_embeds, question_mask, layer, image_start)
    generic = _last_token_attention(adapter, generic_embeds, generic_mask, layer, image_start)
    return (question / (generic + eps)).view(-1, *adapter.image_grid)


def _window_sums(grid_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H - height + 1, W - width + 1) sums of every height x width window of a (H, W) map."""
    integral = torch.nn.functional.pad(grid_map.cumsum(0).cumsum(1), (1, 0, 1, 0))
    return (integral[height:, width:] - integral[:-height, width:] - integral[height:, :-width]
            + integral[:-height, :-width])


def select_window(grid_map: torch.Tensor, cell_size: tuple[float, float], input_size: tuple[int, int],
                  scales=WINDOW_SCALES) -> torch.Tensor:
    """ViCrop's window on one (H, W) map: (4,) int64 grid box ``[x0, y0, x1, y1)``.

    Args:
        grid_map: the relative attention on the token grid.
        cell_size: (width, height) of one grid cell in source pixels.
        input_size: (height, width) of the vision input in pixels (the window unit).
    """
    grid_h, grid_w = grid_map.shape
    best_scores, best_boxes = [], []
    for scale in scales:
        # Window side in cells (rounded, at least one cell, at most the grid).
        width = min(max(round(scale * input_size[1] / cell_size[0]), 1), grid_w)
        height = min(max(round(scale * input_size[0] / cell_size[1]), 1), grid_h)
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


def _generic_tail(engine) -> list[int]:
    """Token ids of the generic prompt after its image tokens, from the processor's tokenizer."""
    tokenizer = getattr(engine.processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("vicrop tokenizes its generic prompt: SDRPN(model, rpn, processor) with a full processor")
    ids = tokenizer(engine.prompt(GENERIC_PROMPT), add_special_tokens=False)["input_ids"]
    image = [i for i, token in enumerate(ids) if token == engine.adapter.image_token_id]
    return ids[image[-1] + 1:] if image else ids


@register_method("vicrop")
def vicrop_method(engine, request: GenerationRequest) -> MethodResult:
    """ViCrop with relative attention; the crop joins the prompt as a second image."""
    _require_images(request)
    adapter, geometry = engine.adapter, engine.adapter.geometry
    layout = layout_of(engine, request)
    batch, device = layout.batch_size, adapter.device
    layer = vicrop_layer(adapter.num_layers)
    image_start = layout.prefix_length - adapter.image_length

    features = adapter.encode_images(request.pixel_values)
    question = adapter.embed(layout.input_ids, attention_mask=layout.attention_mask, image_features=features,
                             validate=False)
    tail = torch.tensor(_generic_tail(engine), dtype=torch.long).to(device)
    generic_ids = torch.cat([layout.input_ids[:, : layout.prefix_length], tail.expand(batch, -1)], dim=1)
    generic_mask = torch.cat([layout.attention_mask[:, : layout.prefix_length],
                              layout.attention_mask.new_ones(batch, tail.numel())], dim=1)
    generic = adapter.embed(generic_ids, attention_mask=generic_mask, image_features=features, validate=False)
    ratio = relative_attention(adapter, question.inputs_embeds, question.attention_mask, generic.inputs_embeds,
                               generic.attention_mask, layer, image_start)

    sources = SourceImages.from_pil(request.images, geometry, device)
    grid_cell = (geometry.input_size[1] / adapter.image_grid[1], geometry.input_size[0] / adapter.image_grid[0])
    boxes = []
    for sample, image in enumerate(request.images):  # window sizes depend on each image's size (host-known)
        transform = geometry.transform(image.size)
        cell = (transform.scale[0] * grid_cell[0], transform.scale[1] * grid_cell[1])
        boxes.append(select_window(ratio[sample], cell, geometry.input_size))
    squares = grid_box_squares(torch.stack(boxes), sources, geometry, adapter.image_grid)
    crop_features = adapter.encode_images(roi_views(squares, sources, geometry, geometry.resample))

    prefix = layout.prefix_length
    sequence = torch.cat([question.inputs_embeds[:, :prefix], crop_features.to(question.inputs_embeds.dtype),
                          question.inputs_embeds[:, prefix:]], dim=1)
    mask = layout.attention_mask
    mask = torch.cat([mask[:, :prefix], mask.new_ones(batch, crop_features.shape[1]), mask[:, prefix:]], dim=1)
    visual = torch.full((batch,), 2 * adapter.image_length, device=device)
    # The crop squares ``[x0, y0, side, side]`` in source pixels are vicrop's RoI.
    return _prefill_and_decode(engine, request, sequence, mask, layout.padded, visual, roi=squares)
