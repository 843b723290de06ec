"""``sdrpn testbed run``: the whole self-distillation loop on the tiny model, through the package's
public commands only, and the measurements that test the paper's claims on it.

Steps (each writes under the work directory and is skipped, or resumed, when run again):

1. ``sdrpn heads`` on a calibration slice of the train split (unless heads are given);
2. ``sdrpn label`` on the first ``label_samples`` train questions;
3. ``sdrpn train`` the RPN (and, for the other experiments, RPNs on 10% / 30% of the labels and
   on the ablation targets);
4. ``sdrpn eval`` on the first ``test_samples`` test questions: ``baseline``, ``sdrpn``,
   ``sdrpn-attention`` (the raw attention map, no training), ``res-scaling`` and ``vicrop``; and
   ``sdrpn`` zooming into the strongest RoI component only (``--max-regions 1``);
5. localisation: box IoU with the ground truth of the pseudo-labels (train questions) and of the
   RoIs of ``sdrpn`` and ``sdrpn-attention`` (test questions).

The tiny model was trained with its processor's chat template, so heads and labels use that
template (``--prompt processor``) and the RPNs record it. Every RPN is saved with, and every
evaluation uses, the RoI threshold the authors use for benchmarks of small details (V*, HR-Bench):
0.1 (``FINE_DETAIL_THRESHOLD``). One more row evaluates the main RPN at the threshold ``sdrpn train``
calibrated on its held-out labels (``--threshold calibrated``), so that both are on record.

The ablation adds one change per row, as in the paper: the raw attention map; an RPN regressing
the raw attention; the 3-valued labels instead; sink removal; masked upscaling. Rows before the
last use box upscaling, the last is the default ``sdrpn``. The summary goes to ``testbed.json``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from . import localisation

__all__ = ["LoopOptions", "run_loop", "format_report", "MAIN_METHODS"]

MAIN_METHODS = ("baseline", "sdrpn", "sdrpn-attention", "res-scaling", "vicrop")
# The conversation template the tiny model was trained with: its processor's chat template.
PROMPT = "processor"
# The main RPN once more, zooming into its strongest component alone (``--max-regions 1``).
STRONGEST_REGION = "sdrpn, strongest region"
# The main RPN at the threshold that ``sdrpn train`` calibrated on its held-out labels.
CALIBRATED = "sdrpn, calibrated threshold"
# The authors' RoI threshold for DocVQA, V* and HR-Bench, the benchmarks whose answers hang on small
# details, as the testbed's do (their default, 0.15, is for the others).
FINE_DETAIL_THRESHOLD = 0.1
SUMMARY_NAME = "testbed.json"


@dataclass(frozen=True)
class LoopOptions:
    """What the loop runs. The tiny-model defaults (K, T, RPN recipe, sink threshold) are first
    choices, not yet tuned on a trained model.

    Attributes:
        label_samples: train questions labelled (the label set).
        test_samples: test questions evaluated.
        heads: grounding heads (``LAYER:HEAD,...``); None runs ``sdrpn heads``.
        heads_samples: calibration questions of ``sdrpn heads``.
        heads_layers: the layers ``sdrpn heads`` scores (its ``--layers``; None: its default, the
            middle third of the model).
        sink_layer, sink_threshold: the attention-sink detector of the labels (the default one,
            the mean attention of every head of ``sink_layer``). LLaVA-1.5 reads it at layer 2,
            below its grounding layer 14. The tiny model grounds at layer 2 already (the target
            would be called a sink there) and parks attention on its first image tokens from
            layer 4 on, so it reads layer 5. LLaVA-1.5's 1e-3 suits 576 image tokens; with 144,
            uniform attention alone is about 6e-3, so the tiny model needs a larger threshold.
        start_layer, num_blocks: the RPN's K and T.
        rpn_lr, rpn_batch_size, rpn_epochs: the RPN recipe (steps are fixed by the full label set,
            so that the data-efficiency runs differ in data only).
        fractions: label-set shares of the data-efficiency runs (1.0 is the main RPN).
        ablation: run the ablation rows.
        batch_size: questions per batch in labelling and evaluation.
        threshold: RoI threshold saved with every RPN (``sdrpn train --threshold``) and used by every
            evaluation but the calibrated row.
        seed: RPN data order.
    """

    label_samples: int = 4000
    test_samples: int = 500
    heads: str | None = None
    heads_samples: int = 64
    heads_layers: str | None = None
    sink_layer: int = 5
    sink_threshold: float = 0.02
    start_layer: int = 4
    num_blocks: int = 3
    rpn_lr: float = 3e-4
    rpn_batch_size: int = 64
    rpn_epochs: int = 4
    fractions: tuple[float, ...] = (0.1, 0.3)
    ablation: bool = True
    batch_size: int = 16
    threshold: float = FINE_DETAIL_THRESHOLD
    seed: int = 0


class Loop:
    """One run of the loop in ``work``; every step is a ``sdrpn`` command line."""

    def __init__(self, model: Path, data: Path, work: Path, options: LoopOptions, progress: bool):
        self.model, self.data, self.work, self.options, self.progress = model, data, work, options, progress
        self.timings: dict[str, float] = {}

    def command(self, name: str, *arguments) -> None:
        """Runs ``sdrpn <name> ...``; a failing step stops the loop with its exit status."""
        from ..cli import main

        argv = [name, *map(str, arguments)] + ([] if self.progress else ["--no-progress"])
        print(f"\n$ sdrpn {' '.join(argv)}", flush=True)
        began = time.perf_counter()
        status = main(argv)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - began
        if status:
            raise UserError(f"`sdrpn {name}` failed (exit {status}); fix it and rerun: finished steps are kept")

    # -- steps --------------------------------------------------------------------------------

    def heads(self) -> str:
        if self.options.heads is not None:
            return self.options.heads
        path = self.work / "heads.json"
        if not path.is_file():
            self.command("heads", "--model", self.model, "--data", self.data / "train.jsonl", "--image-root", self.data,
                         "--max-samples", self.options.heads_samples, "--batch-size", self.options.batch_size,
                         "--sink-layer", self.options.sink_layer, "--sink-threshold", self.options.sink_threshold,
                         "--max-new-tokens", 8, "--prompt", PROMPT, "--out", path,
                         *(["--layers", self.options.heads_layers] if self.options.heads_layers else []))
        return str(path)

    def label(self, heads: str) -> Path:
        out = self.work / "labels"
        self.command("label", "--model", self.model, "--data", self.data / "train.jsonl", "--image-root", self.data,
                     "--out", out, "--heads", heads, "--sink-layer", self.options.sink_layer,
                     "--sink-threshold", self.options.sink_threshold,
                     "--max-samples", self.options.label_samples, "--batch-size", self.options.batch_size,
                     "--max-new-tokens", 8, "--prompt", PROMPT)
        return out

    def train(self, labels: Path, name: str, steps: int | None = None, *extra) -> Path:
        out = self.work / name
        if (out / "model.safetensors").is_file():
            return out  # finished earlier (the weights are written at the end only)
        options = self.options
        arguments = ["--model", self.model, "--labels", labels, "--out", out, "--cache", self.work / "features",
                     "--K", options.start_layer, "--T", options.num_blocks, "--lr", options.rpn_lr,
                     "--batch-size", options.rpn_batch_size, "--seed", options.seed, "--eval-samples", 128,
                     "--threshold", options.threshold]
        arguments += ["--max-steps", steps] if steps else ["--epochs", options.rpn_epochs]
        self.command("train", *arguments, *extra)
        return out

    def evaluate(self, name: str, rpn: Path, methods, strategy: str = "mask", extra: tuple = (),
                 threshold: float | str | None = None) -> dict:
        out = self.work / "eval" / f"{name}.json"
        arguments = ["--model", self.model, "--rpn", rpn, "--benchmark", "jsonl", "--data", self.data / "test.jsonl",
                     "--method", *methods, "--strategy", strategy, "--limit", self.options.test_samples,
                     "--batch-size", self.options.batch_size, "--max-new-tokens", 8, "--out", out, *extra,
                     "--threshold", self.options.threshold if threshold is None else threshold]
        self.command("eval", *arguments)
        return json.loads(out.read_text())

    # -- measurements -------------------------------------------------------------------------

    def truths(self, split: str) -> dict[str, tuple]:
        from ..eval.datasets import jsonl

        return {str(s.question_id): s.box for s in jsonl.read(self.data, split) if s.box is not None}

    @functools.cached_property
    def test_truths(self) -> dict[str, tuple]:
        return self.truths("test")

    @functools.cached_property
    def test_sizes(self) -> dict[str, tuple[int, int]]:
        from PIL import Image

        from ..eval.datasets import jsonl

        sizes = {}
        for sample in jsonl.read(self.data, "test"):
            with Image.open(sample.image) as image:  # the header only
                sizes[str(sample.question_id)] = image.size
        return sizes

    def method_rows(self, results: dict) -> dict[str, dict]:
        """Each method's accuracy and cost on the test questions and, for the SD-RPN rows, the RoI's
        IoU and the random-zoom bound of its sizes."""
        from ..eval.runner import read_predictions

        truths, sizes = self.test_truths, self.test_sizes

        rows = {}
        for name, summary in results["methods"].items():
            _, records = read_predictions(Path(summary["predictions"]))
            zooms = name.startswith("sdrpn")
            rows[name] = {"accuracy": summary["score"], "visual_tokens": summary["mean_visual_tokens"],
                          "samples_per_s": summary["samples_per_s"], "with_roi": summary["with_roi"],
                          "roi_iou": localisation.mean(localisation.prediction_ious(records, truths).values())
                          if zooms else None,
                          "random_zoom_bound": localisation.random_zoom_bound(records, sizes) if zooms else None}
        return rows

    def label_quality(self, labels: Path) -> dict:
        from transformers import AutoProcessor

        from ..distill.shards import read_index
        from ..models.geometry import ImageGeometry

        processor = AutoProcessor.from_pretrained(self.model, local_files_only=True)
        crop = processor.image_processor.crop_size
        geometry = ImageGeometry.from_processor(processor, (crop["height"], crop["width"]))
        index = read_index(labels)
        ious = localisation.label_ious(labels, geometry, self.truths("train"), self.data)
        return {"labelled": len(index), "valid": sum(bool(row["valid"]) for row in index),
                "pseudo_label_iou": localisation.mean(ious.values())}

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> dict:
        options = self.options
        heads = self.heads()
        labels = self.label(heads)
        quality = self.label_quality(labels)
        rpn = self.train(labels, "rpn")
        main = self.method_rows(self.evaluate("main", rpn, MAIN_METHODS))
        strongest = self.evaluate("strongest-region", rpn, ["sdrpn"], extra=("--max-regions", 1))
        main[STRONGEST_REGION] = self.method_rows(strongest)["sdrpn"]
        calibrated = self.evaluate("calibrated-threshold", rpn, ["sdrpn"], threshold="calibrated")
        main[CALIBRATED] = {**self.method_rows(calibrated)["sdrpn"],
                            "threshold": calibrated["methods"]["sdrpn"]["settings"]["threshold"]}
        summary = {"model": str(self.model), "data": str(self.data),
                   "options": json.loads(json.dumps(asdict(options))),  # as testbed.json holds it
                   "labels": quality, "methods": main,
                   "localisation": {"pseudo_labels_train": quality["pseudo_label_iou"],
                                    "rpn_test": main["sdrpn"]["roi_iou"],
                                    "raw_attention_test": main["sdrpn-attention"]["roi_iou"]}}

        steps = trained_steps(rpn)
        efficiency = {}
        for fraction in options.fractions:
            name = f"rpn-{round(100 * fraction)}pct"
            count = max(math.ceil(fraction * quality["valid"]), options.rpn_batch_size + 1)
            trained = self.train(labels, name, steps, "--max-samples", count)
            rows = self.method_rows(self.evaluate(name, trained, ["sdrpn"]))
            efficiency[f"{round(100 * fraction)}%"] = {"samples": count, **rows["sdrpn"]}
        efficiency["100%"] = {"samples": quality["valid"], **main["sdrpn"]}
        summary["data_efficiency"] = efficiency

        if options.ablation:
            summary["ablation"] = self.ablation(labels, rpn, steps, main["sdrpn"])
        summary["targets"] = targets(summary)
        summary["seconds"] = {name: round(value, 1) for name, value in self.timings.items()}
        path = self.work / SUMMARY_NAME
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return summary

    def ablation(self, labels: Path, rpn: Path, steps, full: dict) -> list[dict]:
        regress = self.train(labels, "rpn-attention-target", steps, "--target", "attention", "--keep-sinks")
        keep_sinks = self.train(labels, "rpn-keep-sinks", steps, "--keep-sinks")
        runs = [
            ("raw attention as the RoI map", regress, "sdrpn-attention"),  # its labels keep the sinks
            ("RPN regressing raw attention", regress, "sdrpn"),
            ("+ 3-valued label assignment", keep_sinks, "sdrpn"),
            ("+ sink removal", rpn, "sdrpn"),
        ]
        rows = []
        for number, (title, trained, method) in enumerate(runs, start=1):
            result = self.method_rows(self.evaluate(f"ablation-{number}", trained, [method], strategy="box"))
            rows.append({"row": title, "strategy": "box", **result[method]})
        rows.append({"row": "+ masked upscaling", "strategy": "mask", **full})
        return rows


def trained_steps(rpn: Path) -> int:
    """Optimizer steps of a finished ``sdrpn train`` run, from its log."""
    from ..distill.train import LOG_NAME

    lines = (rpn / LOG_NAME).read_text(encoding="utf-8").splitlines()
    return max(json.loads(line)["step"] for line in lines if line.strip())


def _fixed(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def targets(summary: dict) -> dict:
    """The testbed's targets (issue text) checked on the measured numbers."""
    methods = summary["methods"]
    sdrpn, baseline, scaling = methods["sdrpn"], methods["baseline"], methods["res-scaling"]
    raw = methods["sdrpn-attention"]
    local = summary["localisation"]
    gain = sdrpn["accuracy"] - baseline["accuracy"]
    return {
        "sdrpn_minus_baseline_points": round(100 * gain, 1),
        "sdrpn_at_least_25_points_above_baseline": gain >= 0.25,
        "random_zoom_bound_points": round(100 * sdrpn["random_zoom_bound"], 1),
        "sdrpn_gain_above_random_zoom_bound": gain > sdrpn["random_zoom_bound"],
        "sdrpn_minus_raw_attention_points": round(100 * (sdrpn["accuracy"] - raw["accuracy"]), 1),
        "res_scaling_minus_sdrpn_points": round(100 * (scaling["accuracy"] - sdrpn["accuracy"]), 1),
        "sdrpn_within_10_points_of_res_scaling": scaling["accuracy"] - sdrpn["accuracy"] <= 0.10,
        "sdrpn_visual_tokens_share_of_res_scaling": round(sdrpn["visual_tokens"] / scaling["visual_tokens"], 3),
        "sdrpn_at_most_half_of_res_scaling_tokens": sdrpn["visual_tokens"] <= scaling["visual_tokens"] / 2,
        "rpn_iou_at_least_raw_attention_iou": (local["rpn_test"] or 0.0) >= (local["raw_attention_test"] or 0.0),
    }


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_report(summary: dict) -> str:
    """Markdown tables of a :func:`run_loop` summary (what the README shows)."""
    lines = ["| method | accuracy % | visual tokens | samples/s | RoI IoU | random zoom of its RoI sizes, "
             "at most + points |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in summary["methods"].items():
        title = f"{name} ({row['threshold']:g})" if "threshold" in row else name
        lines.append(f"| {title} | {_percent(row['accuracy'])} | {row['visual_tokens']:.0f} | "
                     f"{row['samples_per_s']:.1f} | {_fixed(row['roi_iou'])} | "
                     f"{_percent(row.get('random_zoom_bound'))} |")
    local = summary["localisation"]
    lines += ["", "| localisation (box IoU with the ground truth) | IoU |", "|---|---:|"]
    for title, key in (("pseudo-labels (train questions)", "pseudo_labels_train"),
                       ("RPN (test questions)", "rpn_test"), ("raw attention (test questions)", "raw_attention_test")):
        lines.append(f"| {title} | {_fixed(local[key])} |")
    lines += ["", "| RPN trained on | samples | SD-RPN accuracy % |", "|---|---:|---:|"]
    for share, row in summary["data_efficiency"].items():
        lines.append(f"| {share} of the labels | {row['samples']} | {_percent(row['accuracy'])} |")
    if "ablation" in summary:
        lines += ["", "| ablation | upscaling | accuracy % | RoI IoU |", "|---|---|---:|---:|"]
        for row in summary["ablation"]:
            lines.append(f"| {row['row']} | {row['strategy']} | {_percent(row['accuracy'])} | "
                         f"{_fixed(row['roi_iou'])} |")
    return "\n".join(lines)


def run_loop(model: str | Path, data: str | Path, work: str | Path, options: LoopOptions | None = None,
             progress: bool = True) -> dict:
    """Runs the loop (see the module docstring) and returns the summary written to ``testbed.json``."""
    from ..data.synthetic import read_manifest

    model, data, work = Path(model), Path(data), Path(work)
    manifest = read_manifest(data)
    if manifest is None or not manifest.get("complete"):
        raise UserError(f"--data {data}: not a complete data set of `sdrpn testbed generate` (no complete dataset.json)")
    work.mkdir(parents=True, exist_ok=True)
    return Loop(model, data, work, options or LoopOptions(), progress).run()
