"""Training batches of the testbed's tiny LLaVA: questions, base views and the engine's RoI views.

A batch is one of three view modes (:data:`VIEW_MODES`): ``single`` (the base view only), ``box``
(plus the RoI view of the ground-truth cells, grown at random) and ``mask`` (plus a second, random
component, as masked upscaling sees it). The RoI views come from the engine's own code
(:mod:`sdrpn.roi`), so training sees exactly the crops, token counts and token order that
inference produces. The data order and every augmentation are functions of the seed and the step.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .tiny_model import prompt_for

__all__ = ["Batch", "Question", "QuestionSet", "VIEW_MODES", "batch_indices", "box_cells", "make_batch", "roi_inputs"]

VIEW_MODES = ("single", "box", "mask")
_FORCED_LOGIT = 20.0


@dataclass(frozen=True)
class Question:
    """One question, tokenised around its image placeholder.

    Attributes:
        prefix: token ids before the image (``<s> user :``).
        suffix: token ids after the image (the question and ``assistant :``).
        answer: the answer's token ids followed by end-of-sequence.
        box: ground-truth box in source pixels.
        image: the image file.
        subset: "fine" or "coarse" (numbers readable at the base resolution).
        image_size: the source image's (width, height).
        details: ``(number, ink box)`` of every number in the image (the vision warm start's targets).
    """

    prefix: torch.Tensor
    suffix: torch.Tensor
    answer: torch.Tensor
    box: tuple[float, float, float, float]
    image: Path
    subset: str
    image_size: tuple[int, int]
    details: tuple[tuple[str, tuple[int, int, int, int]], ...]


def _raw_records(data_dir: Path, split: str) -> dict[str, dict]:
    """The split's JSONL records by question id, with the generator's own fields."""
    with open(data_dir / f"{split}.jsonl", encoding="utf-8") as handle:
        return {record["question_id"]: record for record in map(json.loads, filter(str.strip, handle))}


class QuestionSet:
    """The questions of one split of a generated data set, read with the eval harness's reader."""

    def __init__(self, data_dir: str | Path, split: str, processor, limit: int | None = None):
        from ..eval.datasets import jsonl

        samples = jsonl.read(Path(data_dir), split)
        records = _raw_records(Path(data_dir), split)
        if limit is not None:
            samples = samples[:limit]
        missing = [s.question_id for s in samples if s.box is None]
        if missing:
            raise UserError(f"{data_dir}: {split} question {missing[0]} has no 'box'; "
                            f"train-model needs the ground-truth boxes of `sdrpn testbed generate`")
        tokenizer = processor.tokenizer
        image_token = processor.image_token_id
        eos = tokenizer.eos_token_id
        self.questions = []
        for sample in samples:
            ids = tokenizer(prompt_for(processor, sample.prompt))["input_ids"]
            if ids.count(image_token) != 1:
                raise ValueError(f"the prompt of {sample.question_id} holds {ids.count(image_token)} image tokens, "
                                 f"expected 1")
            split_at = ids.index(image_token)
            answer = tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"] + [eos]
            record = records[sample.question_id]
            self.questions.append(Question(
                prefix=torch.tensor(ids[:split_at]), suffix=torch.tensor(ids[split_at + 1:]),
                answer=torch.tensor(answer), box=sample.box, image=sample.image, subset=sample.subset,
                image_size=tuple(record["image_size"]),
                details=tuple((d["number"], tuple(d["box"])) for d in record.get("details", ())),
            ))

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> Question:
        return self.questions[index]

    def image(self, index: int):
        from ..eval.datasets import open_image

        return open_image(self.questions[index].image)


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def _epoch_order(seed: int, size: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch]).permutation(size)


def batch_indices(step: int, batch_size: int, size: int, seed: int) -> list[int]:
    """The questions of ``step``: consecutive slices of a fresh permutation every epoch."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [int(_epoch_order(seed, size, p // size)[p % size]) for p in positions]


# ------------------------------------------------------------------------------------------------
# Views
# ------------------------------------------------------------------------------------------------


def box_cells(box, source_size, geometry, grid, grow=(0, 0, 0, 0)) -> tuple[int, int, int, int]:
    """Grid cells ``[x0, y0, x1, y1)`` covering a source-pixel box, at least 2x2 (a single cell
    is noise to the RoI post-processing), then grown by ``grow`` cells per side (clipped)."""
    rows, cols = grid
    gx0, gy0, gx1, gy1 = geometry.transform(source_size).source_to_grid(box, grid)
    cells = []
    for low, high, limit in ((gx0, gx1, cols), (gy0, gy1, rows)):
        start, end = max(math.floor(low), 0), min(math.ceil(high), limit)
        if end - start < 2:  # widen towards the side of the box's centre
            centre = (low + high) / 2
            start = min(max(round(centre) - 1, 0), limit - 2)
            end = start + 2
        cells.append((start, end))
    (x0, x1), (y0, y1) = cells
    return (max(x0 - grow[0], 0), max(y0 - grow[1], 0), min(x1 + grow[2], cols), min(y1 + grow[3], rows))


def _second_component(rng: np.random.Generator, first, grid, reach: int = 3) -> tuple[int, int, int, int] | None:
    """A random box of 2x2 to 3x3 cells near ``first`` (at most ``reach`` cells away) that does not
    touch it (8-connectivity). Near, because the crop encloses both: far apart, the target would
    hardly be magnified at all."""
    rows, cols = grid
    for _ in range(50):
        width, height = int(rng.integers(2, 4)), int(rng.integers(2, 4))
        x0 = int(rng.integers(max(first[0] - width - reach, 0), min(first[2] + reach, cols - width) + 1))
        y0 = int(rng.integers(max(first[1] - height - reach, 0), min(first[3] + reach, rows - height) + 1))
        apart = x0 > first[2] or first[0] > x0 + width or y0 > first[3] or first[1] > y0 + height
        if apart:
            return (x0, y0, x0 + width, y0 + height)
    return None


def roi_inputs(images, components, geometry, grid, strategy: str):
    """``(pixel_values, keep)`` of the RoI views the engine makes for the given RoI cells.

    Args:
        images: the source PIL images.
        components: per image, a list of cell boxes ``[x0, y0, x1, y1)``.
        strategy: the engine's ``"box"`` or ``"mask"`` upscaling.

    Returns:
        (B, 3, H, W) pixel values, (B, H * W) bool: the RoI tokens that enter stage 2, and (B, 4)
        the crops ``[x0, y0, width, height]`` in source pixels.
    """
    from ..roi import RoIOptions, SourceImages, propose, region_crops, roi_token_keep, roi_views

    logits = torch.full((len(images), *grid), -_FORCED_LOGIT)
    for index, boxes in enumerate(components):
        for x0, y0, x1, y1 in boxes:
            logits[index, y0:y1, x0:x1] = _FORCED_LOGIT
    options = RoIOptions(strategy=strategy, threshold=0.5, blur=False)
    proposal = propose(logits, grid, options)
    sources = SourceImages.from_pil(images, geometry, "cpu")
    crops = region_crops(proposal, sources, geometry, grid)
    return roi_views(crops, sources, geometry), roi_token_keep(proposal, grid), crops


@dataclass
class Batch:
    """Model inputs of one batch: questions, their base views and, for two-view batches, the RoI
    views with the tokens kept from each."""

    questions: list[Question]
    pixel_values: torch.Tensor
    roi_pixel_values: torch.Tensor | None = None
    roi_keep: torch.Tensor | None = None
    roi_crops: torch.Tensor | None = None


def make_batch(data: QuestionSet, indices, mode: str, processor, geometry, grid,
               rng: np.random.Generator | None = None, max_grow: int = 0) -> Batch:
    """The batch of ``indices`` in view ``mode``; ``rng`` draws the RoI growth and second
    components (None: the tight ground-truth cells)."""
    images = [data.image(index) for index in indices]
    questions = [data[index] for index in indices]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    if mode == "single":
        return Batch(questions, pixel_values)
    components = []
    for question, image in zip(questions, images):
        grow = (0, 0, 0, 0) if rng is None else tuple(int(g) for g in rng.integers(0, max_grow + 1, size=4))
        first = box_cells(question.box, image.size, geometry, grid, grow)
        boxes = [first]
        if mode == "mask":
            second = _second_component(rng, first, grid) if rng is not None else None
            boxes += [second] if second is not None else []
        components.append(boxes)
    roi_pixel_values, keep, crops = roi_inputs(images, components, geometry, grid,
                                                 "mask" if mode == "mask" else "box")
    return Batch(questions, pixel_values, roi_pixel_values, keep, crops)
