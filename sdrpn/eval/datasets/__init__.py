"""Readers of the standard benchmarks, in the formats their authors distribute.

>>> from sdrpn.eval.datasets import load_benchmark
>>> samples = load_benchmark("textvqa", "data/textvqa")          # doctest: +SKIP

Every reader returns a list of :class:`Sample` and raises :class:`DatasetError` (a
:class:`sdrpn.errors.UserError`) naming the file and the problem when the files are not the
benchmark's. Given an ``issues`` list, a reader skips a record it cannot use and reports it there
(file, line, reason: the policy of :mod:`sdrpn.issues`); without one, that record is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import UserError
from . import chartqa, docvqa, hrbench, jsonl, ocrbench, pope, textvqa, vstar
from .base import (OPTION_ANSWER, SHORT_ANSWER, DatasetError, EmbeddedImage, Sample, open_image,
                   open_sample_image, option_prompt, short_answer_prompt)

__all__ = [
    "BENCHMARKS", "Benchmark", "DatasetError", "EmbeddedImage", "OPTION_ANSWER", "SHORT_ANSWER", "Sample",
    "get_benchmark", "load_benchmark", "open_image", "open_sample_image", "option_prompt", "short_answer_prompt",
]


@dataclass(frozen=True)
class Benchmark:
    """How a benchmark is read and scored.

    Attributes:
        name: the ``--benchmark`` name.
        description: the files ``--data`` points at.
        read: ``read(data, split, image_root, issues=None) -> list[Sample]``.
        metric: per-question metric of the open questions (see :mod:`sdrpn.eval.scoring`);
            multiple-choice questions are scored by the option chosen.
        choice_scoring: how a multiple-choice answer is chosen by default: "generate" (answer, then
            match to the nearest option) or "likelihood" (the option the model finds most likely).
        splits: the ``--split`` values the reader accepts (empty: none).
    """

    name: str
    description: str
    read: Callable[..., list[Sample]]
    metric: str
    choice_scoring: str = "generate"
    splits: tuple[str, ...] = ()

    @property
    def threshold(self) -> float | None:
        """SD-RPN's RoI threshold for this benchmark: the authors' preset (``sdrpn.roi.THRESHOLDS``),
        or None for benchmarks without one (the RPN's default threshold, the authors' 0.15 for LLaVA-1.5)."""
        from ...roi import THRESHOLDS

        return THRESHOLDS.get(self.name)


BENCHMARKS: dict[str, Benchmark] = {
    spec.name: spec
    for spec in (
        Benchmark("textvqa", "folder with TextVQA_0.5.1_val.json and train_images/", textvqa.read,
                  "vqa", splits=("val",)),
        Benchmark("docvqa", "folder with val_v1.0.json (or _withQT) and documents/", docvqa.read_docvqa,
                  "anls", splits=("val",)),
        Benchmark("chartqa", "ChartQA test/ folder with test_human.json, test_augmented.json, png/",
                  chartqa.read, "relaxed", splits=chartqa.SUBSETS),
        Benchmark("infovqa", "folder with infographicsVQA_val_v1.0_withQT.json and its images",
                  docvqa.read_infovqa, "anls", splits=("val",)),
        Benchmark("ocrbench", "folder with OCRBench.json and OCRBench_Images/", ocrbench.read,
                  "ocrbench"),
        Benchmark("vstar", "V* bench folder with direct_attributes/ and relative_position/", vstar.read,
                  "choice", choice_scoring="likelihood", splits=vstar.CATEGORIES),
        Benchmark("pope", "folder with coco_pope_<split>.json (JSONL) and COCO val2014/ (or --image-root)",
                  pope.read, "pope", splits=pope.SPLITS),
        Benchmark("hrbench", "hr_bench_4k.tsv / hr_bench_8k.tsv, or their folder", hrbench.read,
                  "choice", splits=hrbench.SPLITS),
        Benchmark("jsonl", "a generic question file (see sdrpn.eval.datasets.jsonl), or its folder",
                  jsonl.read, "exact"),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; an unknown name is a :class:`UserError` listing the known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}") from None


def load_benchmark(name: str, data: str | Path, split: str | None = None,
                   image_root: str | Path | None = None, issues: list | None = None) -> list[Sample]:
    """Read benchmark ``name`` from ``data`` (its annotation file or folder); the records it cannot
    use go to ``issues`` when given, else the first one is a :class:`DatasetError`."""
    benchmark = get_benchmark(name)
    return benchmark.read(Path(data), split, Path(image_root) if image_root is not None else None, issues)
