"""``sdrpn demo``: the shipped tiny model answers a few synthetic test questions, with and without SD-RPN."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.synthetic import DEFAULT_DESIGN, DESIGNS
from ..eval.datasets import short_answer_prompt
from ..eval.metrics import exact_match
from .common import add_model_arguments, add_threshold_argument, format_box, positive_int

if TYPE_CHECKING:
    from ..data.synthetic import SyntheticSample
    from ..eval.predictors import EngineOutput

HELP = "Answer a few test questions with the shipped tiny model, with and without SD-RPN."

EPILOG = """\
  sdrpn demo
  sdrpn demo --questions 20 --seed 1 --out out/demo-seed1
  sdrpn demo --model ckpt/tiny-llava --rpn rpn/tiny-llava --threshold 0.1

The questions are those of the synthetic testbed's test split (`sdrpn testbed generate`): a number
inside one coloured shape, too small to read at the model's 96-pixel view. Without --model and
--rpn the demo runs the tiny LLaVA and RPN shipped in sdrpn/testbed/assets. It writes each
question's image to <out>/images/<#>.png and the `sdrpn show` picture of the first one to
<out>/roi.png. Latencies exclude a first, untimed warm-up answer (one-time setup).
The RoI threshold is the RPN's default one, as in the testbed's measurements: for the shipped RPN
0.1, the authors' threshold for benchmarks of small details (V*, HR-Bench); --threshold calibrated
uses the one `sdrpn train` calibrated on its held-out labels instead."""

DEFAULT_OUT = Path("out/demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpn="optional", required=False)
    demo = parser.add_argument_group("demo")
    demo.add_argument("--questions", type=positive_int, default=6, metavar="N",
                      help="test questions to answer (default 6)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic test split (default 0)")
    demo.add_argument("--design", choices=tuple(DESIGNS), default=None,
                      help="design of the synthetic questions (default: the one the model was trained on, read "
                           "from its training.json; classic without one)")
    demo.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                      help=f"where the images and roi.png go (default {DEFAULT_OUT})")
    add_threshold_argument(demo, "the RPN's default")
    demo.add_argument("--max-new-tokens", type=positive_int, default=8, metavar="N",
                      help="answer length limit (default 8: the answers are two-digit numbers)")


@dataclass
class Answered:
    """One test question answered by both methods."""

    sample: SyntheticSample
    baseline: EngineOutput
    sdrpn: EngineOutput


def _use_shipped_defaults(args: argparse.Namespace) -> None:
    """``--model``/``--rpn`` not given: the shipped directories, which must exist."""
    if args.model is None or args.rpn is None:
        from ..testbed.shipped import require_shipped

        model, rpn = require_shipped()
        args.model, args.rpn = args.model or model, args.rpn or rpn


def _prompt(sample: SyntheticSample) -> str:
    return short_answer_prompt(sample.question)  # as `sdrpn eval` asks the testbed's questions


def _is_right(prediction, sample: SyntheticSample) -> bool:
    return bool(exact_match(prediction.text, [sample.answer]))  # the testbed's metric


def _answer(predictor, sample: SyntheticSample) -> EngineOutput:
    return predictor.run([sample.image], [_prompt(sample)])


def _marked(prediction, sample: SyntheticSample) -> str:
    return f"{prediction.shown_text} ({'right' if _is_right(prediction, sample) else 'wrong'})"


def _boxes(boxes) -> str:
    return " ".join(format_box(box) for box in boxes) or "none"


def format_table(answered: list[Answered]) -> str:
    """One row per question: both answers marked right or wrong, the RoI, visual tokens, latencies."""
    rows = [("#", "question", "true", "baseline", "SD-RPN", "RoI boxes (source px)", "visual tokens",
             "latency ms")]
    for index, item in enumerate(answered):
        base, rpn = item.baseline.predictions[0], item.sdrpn.predictions[0]
        rows.append((str(index), item.sample.question, item.sample.answer, _marked(base, item.sample),
                     _marked(rpn, item.sample), _boxes(rpn.boxes), f"{base.visual_tokens} / {rpn.visual_tokens}",
                     f"{1000 * item.baseline.latency_s:.0f} / {1000 * item.sdrpn.latency_s:.0f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["(visual tokens and latency: baseline / SD-RPN)"])


def format_summary(answered: list[Answered]) -> str:
    """Accuracy and mean latency of each method over the questions."""
    parts = []
    for name, label in (("baseline", "baseline"), ("sdrpn", "SD-RPN")):
        outputs = [getattr(item, name) for item in answered]
        right = sum(_is_right(output.predictions[0], item.sample) for output, item in zip(outputs, answered))
        latency = 1000 * sum(output.latency_s for output in outputs) / len(outputs)
        parts.append(f"{label} {right}/{len(answered)} right ({right / len(answered):.0%}), "
                     f"mean latency {latency:.0f} ms")
    return "; ".join(parts)


def _write_images(answered: list[Answered], out: Path) -> Path:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(answered):
        item.sample.image.save(images / f"{index}.png")
    return images


def _write_picture(engine, item: Answered, threshold: float, out: Path) -> Path:
    """The `sdrpn show` picture of one answered question."""
    from ..viz import render, roi_figure

    sample = item.sample
    figure = roi_figure(engine, sample.image, sample.question, item.sdrpn.predictions[0],
                        item.baseline.predictions[0], threshold, item.sdrpn.latency_s, prompt=_prompt(sample))
    path = out / "roi.png"
    render(figure).save(path)
    return path


def _design(args: argparse.Namespace) -> str:
    """``--design``, by default the model's own (a question of another design is not what it learnt)."""
    from ..testbed.train_model import trained_design

    return args.design or trained_design(args.model) or DEFAULT_DESIGN


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import split_sample
    from ..eval.predictors import EnginePredictor, build_engine, resolve_threshold
    from .common import load_model, load_rpn

    _use_shipped_defaults(args)
    model, processor = load_model(args)
    rpn = load_rpn(args, model)
    engine = build_engine(model, processor, rpn)
    baseline = EnginePredictor(engine, "baseline", max_new_tokens=args.max_new_tokens)
    sdrpn = EnginePredictor(engine, "sdrpn", threshold=resolve_threshold(rpn, args.threshold),
                            max_new_tokens=args.max_new_tokens)
    threshold = sdrpn.settings["threshold"]

    design = _design(args)
    samples = [split_sample(args.seed, "test", index, DESIGNS[design]) for index in range(args.questions)]
    for predictor in (baseline, sdrpn):  # the first call of a process pays one-time setup: keep it untimed
        _answer(predictor, samples[0])
    answered = [Answered(sample, _answer(baseline, sample), _answer(sdrpn, sample)) for sample in samples]

    print(f"{len(samples)} test questions of the synthetic testbed ({design} design, seed {args.seed}); "
          f"model {args.model}, RPN {args.rpn}, threshold {threshold:g}, device {engine.adapter.device}")
    print(format_table(answered))
    print(format_summary(answered))
    images = _write_images(answered, args.out)
    picture = _write_picture(engine, answered[0], threshold, args.out)
    print(f"wrote {len(samples)} images to {images} and the RoI picture of question 0 to {picture}")
    return 0
