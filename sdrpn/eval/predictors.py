"""The engine's methods as predictors for the evaluation runner and the ``generate``/``show`` commands.

One :class:`sdrpn.SDRPN` engine serves every method (``sdrpn``, ``baseline``, ``sdrpn-reference``,
``res-scaling``, ``vicrop``, and any registered later), so all of them share the same prompt
template (the RPN's unless told otherwise: the methods compare on the same prompts), decode loop and
greedy decoding. Prompts are padded on the left whatever the processor's tokenizer says, so that a
batch answers exactly as its questions one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError
from .metrics import option_letter
from .runner import Prediction

# Methods that read the RPN (and so its threshold); the others only need the model.
RPN_METHODS = ("sdrpn", "sdrpn-reference", "sdrpn-attention")


def available_methods() -> list[str]:
    """Names of the engine's methods, including those registered by its extension modules."""
    import importlib

    from ..engine import methods

    for module in methods.EXTENSION_MODULES:
        importlib.import_module(module)
    return sorted(methods.METHODS)


def check_methods(names: Sequence[str], has_rpn: bool) -> None:
    """Refuse unknown methods, and methods that read an RPN when there is none."""
    known = available_methods()
    for name in names:
        if name not in known:
            raise UserError(f"unknown method {name!r}; choose from {', '.join(known)}")
    needing = [name for name in names if name in RPN_METHODS]
    if needing and not has_rpn:
        free = ", ".join(name for name in known if name not in RPN_METHODS)
        raise UserError(f"--rpn is required for {', '.join(needing)} (an RPN directory written by sdrpn train); "
                        f"{free} need none")


def build_engine(model, processor, rpn=None, threshold: float | None = None, strategy: str = "mask",
                 max_regions: int | None = None, prompt: str | None = None):
    """The engine for ``model`` and its loaded ``rpn``, upscaling with ``strategy`` the
    ``max_regions`` strongest RoI components (None: all), with the ``prompt`` template (None: the
    RPN's). Without an RPN it runs only the methods that need none, in the model family's template
    unless ``prompt`` names one."""
    from ..engine import SDRPN
    from ..models import adapter_for
    from ..prompts import template_for
    from ..roi import RoIOptions

    if rpn is None:
        rpn, prompt = _stand_in_rpn(model), template_for(prompt, adapter_for(model, processor))
    return SDRPN(model, rpn, processor, strategy=strategy, threshold=threshold,
                 roi_options=RoIOptions(max_regions=max_regions), prompt=prompt)


def _stand_in_rpn(model):
    """An untrained one-layer RPN, because :class:`sdrpn.SDRPN` is built around one even for the
    methods that never read it; they are the only ones an engine without ``--rpn`` runs."""
    from ..rpn import RPN

    return RPN.from_model(model, 0, 1)


def resolve_threshold(rpn, threshold: float | str | None, option: str = "--threshold") -> float | None:
    """``--threshold`` as a number: ``calibrated`` becomes the RPN's calibrated threshold; a number
    or None (the engine's default) is kept."""
    if threshold is None or not isinstance(threshold, str):
        return threshold
    try:
        return rpn.resolve_threshold(threshold)
    except ValueError as exc:
        raise UserError(f"{option} {threshold}: {exc}") from None


def roi_boxes(engine, roi, images: Sequence) -> list[list[list[float]]]:
    """Per image, the regions the engine zoomed into, in source pixels ``[x0, y0, x1, y1)``: the RoI
    boxes of the SD-RPN methods, or the one square ViCrop cropped."""
    import torch

    if roi is None:
        return [[] for _ in images]
    if torch.is_tensor(roi):  # vicrop: (B, 4) squares [x0, y0, side, side] in source pixels
        return [[[float(x0), float(y0), float(x0 + width), float(y0 + height)]]
                for x0, y0, width, height in roi.tolist()]
    geometry, grid = engine.adapter.geometry, engine.adapter.image_grid
    if isinstance(roi, list):  # the reference path: one ReferenceRoI per image, on the host
        grid_boxes = [list(r.boxes) if r.mode != "none" else [] for r in roi]
    else:
        keep = (roi.valid & (roi.mode[:, None] > 0)).cpu()
        boxes = roi.boxes.cpu()
        grid_boxes = [boxes[row][keep[row]].tolist() for row in range(boxes.shape[0])]
    return [[[round(v, 1) for v in geometry.transform(image.size).grid_to_source(box, grid)] for box in row]
            for image, row in zip(images, grid_boxes)]


@dataclass
class EngineOutput:
    """One batch through one method: the predictions and the raw engine output."""

    predictions: list[Prediction]
    output: object
    latency_s: float


class EnginePredictor:
    """One engine method behind the runner's :class:`~sdrpn.eval.runner.Predictor` interface.

    Answers are greedy. :meth:`rank_options` scores multiple-choice questions by likelihood: the
    prompt lists the lettered options and each option scores the log-probability of its letter
    as the first answer token.
    """

    def __init__(self, engine, method: str, threshold: float | None = None, max_new_tokens: int = 128):
        self.engine = engine
        self.method = method
        self.processor = engine.processor
        self.threshold = threshold if method in RPN_METHODS else None
        self.max_new_tokens = max_new_tokens

    @property
    def settings(self) -> dict:
        """The options that change this method's answers (recorded with its predictions)."""
        settings = {"method_options": {"greedy": True}, "prompt": self.engine.prompt_template.name}
        if self.method in RPN_METHODS:
            settings.update(threshold=self.threshold if self.threshold is not None else self.engine.options.threshold,
                            strategy=self.engine.options.strategy)
            if self.engine.options.max_regions is not None:
                settings["max_regions"] = self.engine.options.max_regions
        return settings

    def _generate(self, images: list, prompts: list[str], **kwargs) -> tuple[object, int, float]:
        import torch

        texts = [self.engine.prompt(prompt) for prompt in prompts]
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True,
                                padding_side="left")
        device = self.engine.adapter.device
        inputs = {name: value.to(device) for name, value in inputs.items() if torch.is_tensor(value)}
        start = time.perf_counter()
        output = self.engine.generate(**inputs, images=list(images), return_roi=True, method=self.method,
                                      threshold=self.threshold, do_sample=False, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return output, inputs["input_ids"].shape[1], time.perf_counter() - start

    def run(self, images: list, prompts: list[str], output_logits: bool = False) -> EngineOutput:
        """Answer each prompt about its image; keeps the engine output for callers that draw it (with
        every step's (B, V) logits in ``output.logits`` when ``output_logits``)."""
        output, prompt_length, latency = self._generate(images, prompts, max_new_tokens=self.max_new_tokens,
                                                        output_logits=output_logits)
        answers = self.processor.batch_decode(output.sequences[:, prompt_length:], skip_special_tokens=True)
        boxes = roi_boxes(self.engine, output.roi, images)
        visual = [int(v) for v in output.visual_tokens.tolist()]
        predictions = [Prediction(text=text.strip(), boxes=row, visual_tokens=count)
                       for text, row, count in zip(answers, boxes, visual)]
        return EngineOutput(predictions=predictions, output=output, latency_s=latency)

    def answer(self, images: list, prompts: list[str]) -> list[Prediction]:
        return self.run(images, prompts).predictions

    def _letter_tokens(self, count: int) -> list[list[int]]:
        tokenizer = self.processor.tokenizer
        unknown = tokenizer.unk_token_id
        letters = []
        for index in range(count):
            letter = option_letter(index)
            ids = {tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in (letter, f" {letter}")
                   if tokenizer(text, add_special_tokens=False)["input_ids"]}
            letters.append(sorted(ids - {unknown}))
        flat = [token for ids in letters for token in ids]
        if any(not ids for ids in letters) or len(flat) != len(set(flat)):
            raise UserError("the tokenizer has no distinct token for each option letter, so options cannot be "
                            "ranked by likelihood; use --choice-scoring generate")
        return letters

    def rank_options(self, images: list, prompts: list[str], options: list[Sequence[str]]) -> list[Prediction]:
        import torch

        output, _, _ = self._generate(images, prompts, max_new_tokens=1, output_logits=True)
        log_probs = torch.log_softmax(output.logits[0].float(), dim=-1).cpu()
        boxes = roi_boxes(self.engine, output.roi, images)
        predictions = []
        for row, choices in enumerate(options):
            letters = self._letter_tokens(len(choices))
            scores = [float(torch.logsumexp(log_probs[row, ids], dim=0)) for ids in letters]
            predictions.append(Prediction(text="", boxes=boxes[row], visual_tokens=int(output.visual_tokens[row]),
                                          option_scores=scores, option_tokens=[1] * len(choices)))
        return predictions
