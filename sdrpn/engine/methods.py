"""Generation methods selectable on one engine: ``sdrpn``, ``sdrpn-reference``, ``baseline`` and
any method registered later (``res-scaling``, ``vicrop`` live in :mod:`sdrpn.engine.baselines`,
``sdrpn-attention`` in :mod:`sdrpn.engine.attention_roi`).

A method is a function ``method(engine, request) -> MethodResult``; :func:`register_method` adds
one. Every method decodes with :func:`sdrpn.engine.generation.decode`, so timings compare prefill
strategies, not decode loops.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..roi import RoIOptions, RoIProposal, SourceImages
from .generation import SamplingConfig, decode
from .layout import PromptLayout
from .reference import ReferenceRoI, reference_generate
from .stage1 import run_stage1
from .stage2 import RoITokens, continue_prefill, roi_tokens, run_stage2

__all__ = ["GenerationRequest", "MethodResult", "METHODS", "register_method", "get_method", "layout_of", "layout_for",
           "pad_rows"]

# Modules that register further methods when imported; loaded on first lookup of an unknown name.
EXTENSION_MODULES = ("sdrpn.engine.baselines", "sdrpn.engine.attention_roi")


@dataclass
class GenerationRequest:
    """One batch to generate for, as the engine received it.

    Attributes:
        input_ids, attention_mask, pixel_values: processor outputs (any padding side).
        images: the source PIL images, one per row (None for methods that need none).
        sampling: token selection.
        options: RoI post-processing.
        roi_logits: (B, H, W) forced RPN maps, or None.
        keep_logits: return every step's logits.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor
    images: list | None
    sampling: SamplingConfig
    options: RoIOptions
    roi_logits: torch.Tensor | None = None
    keep_logits: bool = False


@dataclass
class MethodResult:
    """Generated tokens (B, T) (pad after each row's end), per-step logits if kept, the RoI
    (a :class:`RoIProposal` for the fast path, a list of ReferenceRoI for the reference, None
    otherwise), RoI tokens per row and visual tokens per row in the prompt."""

    tokens: torch.Tensor
    logits: list[torch.Tensor] | None
    roi: RoIProposal | list[ReferenceRoI] | None
    roi_tokens: RoITokens | None
    visual_tokens: torch.Tensor


Method = Callable[["object", GenerationRequest], MethodResult]
METHODS: dict[str, Method] = {}


def register_method(name: str):
    """Decorator registering ``method(engine, request) -> MethodResult`` under ``name``."""

    def register(function: Method) -> Method:
        METHODS[name] = function
        return function

    return register


def get_method(name: str) -> Method:
    """The method called ``name``; unknown names raise ValueError listing the known ones."""
    if name not in METHODS:
        for module in EXTENSION_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                if error.name != module:
                    raise
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def layout_of(engine, request: GenerationRequest) -> PromptLayout:
    """The request's prompts laid out as [prefix | question block] on the model's device."""
    return layout_for(engine.adapter, request.input_ids, request.attention_mask, request.pixel_values,
                      request.sampling.pad_token_id)


def layout_for(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vision_input,
               pad_token_id: int) -> PromptLayout:
    """Prompts laid out as [prefix | question block] for ``adapter``'s family, on its device."""
    layout = PromptLayout.build(input_ids, attention_mask, adapter.image_token_id,
                                adapter.image_token_counts(vision_input), pad_token_id, adapter.prefix_tail)
    return layout.to(adapter.device)


@register_method("sdrpn")
def sdrpn_method(engine, request: GenerationRequest) -> MethodResult:
    """Two stages with KV reuse, everything between the stages on the device."""
    adapter, rpn = engine.adapter, engine.rpn
    layout = layout_of(engine, request)
    sources = None
    if request.options.strategy != "none":
        if request.images is None:
            raise ValueError("SD-RPN crops the RoI from the source images: pass images=[...] (one per prompt)")
        sources = SourceImages.from_pil(request.images, adapter.geometry, adapter.device)
    stage1 = run_stage1(adapter, rpn, layout, request.pixel_values, request.options, request.roi_logits,
                        engine.proposal_fn)
    # Without a RoI in the batch, the stage-1 cache continues as a normal prefill; sync-free
    # engines cannot know that on the host and run stage 2 with every RoI slot masked instead.
    no_roi = sources is None or (not engine.sync_free and not bool(stage1.proposal.mode.any()))
    if no_roi:
        tokens, prefill = None, continue_prefill(adapter, stage1, layout, rpn.start_layer)
    else:
        tokens = roi_tokens(adapter, stage1, sources, engine.sync_free, engine.image_processor)
        prefill = run_stage2(adapter, stage1, layout, tokens, rpn.start_layer, engine.sync_free)
    decoded = decode(adapter, prefill.cache, prefill.logits, prefill.attention_mask, prefill.next_position,
                     request.sampling, request.keep_logits, prefill.rope_delta)
    visual = layout.image_lengths + prefill.roi_lengths
    if prefill.dropped is not None:
        visual = visual - prefill.dropped
    return MethodResult(tokens=decoded.tokens, logits=decoded.logits, roi=stage1.proposal, roi_tokens=tokens,
                        visual_tokens=visual)


@register_method("baseline")
def baseline_method(engine, request: GenerationRequest) -> MethodResult:
    """Plain generation: one prefill of the processor's prompt through every layer, then decoding."""
    adapter = engine.adapter
    input_ids, attention_mask = request.input_ids, request.attention_mask
    if attention_mask is not None:
        input_ids, attention_mask = left_aligned(input_ids, attention_mask)
    embedded = adapter.embed(input_ids, request.pixel_values, attention_mask)
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    attention_mask = embedded.attention_mask if padded else None
    cache = adapter.new_cache()
    hidden = adapter.run_layers(embedded.inputs_embeds, 0, adapter.num_layers, embedded.position_ids,
                                attention_mask, cache, embedded.rope_position_ids, embedded.layer_additions)
    next_position = embedded.attention_mask.sum(dim=1)
    decoded = decode(adapter, cache, adapter.logits(hidden[:, -1]), attention_mask, next_position,
                     request.sampling, request.keep_logits, embedded.rope_delta)
    return MethodResult(tokens=decoded.tokens, logits=decoded.logits, roi=None, roi_tokens=None,
                        visual_tokens=embedded.image_lengths)


def left_aligned(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows rotated so that trailing padding moves to the front: the last position of every row
    is then a real token, which is where decoding continues (right-padded prompts otherwise continue
    from a pad token, as ``model.generate`` does). Left or inner padding stays as it is."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    trailing = mask.shape[1] - 1 - torch.where(mask, positions, -1).amax(dim=1)
    index = (positions - trailing[:, None]) % mask.shape[1]
    return input_ids.gather(1, index.to(input_ids.device)), attention_mask.gather(1, index)


def pad_rows(rows: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Stacks 1-D token rows of different lengths, padding on the right."""
    length = max(row.shape[0] for row in rows)
    out = torch.full((len(rows), length), pad, dtype=rows[0].dtype, device=rows[0].device)
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row
    return out


@register_method("sdrpn-reference")
def reference_method(engine, request: GenerationRequest) -> MethodResult:
    """The plain two-stage method (:mod:`sdrpn.engine.reference`), sample by sample."""
    if request.images is None:
        raise ValueError("SD-RPN crops the RoI from the source images: pass images=[...] (one per prompt)")
    decoded, rois = reference_generate(
        engine.adapter, engine.rpn, engine.processor, request.input_ids, request.attention_mask,
        request.pixel_values, request.images, request.options, request.sampling, request.roi_logits,
        request.keep_logits,
    )
    pad = request.sampling.pad_token_id
    tokens = pad_rows([d.tokens[0] for d in decoded], pad)
    logits = None
    if request.keep_logits:  # rows that already ended hold NaN
        steps = max(len(d.logits) for d in decoded)
        logits = [torch.cat([d.logits[step] if step < len(d.logits) else torch.full_like(d.logits[0], float("nan"))
                             for d in decoded]) for step in range(steps)]
    originals = engine.adapter.image_token_counts(request.pixel_values)
    visual = torch.tensor([count - r.dropped + (0 if r.keep is None else int(r.keep.sum()))
                           for count, r in zip(originals, rois)])
    return MethodResult(tokens=tokens, logits=logits, roi=rois, roi_tokens=None, visual_tokens=visual)

