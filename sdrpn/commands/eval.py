"""``sdrpn eval``: score methods on a benchmark, or plot accuracy against throughput."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..eval.datasets import BENCHMARKS
from .common import (RPN_FREE_METHODS_NOTE, add_max_regions_argument, add_model_arguments, add_prompt_argument,
                     add_threshold_argument, existing_file, existing_path, positive_int)

HELP = "Evaluate methods on a benchmark: metric, samples/s, visual tokens; plot the trade-off."

EPILOG = """\
  # SD-RPN and the plain model on TextVQA val, 8 questions per batch
  sdrpn eval --model ckpt/llava-1.5-7b-hf --rpn rpn/llava-1.5-7b --benchmark textvqa \\
      --data data/textvqa --method baseline sdrpn --batch-size 8 --out results/textvqa.json

  # after an interruption, the same command resumes: answered questions are skipped

  # a quick look at 100 questions of POPE's adversarial split
  sdrpn eval --model ckpt/llava-1.5-7b-hf --rpn rpn/llava-1.5-7b --benchmark pope --split adversarial \\
      --data data/pope --image-root data/coco/val2014 --limit 100 --out results/pope.json

  # the methods that need no RPN, without one
  sdrpn eval --model ckpt/llava-1.5-7b-hf --benchmark textvqa --data data/textvqa \\
      --method baseline res-scaling vicrop --out results/textvqa.json

  # several GPUs: each process answers a shard, rank 0 merges and summarises
  torchrun --nproc_per_node 4 -m sdrpn eval --model ckpt/llava-1.5-7b-hf --rpn rpn/llava-1.5-7b \\
      --benchmark docvqa --data data/docvqa --out results/docvqa.json

  # your own questions (one JSON object per line: question_id, image, question, answers), with the
  # RoI threshold sdrpn train calibrated for this RPN
  sdrpn eval --model ckpt/tiny --rpn rpn/tiny --benchmark jsonl --data data/test.jsonl --threshold calibrated \\
      --out results/mine.json

  # accuracy against throughput for every method of one or more results files (+ results.csv)
  sdrpn eval --plot results.png results/textvqa.json results/docvqa.json

Benchmarks and what --data points at:
""" + "\n".join(f"  {name:9s} {spec.description}" for name, spec in BENCHMARKS.items()) + """

Every method answers the same prompts: the conversation template the RPN was trained with (--prompt
overrides it for all of them; without --rpn, the model family's: vicuna_v1 for LLaVA, the
checkpoint's chat template for Qwen2.5-VL). The per-benchmark RoI thresholds are the authors'
LLaVA-1.5 presets; Qwen2.5-VL uses the RPN's threshold (0.25) everywhere, as the authors do.
Predictions are appended to <out stem>.<method>.jsonl beside --out as they are produced; a rerun
resumes them when the settings and the RPN's weights are the same. A question that cannot be used
(a line that is not JSON, a missing field, an image that is missing or unreadable) is reported with
its file, line and reason, skipped and counted in the summary."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpn="optional", required=False, rpn_note=RPN_FREE_METHODS_NOTE)
    run = parser.add_argument_group("evaluation")
    run.add_argument("--benchmark", metavar="NAME",
                     help="textvqa, docvqa, chartqa, infovqa, ocrbench, vstar, pope, hrbench or jsonl")
    run.add_argument("--data", type=existing_path, metavar="PATH", help="the benchmark's annotation file or folder")
    run.add_argument("--split", metavar="NAME", help="subset to read, where the benchmark has several")
    run.add_argument("--image-root", type=existing_path, metavar="DIR",
                     help="image folder, when the images are not where the benchmark's layout puts them")
    run.add_argument("--method", nargs="+", metavar="METHOD",
                     help="methods to evaluate (default: sdrpn): "
                          "baseline, sdrpn, sdrpn-reference, sdrpn-attention, res-scaling, vicrop")
    run.add_argument("--strategy", choices=("mask", "box", "masked"),
                     help="RoI upscaling of the SD-RPN methods: box for one component, masked for more "
                          "(mask, LLaVA-1.5's), always the box enclosing the mask (box), or masked upscaling "
                          "of the box around the whole mask (masked, Qwen2.5-VL's) (default: the model family's)")
    add_threshold_argument(run, "the benchmark's preset, e.g. 0.15 for TextVQA and 0.1 for DocVQA, else the "
                                "RPN's default, 0.15 for LLaVA-1.5, 0.25 for Qwen2.5-VL")
    add_prompt_argument(run, "the one the RPN was trained with, for every method, else the model family's")
    add_max_regions_argument(run)
    run.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N questions only")
    run.add_argument("--batch-size", type=positive_int, default=1, metavar="B", help="questions per batch (default 1)")
    run.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                     help="answer length limit (default 128)")
    run.add_argument("--choice-scoring", choices=("generate", "likelihood"),
                     help="multiple choice: generate and match to the nearest option, or rank the options "
                          "by likelihood (default: the benchmark's protocol, likelihood for vstar)")
    run.add_argument("--metric", choices=("exact", "vqa", "anls", "relaxed"),
                     help="metric of a jsonl benchmark's open questions (default: exact match)")
    run.add_argument("--out", type=Path, metavar="FILE", help="results file (JSON); methods accumulate in it")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    plot = parser.add_argument_group("plot")
    plot.add_argument("--plot", type=Path, metavar="PNG",
                      help="instead of evaluating, plot the results files given as arguments")
    plot.add_argument("results", nargs="*", type=existing_file, metavar="RESULTS",
                      help="results files to plot (with --plot)")


def _plot(args: argparse.Namespace) -> int:
    from ..eval.report import plot

    table = plot(args.results, args.plot)
    print(f"wrote {args.plot} and {table}")
    return 0


def _check_evaluation_args(args: argparse.Namespace) -> None:
    if args.results:
        raise UserError(f"unexpected argument {args.results[0]} (results files are only read with --plot)")
    missing = [f"--{name.replace('_', '-')}" for name in ("model", "benchmark", "data", "out")
               if getattr(args, name) is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (or use --plot to plot results files)")
    if args.metric is not None and args.benchmark != "jsonl":
        raise UserError(f"--metric applies to the jsonl benchmark only; {args.benchmark} has its own metric")
    if args.out.suffix != ".json":
        raise UserError(f"--out {args.out}: the results file is JSON; name it *.json")


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        return _plot(args)
    _check_evaluation_args(args)

    from .. import distributed
    from ..eval import report, runner
    from ..eval.datasets import OPTION_ANSWER, SHORT_ANSWER, get_benchmark
    from ..eval.predictors import (RPN_METHODS, EnginePredictor, build_engine, check_methods,
                                   resolve_threshold)
    from ..issues import issues_summary, report_issue
    from .common import load_model, load_rpn, resolve_device

    context = distributed.launch_context()
    benchmark = get_benchmark(args.benchmark)
    issues = []
    samples = benchmark.read(args.data, args.split, args.image_root, issues)
    if args.limit is not None:
        samples = samples[:args.limit]
    for issue in issues if context.is_main else ():
        report_issue("eval", issue)
    methods = args.method or ["sdrpn"]
    check_methods(methods, has_rpn=args.rpn is not None)
    metric = args.metric or benchmark.metric
    choice_scoring = args.choice_scoring or benchmark.choice_scoring

    summaries = {}
    args.device = str(distributed.device_for(context, resolve_device(args.device)))
    with distributed.process_group(device=args.device):
        model, processor = load_model(args)
        rpn = load_rpn(args, model)
        engine = build_engine(model, processor, rpn, strategy=args.strategy, max_regions=args.max_regions,
                              prompt=args.prompt)
        threshold = args.threshold if args.threshold is not None else benchmark_threshold(benchmark, engine.adapter)
        threshold = resolve_threshold(rpn, threshold) if rpn is not None else None
        rpn_facts = _rpn_facts(args.rpn) if rpn is not None else {}
        for method in methods:
            predictor = EnginePredictor(engine, method, threshold=threshold, max_new_tokens=args.max_new_tokens)
            options = {"model": str(args.model.resolve()), "dtype": args.dtype,
                       "max_new_tokens": args.max_new_tokens, "split": args.split, **predictor.settings}
            reads_rpn = method in RPN_METHODS
            if reads_rpn:
                options["rpn_weights"] = rpn_facts["rpn_weights"]
            settings = runner.RunSettings(method=method, benchmark=benchmark.name, metric=metric,
                                          choice_scoring=choice_scoring, options=options)
            summary = runner.run(samples, predictor, settings, args.out.with_name(f"{args.out.stem}.{method}.jsonl"),
                                 batch_size=args.batch_size, progress=not args.no_progress, issues=issues)
            if summary is not None:
                if reads_rpn:
                    summary["rpn"] = rpn_facts["rpn"]
                summaries[method] = summary
    if not summaries:  # ranks other than 0
        return 0
    answered = _answerable(samples, issues)
    header = {
        "benchmark": benchmark.name,
        "metric": next(iter(summaries.values()))["metric"],
        "data": str(args.data.resolve()),
        "split": args.split,
        "num_samples": len(answered),
        "skipped": len(issues),
        "prompts": {"template": engine.prompt_template.name, "short_answer": SHORT_ANSWER,
                    "multiple_choice": OPTION_ANSWER,
                    "likelihood": "log-probability of each option's letter as the first answer token",
                    "choice_scoring": choice_scoring, "example": answered[0].prompt},
    }
    results = report.update_results(args.out, header, summaries)
    print(report.format_table(results))
    skipped = issues_summary(issues)
    if skipped:
        print(f"{skipped} (each reported above)")
    print(f"results: {args.out}")
    return 0


def benchmark_threshold(benchmark, adapter) -> float | None:
    """The benchmark's RoI threshold preset for the model family (None: the RPN's default).

    The presets (``sdrpn.roi.THRESHOLDS``) are the authors' LLaVA-1.5 values. Their Qwen2.5-VL
    inference hard-codes 0.25 for every benchmark (their per-benchmark values never reach the
    model), which is that family's RPN default; so only LLaVA takes the presets
    (``adapter.per_benchmark_thresholds``).
    """
    return benchmark.threshold if adapter.per_benchmark_thresholds else None


def _answerable(samples, issues) -> list:
    """The samples no method skipped (an image that could not be opened skips its question for all)."""
    skipped = {issue.question_id for issue in issues}
    return [sample for sample in samples if sample.question_id not in skipped]


def _rpn_facts(rpn_dir: Path) -> dict:
    """What the results record of ``--rpn``: where it was, and a digest of its weights, which keys
    resuming (an RPN retrained into the same directory is another RPN; a moved one is the same)."""
    import hashlib

    from ..rpn import WEIGHTS_NAME

    with open(rpn_dir / WEIGHTS_NAME, "rb") as weights:
        digest = hashlib.file_digest(weights, "sha256").hexdigest()
    return {"rpn": str(rpn_dir.resolve()), "rpn_weights": f"sha256:{digest}"}
