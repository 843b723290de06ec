"""``sdrpn-attention``: two-stage inference driven by the model's raw grounding attention instead of
the RPN's map; the "no training" row of the testbed and of the paper's ablation.

The map is what the pseudo-labels are made of, read at inference time: the attention of the
grounding heads recorded in the RPN's label settings (those ``sdrpn label`` used), from the last
prompt token (no answer exists yet) to the image tokens, with the same sink detector zeroing the
sink tokens. Divided by its peak it becomes a probability map, enters the RoI post-processing as
logits, and stage 2 runs as for ``sdrpn``. The grounding layers are run once more for the map, so
this method is for accuracy comparisons, not for speed.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..distill.attention import CaptureRequest, capture, grounding_map, teacher_forced_batch
from ..distill.heads import HeadSelection
from ..distill.sinks import SinkSpec
from .methods import GenerationRequest, MethodResult, layout_of, register_method, sdrpn_method

__all__ = ["grounding_settings", "prompt_grounding", "attention_roi_method"]

_PEAK_EPS = 1e-12


def grounding_settings(rpn) -> tuple[HeadSelection, SinkSpec]:
    """The grounding heads and sink detector recorded in the RPN's label settings; no detector for
    an RPN trained with sinks kept (``sdrpn train --keep-sinks``), whose targets kept them too."""
    labels = rpn.config.get("labels") or {}
    if "heads" not in labels or "sink" not in labels:
        raise ValueError("sdrpn-attention reads the grounding heads and sink detector that made the RPN's labels; "
                         "this RPN records none (train it with `sdrpn train` on `sdrpn label` output)")
    heads = HeadSelection(tuple(tuple(pair) for pair in labels["heads"]))
    if labels.get("keep_sinks"):
        return heads, SinkSpec.create("none")
    sink = dict(labels["sink"])
    sink["dims"] = None if sink.get("dims") is None else tuple(sink["dims"])
    return heads, SinkSpec(**sink)


@torch.no_grad()
def prompt_grounding(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                     heads: HeadSelection, sink: SinkSpec) -> torch.Tensor:
    """(B, N) grounding attention of the last prompt token, sinks zeroed.

    ``input_ids`` must end with a real token in every row (a :class:`PromptLayout`'s do). That
    token is fed as the one query of a teacher-forced pass over the rest of the prompt, so the
    rows are computed exactly as the labels' rows are (RoPE, causal, softmax over all keys).
    """
    inputs = adapter.embed(input_ids[:, :-1], pixel_values, attention_mask[:, :-1])
    last = input_ids[:, -1].tolist()
    batch = teacher_forced_batch(inputs, [[token, token] for token in last], pad_id=last[0])
    grounding_layer = min(heads.by_layer)
    request = CaptureRequest(heads.by_layer).merge(sink.request(grounding_layer, adapter.num_heads))
    captured = capture(adapter, batch, request)
    grounding = grounding_map(captured.select(heads.by_layer), captured.query_mask)
    return grounding.masked_fill(sink.detect(captured, grounding_layer, grounding.shape[1]), 0.0)


@register_method("sdrpn-attention")
def attention_roi_method(engine, request: GenerationRequest) -> MethodResult:
    """SD-RPN's stage 2 on the raw grounding attention map (no RPN map)."""
    adapter = engine.adapter
    heads, sink = grounding_settings(engine.rpn)
    layout = layout_of(engine, request)
    grounding = prompt_grounding(adapter, layout.input_ids, layout.attention_mask, request.pixel_values, heads, sink)
    probability = grounding / grounding.amax(dim=1, keepdim=True).clamp_min(_PEAK_EPS)
    flat = torch.logit(probability, eps=1e-6)
    grids = adapter.view_grids(request.pixel_values)  # row i's map at the top left of the largest grid
    logits = flat.new_full((flat.shape[0], max(g[0] for g in grids), max(g[1] for g in grids)), float("-inf"))
    for row, (height, width) in enumerate(grids):
        logits[row, :height, :width] = flat[row, : height * width].view(height, width)
    return sdrpn_method(engine, replace(request, roi_logits=logits))
