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


def build_engine(model, processor, rpn=None, threshold: float | None = None, strategy: str | None = None,
                 max_regions: int | None = None, prompt: str | None = None):
    """The engine for ``model`` and its loaded ``rpn``, upscaling with ``strategy`` (None: the model
    family's rule, "mask" for LLaVA-1.5, "masked" for Qwen2.5-VL) the ``max_regions`` strongest RoI
    components (None: all), with the family's other RoI settings (``adapter.roi_defaults``) and
    the ``prompt`` template (None: the RPN's). Without an RPN it runs only the methods that need
    none, in the model family's template unless ``prompt`` names one."""
    from ..engine import SDRPN
    from ..models import adapter_for
    from ..prompts import template_for
    from ..roi import RoIOptions

    adapter = adapter_for(model, processor)
    if rpn is None:
        rpn, prompt = _stand_in_rpn(adapter), template_for(prompt, adapter)
    options = RoIOptions(**{**adapter.roi_defaults, "max_regions": max_regions})
    try:
        return SDRPN(adapter, rpn, processor, strategy=strategy, threshold=threshold, roi_options=options,
                     prompt=prompt)
    except ValueError as exc:  # an RPN this model cannot run (e.g. below Qwen3-VL's injection layers)
        raise UserError(f"--rpn: {exc}") from None


def _stand_in_rpn(adapter):
    """An untrained one-layer RPN, because :class:`sdrpn.SDRPN` is built around one even for the
    methods that never read it; they are the only ones an engine without ``--rpn`` runs. It sits
    past the layers where the family injects image features, where an RPN may sit."""
    from ..rpn import RPN

    return RPN.from_model(adapter.model, max(adapter.injection_layers, default=-1) + 1, 1)


def resolve_threshold(rpn, threshold: float | str | None, option: str = "--threshold") -> float | None:
    """``--threshold`` as a number: ``calibrated`` becomes the RPN's calibrated threshold; a number
    or None (the engine's default) is kept."""
    if threshold is None or not isinstance(threshold, str):
        return threshold
    try:
        return rpn.resolve_threshold(threshold)
    except ValueError as exc:
        raise UserError(f"{option} {threshold}: {exc}") from None


def roi_boxes(engine, roi, images: Sequence, grids: Sequence[tuple[int, int]] | None = None) -> list[list[list[float]]]:
    """Per image, the regions the engine zoomed into, in source pixels ``[x0, y0, x1, y1)``: the RoI
    boxes of the SD-RPN methods, or the one square ViCrop cropped.

    ``grids``: each image's view grid (``adapter.view_grids`` of the vision input), needed where
    views have sizes of their own; None means the family's fixed ``image_grid``. Families with a
    fixed view geometry (``adapter.geometry``, LLaVA) map a grid box exactly through it; the others
    through the adapter's ``roi_source_rects``, the rectangle a RoI view of that box is cut from.
    """
    import torch

    if roi is None:
        return [[] for _ in images]
    if torch.is_tensor(roi):  # vicrop: (B, 4) squares [x0, y0, side, side] in source pixels
        return [[[float(x0), float(y0), float(x0 + width), float(y0 + height)]]
                for x0, y0, width, height in roi.tolist()]
    adapter = engine.adapter
    if isinstance(roi, list):  # the reference path: one ReferenceRoI per image, on the host
        grid_boxes = [list(r.boxes) if r.mode != "none" else [] for r in roi]
    else:
        keep = (roi.valid & (roi.mode[:, None] > 0)).cpu()
        boxes = roi.boxes.cpu()
        grid_boxes = [boxes[row][keep[row]].tolist() for row in range(boxes.shape[0])]
    if grids is None:
        grids = [tuple(adapter.image_grid)] * len(images)
    if adapter.geometry is not None:
        geometry = adapter.geometry
        return [[[round(v, 1) for v in geometry.transform(image.size).grid_to_source(box, grid)] for box in row]
                for image, row, grid in zip(images, grid_boxes, grids)]
    return _source_rects(adapter, images, grid_boxes, grids)


def _source_rects(adapter, images: Sequence, grid_boxes: list, grids: Sequence) -> list[list[list[float]]]:
    """Grid boxes to source pixels through ``adapter.roi_source_rects``, all rows in one call."""
    import torch

    from ..roi import SourceImages

    owners = [row for row, boxes in enumerate(grid_boxes) for _ in boxes]
    if not owners:
        return [[] for _ in images]
    regions = torch.tensor([box for boxes in grid_boxes for box in boxes], dtype=torch.int64)
    box_grids = torch.tensor([list(grids[row]) for row in owners], dtype=torch.int64)
    sources = SourceImages.from_pil([images[row] for row in owners], adapter.geometry, "cpu")
    rects = adapter.roi_source_rects(regions, box_grids, sources).cpu().tolist()
    out = [[] for _ in images]
    for row, (x0, y0, width, height) in zip(owners, rects):
        out[row].append([float(x0), float(y0), float(x0 + width), float(y0 + height)])
    return out


@dataclass
class EngineOutput:
    """One batch through one method: the predictions and the raw engine output."""

    predictions: list[Prediction]
    output: object
    latency_s: float
    view_tokens: list[int] | None = None  # per row, the original view's image tokens


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

    def _generate(self, images: list, prompts: list[str], **kwargs) -> tuple[object, dict, float]:
        """The engine's output, the processor's inputs (on the device) and the latency."""
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
        return output, inputs, time.perf_counter() - start

    def _grids(self, inputs: dict) -> list[tuple[int, int]]:
        """Each row's view grid, from the processor's inputs."""
        adapter = self.engine.adapter
        return adapter.view_grids(adapter.vision_input(inputs))

    def _boxes(self, output, images: list, inputs: dict) -> list:
        """:func:`roi_boxes` of the output (the view grids are read only where there are RoI boxes)."""
        import torch

        grids = self._grids(inputs) if output.roi is not None and not torch.is_tensor(output.roi) else None
        return roi_boxes(self.engine, output.roi, images, grids)

    def run(self, images: list, prompts: list[str], output_logits: bool = False) -> EngineOutput:
        """Answer each prompt about its image; keeps the engine output for callers that draw it (with
        every step's (B, V) logits in ``output.logits`` when ``output_logits``)."""
        output, inputs, latency = self._generate(images, prompts, max_new_tokens=self.max_new_tokens,
                                                 output_logits=output_logits)
        prompt_length = inputs["input_ids"].shape[1]
        answers = self.processor.batch_decode(output.sequences[:, prompt_length:], skip_special_tokens=True)
        grids = self._grids(inputs)
        boxes = roi_boxes(self.engine, output.roi, images, grids)
        visual = [int(v) for v in output.visual_tokens.tolist()]
        predictions = [Prediction(text=text.strip(), boxes=row, visual_tokens=count)
                       for text, row, count in zip(answers, boxes, visual)]
        return EngineOutput(predictions=predictions, output=output, latency_s=latency,
                            view_tokens=[rows * cols for rows, cols in grids])

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

        output, inputs, _ = self._generate(images, prompts, max_new_tokens=1, output_logits=True)
        log_probs = torch.log_softmax(output.logits[0].float(), dim=-1).cpu()
        boxes = self._boxes(output, images, inputs)
        predictions = []
        for row, choices in enumerate(options):
            letters = self._letter_tokens(len(choices))
            scores = [float(torch.logsumexp(log_probs[row, ids], dim=0)) for ids in letters]
            predictions.append(Prediction(text="", boxes=boxes[row], visual_tokens=int(output.visual_tokens[row]),
                                          option_scores=scores, option_tokens=[1] * len(choices)))
        return predictions
