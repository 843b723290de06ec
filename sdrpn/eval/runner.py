"""Run one method over a benchmark: batched, resumable, shardable across ``torchrun`` processes.

Predictions are appended to a JSON-lines file as they are produced, one record per question:
``question_id, subset, prompt, prediction, answers, score, boxes, visual_tokens, latency_s``
(``choice`` and ``option_scores`` for multiple choice). The file starts with a ``settings``
record; rerunning with the same settings skips the questions already answered, and rerunning with
other settings is refused rather than mixing two runs. Throughput is measured over the questions
answered in the run that summarises (earlier runs may have had another machine or load).

A question whose image cannot be opened is skipped and reported (:mod:`sdrpn.issues`), and the
run goes on.

Under ``torchrun`` (inside :func:`sdrpn.distributed.process_group`) every process answers
``samples[rank::world]`` into its own part file (``<name>.rank<r>.jsonl``); once all are done,
rank 0 merges the parts into the predictions file.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from .. import distributed
from ..errors import UserError
from ..issues import RecordIssue, RecordProblem, report_issue
from .datasets import Sample, open_sample_image
from .scoring import chosen_option, metric_label, score_sample, summarize

# How the commands show an answer of no tokens (the model's first token ended it).
EMPTY_ANSWER = "(empty: the model stopped at once)"


@dataclass
class Prediction:
    """What a method returns for one question.

    Attributes:
        text: the generated answer (for likelihood ranking, filled in with the chosen option).
        boxes: RoI boxes [x0, y0, x1, y1) in source-image pixels (empty without a RoI).
        visual_tokens: image tokens the language model read (original view + RoI tokens).
        option_scores: summed log-likelihood of each option (likelihood ranking only).
        option_tokens: token count of each option (likelihood ranking only).
    """

    text: str
    boxes: list[list[float]] = field(default_factory=list)
    visual_tokens: int = 0
    option_scores: list[float] | None = None
    option_tokens: list[int] | None = None

    @property
    def shown_text(self) -> str:
        """The answer as the commands print it: an empty one says so instead of printing a blank."""
        return self.text or EMPTY_ANSWER


class Predictor(Protocol):
    """A method under evaluation (see :mod:`sdrpn.eval.predictors` for the engine's)."""

    method: str

    def answer(self, images: list, prompts: list[str]) -> list[Prediction]:
        """Generate an answer to each prompt about the matching PIL image."""

    def rank_options(self, images: list, prompts: list[str], options: list[Sequence[str]]) -> list[Prediction]:
        """Score every option of each multiple-choice prompt (the prompt lists the options)."""


@dataclass(frozen=True)
class RunSettings:
    """What must stay the same for resumed predictions to belong to the same run."""

    method: str
    benchmark: str
    metric: str
    choice_scoring: str
    options: dict  # method options that change the answers: model, rpn, threshold, dtype, ...

    def as_dict(self) -> dict:
        return {"method": self.method, "benchmark": self.benchmark, "metric": self.metric,
                "choice_scoring": self.choice_scoring, **self.options}


# ------------------------------------------------------------------------------------------------
# Predictions files
# ------------------------------------------------------------------------------------------------


def part_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _part_paths(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def read_predictions(path: Path) -> tuple[dict | None, list[dict]]:
    """The settings record and the prediction records of a predictions file.

    A last line cut short (the process was killed while writing it) is ignored; a damaged line
    elsewhere means the file is not ours and is refused.
    """
    if not path.exists():
        return None, []
    settings, records = None, []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # unterminated last line: an interrupted write
                continue
            raise UserError(f"{path}: line {number} is not a prediction record; "
                            f"is this file a predictions file of `sdrpn eval`?") from None
        if "settings" in record:
            settings = record["settings"]
        elif "question_id" in record:
            records.append(record)
        else:
            raise UserError(f"{path}: line {number} is not a prediction record")
    return settings, records


def _check_settings(path: Path, found: dict | None, expected: dict) -> None:
    if found is None or found == expected:
        return
    changed = sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))
    details = ", ".join(f"{key}: {found.get(key)!r} -> {expected.get(key)!r}" for key in changed)
    raise UserError(f"{path} holds predictions made with other settings ({details}); "
                    f"delete it to start over or pass another --out")


def _drop_partial_line(path: Path) -> None:
    """Cut an unterminated last line (left by a killed run) so that appends start cleanly."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _write_atomically(path: Path, lines: Sequence[str]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def merge_parts(path: Path, settings: dict) -> None:
    """Fold the per-rank part files into ``path`` (first record per question wins)."""
    parts = _part_paths(path)
    if not parts:
        return
    records: dict[str, dict] = {}
    for source in [path, *parts]:
        found, source_records = read_predictions(source)
        _check_settings(source, found, settings)
        for record in source_records:
            records.setdefault(record["question_id"], record)
    _write_atomically(path, [json.dumps({"settings": settings})] + [json.dumps(r) for r in records.values()])
    for part in parts:
        part.unlink()


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _batches(samples: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield list(samples[start:start + size])


def _load_images(batch: Sequence[Sample]) -> list:
    """Each sample's image, or the :class:`RecordIssue` saying why it cannot be used."""
    loaded = []
    for sample in batch:
        try:
            loaded.append(open_sample_image(sample))
        except RecordProblem as problem:
            loaded.append(RecordIssue(sample.file, sample.line, str(problem), sample.question_id))
    return loaded


def _predict(predictor: Predictor, batch: list[Sample], images: list, likelihood: bool) -> list[Prediction]:
    if likelihood and any(sample.options for sample in batch):
        rank_options = getattr(predictor, "rank_options", None)
        if rank_options is None:
            raise UserError(f"method {predictor.method} cannot rank options by likelihood; "
                            f"use --choice-scoring generate")
        predictions = rank_options(images, [s.prompt for s in batch], [s.options for s in batch])
    else:
        predictions = predictor.answer(images, [s.prompt for s in batch])
    if len(predictions) != len(batch):
        raise RuntimeError(f"method {predictor.method} returned {len(predictions)} predictions "
                           f"for a batch of {len(batch)}")
    return predictions


def _record(sample: Sample, prediction: Prediction, metric: str, latency: float, batch_size: int) -> dict:
    record = {"question_id": sample.question_id, "subset": sample.subset, "prompt": sample.prompt}
    if sample.options:
        choice = chosen_option(sample, prediction.text, prediction.option_scores, prediction.option_tokens)
        record["choice"] = choice
        if prediction.option_scores is not None:
            record["option_scores"] = prediction.option_scores
            prediction.text = sample.options[choice]
        score = score_sample(metric, sample, prediction.text, choice)
    else:
        score = score_sample(metric, sample, prediction.text)
    record.update(prediction=prediction.text, answers=list(sample.answers), score=score,
                  boxes=prediction.boxes, visual_tokens=prediction.visual_tokens,
                  latency_s=latency, batch_size=batch_size)
    return record


def run(samples: Sequence[Sample], predictor: Predictor, settings: RunSettings, predictions_path: Path,
        batch_size: int = 1, progress: bool = True, issues: list[RecordIssue] | None = None) -> dict | None:
    """Answer every sample not answered yet, append the records, and summarise.

    Samples whose image cannot be opened are reported and added to ``issues`` (shared between the
    methods of one evaluation: a sample skipped once is not tried again). Returns the summary (see
    :func:`summarize_records`) on rank 0, None on the other ranks.
    """
    context = distributed.launch_context()
    rank, world = context.rank, context.world_size
    issues = [] if issues is None else issues
    predictions_path = Path(predictions_path)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    expected = settings.as_dict()
    own_path = predictions_path if world == 1 else part_path(predictions_path, rank)
    # Questions answered by any earlier run, whatever its number of processes.
    finished = set()
    for source in [predictions_path, *_part_paths(predictions_path)]:
        found, records = read_predictions(source)
        _check_settings(source, found, expected)
        finished.update(record["question_id"] for record in records)
    skipped = {issue.question_id for issue in issues}
    shard = [sample for sample in samples[rank::world] if sample.question_id not in skipped]
    todo = [sample for sample in shard if sample.question_id not in finished]

    _drop_partial_line(own_path)
    needs_header = not own_path.exists() or own_path.stat().st_size == 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(shard), initial=len(shard) - len(todo), desc=f"{settings.benchmark}/{settings.method}",
               unit="q", dynamic_ncols=True, disable=not progress or rank != 0)
    with open(own_path, "a", encoding="utf-8") as out:
        if needs_header:
            out.write(json.dumps({"settings": expected}) + "\n")
        answered, new_issues = _answer_all(predictor, todo, settings, batch_size, out, bar)
    bar.close()

    distributed.barrier()
    answered = {qid for part in distributed.gather_objects(sorted(answered)) for qid in part}
    new_issues = [issue for part in distributed.gather_objects(new_issues) for issue in part]
    if rank != 0:
        return None
    issues.extend(new_issues)
    if world > 1:
        merge_parts(predictions_path, expected)
    _, records = read_predictions(predictions_path)
    skipped = {issue.question_id for issue in issues}
    wanted = {sample.question_id for sample in samples} - skipped
    records = [record for record in records if record["question_id"] in wanted]
    if not wanted:
        raise UserError(f"{settings.benchmark}: no question left to answer: every one was skipped (see above)")
    missing = len(wanted) - len({record["question_id"] for record in records})
    if missing:
        raise RuntimeError(f"{missing} questions have no prediction in {predictions_path} after the run")
    return summarize_records(settings, records, predictions_path, timed=answered)


def _answer_all(predictor: Predictor, todo: Sequence[Sample], settings: RunSettings, batch_size: int, out,
                bar) -> tuple[set[str], list[RecordIssue]]:
    """Answer ``todo`` in batches, appending a record per question to ``out``; returns the ids of the
    questions answered and the issues of those whose image could not be used (each reported)."""
    likelihood = settings.choice_scoring == "likelihood"
    answered: set[str] = set()
    issues: list[RecordIssue] = []
    correct = 0.0
    with ThreadPoolExecutor(max_workers=1) as loader:
        batches = list(_batches(todo, batch_size))
        pending = loader.submit(_load_images, batches[0]) if batches else None
        for index, batch in enumerate(batches):
            loaded = pending.result()
            if index + 1 < len(batches):  # decode the next batch's images while this one runs
                pending = loader.submit(_load_images, batches[index + 1])
            usable = [(sample, image) for sample, image in zip(batch, loaded) if not isinstance(image, RecordIssue)]
            for issue in (image for image in loaded if isinstance(image, RecordIssue)):
                issues.append(issue)
                report_issue("eval", issue, bar.write)
            if usable:
                start = time.perf_counter()
                predictions = _predict(predictor, [s for s, _ in usable], [i for _, i in usable], likelihood)
                latency = time.perf_counter() - start
                for (sample, _), prediction in zip(usable, predictions):
                    record = _record(sample, prediction, settings.metric, latency, len(usable))
                    out.write(json.dumps(record) + "\n")
                    correct += record["score"]
                    answered.add(sample.question_id)
                out.flush()
            bar.update(len(batch))
            bar.set_postfix(score=f"{correct / max(len(answered), 1):.3f}", refresh=False)
    return answered, issues


def summarize_records(settings: RunSettings, records: Sequence[dict], predictions_path: Path,
                      timed: set[str] | None = None) -> dict:
    """Metric, throughput and visual tokens of one method's records. Throughput is over the records
    of the questions in ``timed`` (those answered in this run); over all of them when this run
    answered none of them (everything was answered before)."""
    clocked = [record for record in records if record["question_id"] in (timed or ())] or list(records)
    total_time = sum(record["latency_s"] / record["batch_size"] for record in clocked)
    summary = {
        "method": settings.method,
        "metric": metric_label(settings.metric),
        **summarize(settings.metric, records),
        "num_samples": len(records),
        "samples_per_s": len(clocked) / total_time if total_time > 0 else float("inf"),
        "timed_samples": len(clocked),
        "mean_latency_s": sum(record["latency_s"] for record in clocked) / len(clocked),
        "mean_visual_tokens": sum(record["visual_tokens"] for record in records) / len(records),
        "with_roi": sum(bool(record["boxes"]) for record in records) / len(records),
        "predictions": str(predictions_path),
        "settings": settings.as_dict(),
    }
    return summary
