"""The hooks of an lmms-eval task over a question file of ``sdrpn eval --benchmark jsonl``.

lmms-eval reads the file's lines as its documents (``dataset_path: json``); these hooks find each
document's question in ``sdrpn eval``'s own reading of the same file, by ``question_id``, so the
image, the prompt and the score are exactly ``sdrpn eval``'s: the image file opened as RGB, the
question with LLaVA-1.5's short-answer instruction (or the lettered options), and the metric of
:mod:`sdrpn.eval.scoring`. :mod:`sdrpn.integrations.lmms_task` writes a task that uses them.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["JsonlTask", "METRIC_KEYS"]

# metric of sdrpn eval's jsonl benchmark -> the key of the task's results
METRIC_KEYS = {"exact": "exact_match", "vqa": "vqa_accuracy", "anls": "anls", "relaxed": "relaxed_accuracy"}


@functools.lru_cache(maxsize=None)
def _samples(data: str, split: str | None) -> dict:
    from ..eval.datasets import get_benchmark

    return {sample.question_id: sample for sample in get_benchmark("jsonl").read(Path(data), split, None)}


class JsonlTask:
    """``doc_to_visual``, ``doc_to_text`` and ``process_results`` of one JSONL question file.

    Args:
        data: the JSONL file, or its folder (with ``split``), as ``sdrpn eval --data``.
        split: the file of a folder to read (``<split>.jsonl``; default test).
        metric: exact, vqa, anls or relaxed: the score of open questions, as ``sdrpn eval --metric``.
    """

    def __init__(self, data: str | Path, split: str | None = None, metric: str = "exact"):
        if metric not in METRIC_KEYS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRIC_KEYS)}")
        self.data = str(Path(data).expanduser().resolve())
        self.split = split
        self.metric = metric

    def sample(self, doc: dict):
        """The question of ``doc`` as ``sdrpn eval`` reads it."""
        samples = _samples(self.data, self.split)
        key = str(doc["question_id"])
        if key not in samples:
            raise KeyError(f"question {key} is not in {self.data}; the task reads another file than its hooks")
        return samples[key]

    def doc_to_visual(self, doc: dict) -> list:
        from ..eval.datasets import open_image

        return [open_image(self.sample(doc).image)]

    def doc_to_text(self, doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
        return self.sample(doc).prompt

    def process_results(self, doc: dict, results: list[str]) -> dict[str, float]:
        from ..eval.scoring import score_sample

        return {METRIC_KEYS[self.metric]: score_sample(self.metric, self.sample(doc), results[0])}
