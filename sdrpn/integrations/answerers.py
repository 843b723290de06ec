"""What another harness's model wrapper answers with: a batch of (image, prompt) pairs in, the
predictions of ``sdrpn eval`` out (answer, RoI boxes in source pixels, visual tokens).

:func:`load_answerer` loads the checkpoint and the RPN exactly as ``sdrpn eval`` does (local files
only, the processor set to the RPN's base view geometry, the same dtype rules) and answers through
the same :class:`~sdrpn.eval.predictors.EnginePredictor`, so both harnesses give the same answers.
Without an RPN only the baseline runs, as ``model.generate`` on the same prompts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from ..eval.runner import Prediction

__all__ = ["AnswerSettings", "Answerer", "load_answerer"]


@dataclass(frozen=True)
class AnswerSettings:
    """The model, the RPN and the method, with ``sdrpn eval``'s option names and defaults.

    Attributes:
        model: local Hugging Face checkpoint directory.
        rpn: directory written by ``RPN.save_pretrained``; None runs the plain model (baseline only).
        method: a method of the engine (``sdrpn``, ``baseline``, ``res-scaling``, ...).
        threshold: RoI threshold, ``"calibrated"``, or None for the RPN's default.
        strategy: RoI upscaling, "mask", "masked" or "box"; None for the model family's rule.
        max_regions: zoom into the N strongest RoI components only (None: all).
        dtype: a ``--dtype`` name of ``sdrpn eval`` ("auto", "float32", "bf16", ...).
        device: "cpu", "cuda", "cuda:N"; None picks a GPU when one is visible.
        prompt: conversation template name; None uses the RPN's (the model family's without one).
        attn_implementation: attention kernel the model runs with.
    """

    model: Path
    rpn: Path | None = None
    method: str = "sdrpn"
    threshold: float | str | None = None
    strategy: str | None = None
    max_regions: int | None = None
    dtype: str = "auto"
    device: str | None = None
    prompt: str | None = None
    attn_implementation: str = "sdpa"


class Answerer(Protocol):
    method: str

    def answer(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int) -> list[Prediction]:
        """Greedy answers, one per (image, prompt), stripped of surrounding whitespace."""


class EngineAnswerer:
    """One method of the SD-RPN engine, as ``sdrpn eval`` runs it."""

    def __init__(self, engine, method: str, threshold: float | None):
        self.engine = engine
        self.method = method
        self.threshold = threshold

    def answer(self, images, prompts, max_new_tokens):
        from ..eval.predictors import EnginePredictor

        predictor = EnginePredictor(self.engine, self.method, threshold=self.threshold, max_new_tokens=max_new_tokens)
        return predictor.answer(list(images), list(prompts))


class PlainAnswerer:
    """The baseline without an RPN: ``model.generate`` on the prompts of the engine's template."""

    method = "baseline"

    def __init__(self, model, processor, prompt: str | None):
        from ..models import adapter_for
        from ..prompts import template_for

        self.adapter = adapter_for(model, processor)
        self.model = model
        self.processor = processor
        self.template = template_for(prompt, self.adapter)

    def answer(self, images, prompts, max_new_tokens):
        import torch

        texts = [self.template.render(prompt, self.processor) for prompt in prompts]
        # Left padding, as the engine: every row continues from its last token.
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True,
                                padding_side="left").to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        answers = self.processor.batch_decode(sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        # Per image: views of their own grid (Qwen) differ in size.
        counts = self.adapter.image_token_counts(self.adapter.vision_input(inputs))
        return [Prediction(text=text.strip(), boxes=[], visual_tokens=count) for text, count in zip(answers, counts)]


def load_answerer(settings: AnswerSettings) -> Answerer:
    """Load the checkpoint (and the RPN) of ``settings``; a bad setting is a :class:`~sdrpn.errors.UserError`."""
    from ..commands.common import load_model, load_rpn
    from ..errors import UserError
    from ..eval.predictors import available_methods, build_engine, resolve_threshold

    if settings.method not in available_methods():
        raise UserError(f"unknown method {settings.method!r}; choose from {', '.join(available_methods())}")
    if settings.rpn is None and settings.method != "baseline":
        raise UserError(f"method {settings.method} needs an RPN (rpn=DIR, written by sdrpn train); "
                        f"only the baseline runs without one")
    args = argparse.Namespace(model=settings.model, rpn=settings.rpn, device=settings.device,
                              dtype=settings.dtype, attn_implementation=settings.attn_implementation)
    model, processor = load_model(args)
    if settings.rpn is None:
        return PlainAnswerer(model, processor, settings.prompt)
    rpn = load_rpn(args, model)
    threshold = resolve_threshold(rpn, settings.threshold, option="threshold")
    engine = build_engine(model, processor, rpn, strategy=settings.strategy, max_regions=settings.max_regions,
                          prompt=settings.prompt)
    return EngineAnswerer(engine, settings.method, threshold)
