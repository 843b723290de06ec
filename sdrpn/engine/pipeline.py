"""``SDRPN``: two-stage inference on a loaded Hugging Face MLLM, as a drop-in for ``model.generate``.

    engine = SDRPN(model, RPN.from_pretrained("rpn/", model), processor)
    prompts = [engine.prompt(question) for question in questions]          # the RPN's template
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    ids = engine.generate(**inputs, images=images, max_new_tokens=32)     # like model.generate
    engine.answer(images, ["What is written on the sign?"])               # strings
    engine.predict_roi(**inputs, images=images)                           # stage 1 only

An RPN reads the prompt at fixed layers, so prompts must follow the template it was trained with
(``rpn.prompt_template``) and images the base view geometry it was trained on (``rpn.geometry``);
the engine warns once when they visibly do not.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..models import adapter_for
from ..prompts import PromptTemplate, template_named
from ..roi import RoIOptions, RoIProposal, SourceImages
from ..rpn import RPN
from .generation import SamplingConfig
from .methods import GenerationRequest, MethodResult, get_method, layout_for
from .stage1 import rpn_proposal, run_stage1
from .stage2 import roi_rects

__all__ = ["SDRPN", "SDRPNOutput", "RoIPrediction"]


@dataclass
class RoIPrediction:
    """Stage-1 output for a batch (device tensors).

    Attributes:
        proposal: probability maps, masks, component boxes and counts, RoI cells, region and mode.
        crops: (B, 4) int64 source-pixel rectangle ``[x0, y0, x1, y1)`` each RoI view shows
            (meaningful where ``proposal.mode > 0``), or None without images.
    """

    proposal: RoIProposal
    crops: torch.Tensor | None

    def __getattr__(self, name):  # prob, mask, boxes, counts, ... straight from the proposal
        if name in RoIProposal.__dataclass_fields__:
            return getattr(self.proposal, name)
        raise AttributeError(name)


@dataclass
class SDRPNOutput:
    """``generate(..., return_roi=True)``: sequences as ``model.generate`` returns them, plus the
    RoI and the number of visual tokens (original + RoI) per row; ``logits`` holds every step's
    (B, V) logits when ``output_logits=True``."""

    sequences: torch.Tensor
    roi: object
    visual_tokens: torch.Tensor
    logits: list[torch.Tensor] | None = None


class SDRPN:
    """Two-stage SD-RPN inference with KV reuse on a loaded MLLM.

    Args:
        model: the Hugging Face model as loaded (any dtype, device, attention implementation), or an adapter.
        rpn: an :class:`~sdrpn.rpn.RPN`, or a directory written by ``RPN.save_pretrained``.
        processor: the model's processor (image geometry, ``answer``); None uses the family's default
            geometry. Its geometry should be the RPN's (``rpn.geometry``); a warning says when not.
        strategy: "mask", "masked", "box" or "none"; None (default) for the family's released rule
            ("mask" for LLaVA-1.5, "masked" for Qwen2.5-VL, see :mod:`sdrpn.roi`).
        threshold: RoI threshold: a number; None for the RPN's default (the authors' setting: 0.15 for
            LLaVA-1.5, 0.25 for Qwen2.5-VL); ``"calibrated"`` for the one ``sdrpn train`` calibrated
            on held-out labels.
        prompt: the conversation template of :meth:`prompt` and :meth:`answer` for every method (a
            :mod:`sdrpn.prompts` preset name, recorded dict or template); None uses the RPN's
            (``rpn.prompt_template``).
        compile: compile the RPN + RoI post-processing of stage 1 with ``torch.compile``.
        method: default method of :meth:`generate` ("sdrpn", "baseline", "sdrpn-reference", ...).
        roi_options: further post-processing settings (:class:`~sdrpn.roi.RoIOptions`); None for the
            family's (``adapter.roi_defaults``).
        sync_free: nothing between the stages reads a device value on the host: static shapes
            (H * W RoI slots per row), graph-capturable. False trims stage 2 to the RoI tokens that
            exist (and skips it without a RoI). None (default): True on GPUs, False on the CPU,
            where reading values costs nothing, and False for families whose processor sizes the
            RoI view by the crop (Qwen), which cannot run sync-free.
    """

    def __init__(self, model, rpn, processor=None, strategy: str | None = None, threshold: float | str | None = None,
                 compile: bool = False, method: str = "sdrpn", roi_options: RoIOptions | None = None,
                 sync_free: bool | None = None, prompt: str | dict | PromptTemplate | None = None):
        self.adapter = adapter_for(model, processor)
        self.model = self.adapter.model
        self.processor = processor
        self.rpn = rpn if isinstance(rpn, RPN) else RPN.from_pretrained(rpn, self.adapter)
        injected = self.adapter.injection_layers
        if injected and self.rpn.start_layer <= max(injected):
            raise ValueError(f"the RPN reads layer K={self.rpn.start_layer}, but {self.adapter.family} adds image "
                             f"features after layers {list(injected)}: stage 2 can reuse the cache only from "
                             f"K >= {max(injected) + 1}")
        self.prompt_template = self.rpn.prompt_template if prompt is None else template_named(prompt)
        base = roi_options or RoIOptions(**self.adapter.roi_defaults)
        self.options = RoIOptions(**{**base.__dict__, "strategy": strategy or base.strategy,
                                     "threshold": self.rpn.resolve_threshold(threshold)})
        self.method = method
        on_device = self.adapter.roi_views_on_device
        if sync_free and not on_device:
            raise ValueError(f"{self.adapter.family} encodes each RoI view at a size the crop decides (its "
                             "processor's pixel budget), which is read on the host: use sync_free=False")
        self.sync_free = (on_device and self.adapter.device.type != "cpu") if sync_free is None else bool(sync_free)
        get_method(method)
        self.proposal_fn = torch.compile(rpn_proposal, dynamic=False) if compile else rpn_proposal
        self._warned_image_start = False
        self._warn_on_geometry()

    # -- entry points ------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_roi(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask=None, images=None,
                    roi_logits: torch.Tensor | None = None, threshold: float | None = None,
                    strategy: str | None = None, **processor_outputs) -> RoIPrediction:
        """Stage 1 only: maps, masks, boxes and counts (plus the source crops when ``images`` are given).

        Takes the processor's outputs like :meth:`generate` (``image_grid_thw`` for Qwen).
        """
        pixel_values = self._vision_input(pixel_values, processor_outputs, "predict_roi")
        if processor_outputs:
            raise TypeError(f"predict_roi got unexpected arguments {', '.join(sorted(processor_outputs))}")
        options = self._options(threshold, strategy)
        self._check_image_start(input_ids, attention_mask)
        adapter = self.adapter
        layout = layout_for(adapter, input_ids, attention_mask, pixel_values, 0)
        stage1 = run_stage1(adapter, self.rpn, layout, pixel_values, options, roi_logits, self.proposal_fn)
        crops = None
        if images is not None:
            sources = SourceImages.from_pil(images, adapter.geometry, adapter.device)
            rects = roi_rects(adapter, stage1.proposal, stage1.grids, sources)
            crops = torch.cat([rects[:, :2], rects[:, :2] + rects[:, 2:]], dim=1)
        return RoIPrediction(proposal=stage1.proposal, crops=crops)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, images=None, return_roi: bool = False,
                 method: str | None = None, roi_logits: torch.Tensor | None = None,
                 threshold: float | None = None, strategy: str | None = None, **generation_kwargs):
        """Drop-in for ``model.generate(**processor_inputs)`` with the source images added.

        Args:
            input_ids, pixel_values, attention_mask: the processor's outputs.
            images: the PIL images the processor got, one per prompt.
            return_roi: return an :class:`SDRPNOutput` instead of the sequences.
            method: override the engine's method for this call.
            roi_logits: (B, H, W) forced RPN maps (tests, benchmarks with random weights).
            threshold, strategy: override the engine's RoI settings for this call (``threshold`` as
                in the constructor, None keeping the engine's).
            generation_kwargs: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
                ``eos_token_id``, ``pad_token_id``, ``output_logits``; defaults from ``model.generation_config``.

        Returns:
            (B, S + T) int64 ``[input_ids | generated tokens]``, as ``model.generate``; or an
            :class:`SDRPNOutput` when ``return_roi``.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("generate needs the processor outputs input_ids and pixel_values")
        pixel_values = self._vision_input(pixel_values, generation_kwargs, "generate")
        if images is not None and len(images) != input_ids.shape[0]:
            raise ValueError(f"got {len(images)} images for {input_ids.shape[0]} prompts; pass one image per prompt")
        self._check_image_start(input_ids, attention_mask)
        keep_logits = bool(generation_kwargs.pop("output_logits", False))
        sampling = SamplingConfig.resolve(getattr(self.model, "generation_config", None), **generation_kwargs)
        request = GenerationRequest(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            images=list(images) if images is not None else None, sampling=sampling,
            options=self._options(threshold, strategy), roi_logits=roi_logits, keep_logits=keep_logits,
        )
        result: MethodResult = get_method(method or self.method)(self, request)
        sequences = torch.cat([input_ids.to(result.tokens.device), result.tokens], dim=1)
        if not return_roi and not keep_logits:
            return sequences
        return SDRPNOutput(sequences=sequences, roi=result.roi, visual_tokens=result.visual_tokens,
                           logits=result.logits)

    def answer(self, images, questions, **generation_kwargs) -> list[str]:
        """Answers one question per image; returns the decoded answers.

        Prompts follow the engine's template (:meth:`prompt`) and are padded on the left, whatever
        the processor's tokenizer says: decoding continues every row from its last token.
        ``max_new_tokens`` defaults to 128.
        """
        if self.processor is None:
            raise ValueError("answer() needs the processor: SDRPN(model, rpn, processor)")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images and {len(questions)} questions; pass one question per image")
        prompts = [self.prompt(question) for question in questions]
        inputs = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True,
                                padding_side="left")
        generation_kwargs.setdefault("max_new_tokens", 128)
        sequences = self.generate(**inputs, images=images, **generation_kwargs)
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def prompt(self, question: str) -> str:
        """The prompt of ``question`` about one image, in the engine's template (the RPN's by default)."""
        return self.prompt_template.render(question, self.processor)

    @property
    def image_processor(self):
        """The processor's image processor (what encodes RoI views the processor sizes), or None."""
        return getattr(self.processor, "image_processor", self.processor)

    # -- helpers -----------------------------------------------------------------------------------

    def _options(self, threshold, strategy) -> RoIOptions:
        if threshold is None and strategy is None:
            return self.options
        resolved = self.options.threshold if threshold is None else self.rpn.resolve_threshold(threshold)
        changes = {"threshold": resolved, "strategy": self.options.strategy if strategy is None else strategy}
        return RoIOptions(**{**self.options.__dict__, **changes})

    def _vision_input(self, pixel_values, kwargs: dict, caller: str):
        """The view's vision input: ``pixel_values`` alone, or with the family's other processor
        outputs (e.g. ``image_grid_thw``), taken out of ``kwargs``."""
        for name in self.adapter.derived_input_names:
            kwargs.pop(name, None)
        names = self.adapter.vision_input_names
        missing = [name for name in names[1:] if kwargs.get(name) is None]
        if missing:
            raise ValueError(f"{caller} needs the processor outputs {', '.join(missing)} for this model")
        return self.adapter.vision_input({"pixel_values": pixel_values, **{name: kwargs.pop(name) for name in names[1:]}})

    def _warn_on_geometry(self) -> None:
        """A processor whose base view differs from the one the RPN was trained on shifts every map."""
        if self.adapter.geometry is None:  # a family whose views keep the aspect ratio: nothing to match
            return
        trained, used = self.rpn.geometry, self.adapter.geometry.mode
        if trained is not None and used != trained:
            warnings.warn(f"the RPN was trained on {trained!r} base views but the processor makes {used!r} views "
                          f"(image_processor.do_pad = {trained == 'pad'} matches it); its RoI maps may be off",
                          stacklevel=3)

    def _check_image_start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Warns once when the prompts' image tokens do not start where the RPN's training prompts had
        them: a sign of another conversation template, which the RPN's query token was not trained on."""
        trained = self.rpn.config.get("image_start")
        if trained is None or self._warned_image_start:
            return
        found = sorted(set(image_starts(input_ids, attention_mask, self.adapter.image_token_id)) - {trained})
        if found:
            self._warned_image_start = True
            warnings.warn(f"the prompts' image tokens start at index {found[0]}, but the RPN was trained with "
                          f"them at {trained} (template {self.rpn.prompt_template.name!r}); build prompts with "
                          f"engine.prompt(question) or its RoI maps may be wrong", stacklevel=3)


def image_starts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int) -> list[int]:
    """Per row holding an image, the index of its first image token among the row's real tokens
    (left padding does not count)."""
    ids = input_ids.cpu()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    is_image = (ids == image_token_id) & real
    first = is_image.int().argmax(dim=1, keepdim=True)
    starts = (real.long().cumsum(dim=1) - 1).gather(1, first).flatten()
    return starts[is_image.any(dim=1)].tolist()
