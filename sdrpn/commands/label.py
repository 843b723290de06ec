"""``sdrpn label``: write self-distilled RoI pseudo-labels from the model's own attention."""

from __future__ import annotations

import argparse

from dataclasses import replace

from ..distill.heads import PRESETS as HEAD_PRESETS
from ..distill.labels import LABEL_RULE_PRESETS, QUESTION_REWRITES
from ..distill.sinks import SINK_PRESETS
from ..errors import UserError
from .common import add_model_arguments, add_prompt_argument, existing_dir, existing_file, positive_int

HELP = "Write self-distilled RoI pseudo-labels from the model's own attention."
EPILOG = """\
  sdrpn label --model ckpt/llava-1.5-7b --data llava_v1_5_mix665k.json --image-root data \\
      --out labels --max-samples 10000
  sdrpn label --model ckpt/llava-1.5-7b --data questions.jsonl --image-root images --out labels \\
      --heads heads.json --sink norm --sink-dims llama2-7b
  sdrpn label --model ckpt/Qwen2.5-VL-7B-Instruct --data ocrvqa.json --image-root data --out labels-qwen \\
      --heads qwen2.5-vl-7b-text
  sdrpn label --model ckpt/Qwen2.5-VL-7B-Instruct --data gqa.json --image-root data --out labels-qwen-gqa \\
      --heads qwen2.5-vl-7b-natural --sink-preset qwen2.5-vl-7b-natural --question-rewrite qwen2.5-vl-natural
  torchrun --nproc_per_node 8 -m sdrpn label --model ckpt/llava-1.5-7b --data train.json \\
      --image-root data --out labels

--data is LLaVA instruction data (JSON array or JSON lines with id, image, conversations) or plain
JSON lines (question_id, image, text). The questions are asked in the conversation template of
--prompt, which run.json records and `sdrpn train` passes on to the RPN. A record that cannot be
used (not JSON, no question, image missing or unreadable) is reported with its file, line and
reason, and skipped; the run ends with their count. Samples are saved every --shard-size samples
and at least every --flush-seconds; Ctrl-C saves what is labelled and says how much. Rerun the same
command to resume an interrupted run (with the same settings, --prompt included). Qwen2.5-VL labels
follow the authors' rules by default (--rules qwen2.5-vl): each image is padded to a grey square at
576*28*28 pixels, whose padding cells are background; an image whose square view is not 24 x 24
tokens (about 5% of sizes) is reported and skipped.
Output: shard-*.safetensors (grounding, sink, labels), index.jsonl, issues.jsonl, run.json."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpn="none")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, type=existing_file, metavar="FILE",
                      help="LLaVA instruction JSON/JSONL or plain JSONL questions")
    data.add_argument("--image-root", required=True, type=existing_dir, metavar="DIR",
                      help="directory the records' image paths are relative to")
    data.add_argument("--out", required=True, metavar="DIR", help="output directory (created; reused to resume)")
    data.add_argument("--max-samples", type=positive_int, metavar="N", help="label only the first N usable records")
    add_prompt_argument(data, "the model family's, vicuna_v1 for LLaVA")

    attention = parser.add_argument_group("grounding attention")
    attention.add_argument("--heads", metavar="SPEC",
                           help="grounding heads: LAYER:HEAD,HEAD[;LAYER:...] (e.g. 14:13,24,26), a file "
                                "written by `sdrpn heads`, or a preset: "
                                f"{', '.join(HEAD_PRESETS)} (default: the family's, llava-1.5-7b for LLaVA; "
                                "Qwen needs one, its heads differ by size and image kind; none were released "
                                "for Qwen3-VL: run `sdrpn heads`)")
    add_sink_arguments(parser)

    labels = parser.add_argument_group("labels")
    labels.add_argument("--rules", choices=sorted(LABEL_RULE_PRESETS), metavar="PRESET",
                        help="label rule set, the authors' per family: "
                             f"{', '.join(sorted(LABEL_RULE_PRESETS))} (default: the model family's); the "
                             "options below change single rules")
    labels.add_argument("--tau-fg", type=float, help="foreground: > tau-fg x max (default 0.2)")
    labels.add_argument("--tau-bg", type=float,
                        help="background: < tau-bg x max, outside the foreground box (default 0.1)")
    labels.add_argument("--max-box-frac", type=float,
                        help="ignore a sample whose foreground box covers this share of the grid (default 0.5)")
    labels.add_argument("--min-peak", type=float,
                        help="ignore a sample whose grounding maximum is below this (default 0; Qwen: 5e-3)")
    labels.add_argument("--blur-box", action="store_true", default=None,
                        help="box of the 3x3 Gaussian-blurred foreground (the Qwen2.5-VL setting)")
    labels.add_argument("--question-rewrite", choices=sorted(QUESTION_REWRITES), metavar="NAME",
                        help="ask another question than the record's while labelling (the record keeps its "
                             f"own): {', '.join(sorted(QUESTION_REWRITES))} (the authors' Qwen2.5-VL "
                             "natural-image labels ask for the region's boxes)")

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch (default 8)")
    run.add_argument("--max-new-tokens", type=positive_int, default=128,
                     help="longest answer generated (default 128)")
    run.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard file (default 256)")
    run.add_argument("--flush-seconds", type=positive_int, default=60, metavar="S",
                     help="also write a shard once samples have waited S seconds, so that a killed run keeps "
                          "its work (default 60)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_sink_arguments(parser: argparse.ArgumentParser) -> None:
    """The sink-detector options, shared with ``sdrpn heads``."""
    group = parser.add_argument_group("attention sinks")
    group.add_argument("--sink-preset", choices=sorted(SINK_PRESETS), metavar="PRESET",
                       help=f"the authors' sink detector of a model: {', '.join(SINK_PRESETS)} (default: the "
                            "model family's: llava-1.5-7b for LLaVA, none for Qwen as their text labels)")
    group.add_argument("--sink", choices=("attention", "norm", "none"),
                       help="sink detector: attention (mean attention of all heads of --sink-layer, or of "
                            "--sink-heads), norm (massive activations) or none")
    group.add_argument("--sink-heads", metavar="SPEC",
                       help="attention detector: the mean of these heads, LAYER:HEAD,HEAD[;LAYER:...] "
                            "(instead of all heads of --sink-layer)")
    group.add_argument("--sink-layer", type=int, metavar="L",
                       help="layer the sink detector reads (default: 2 for attention, the first "
                            "grounding layer for norm)")
    group.add_argument("--sink-threshold", type=float, metavar="X",
                       help="sink threshold (default: 1e-3 for attention, 20 for norm)")
    group.add_argument("--sink-dims", metavar="DIMS",
                       help="norm detector: massive-activation dims, comma-separated or a preset "
                            "(llama2-7b, llama2-13b); default: all dims")


def sink_spec(args: argparse.Namespace, family_preset: str | None = None):
    """The :class:`~sdrpn.distill.sinks.SinkSpec` of the sink options: ``--sink-preset`` (or the
    family's preset when no sink option is given), else the detector the options describe."""
    from ..distill.sinks import SinkSpec

    detailed = [args.sink, args.sink_layer, args.sink_threshold, args.sink_dims, args.sink_heads]
    if args.sink_preset is not None and any(value is not None for value in detailed):
        raise UserError("--sink-preset sets the whole detector: leave out --sink, --sink-layer, --sink-threshold, "
                        "--sink-dims and --sink-heads, or describe the detector with them instead")
    preset = args.sink_preset or (family_preset if all(value is None for value in detailed) else None)
    if preset is not None:
        return SinkSpec.preset(preset)
    try:
        return SinkSpec.create(args.sink or "attention", args.sink_layer, args.sink_threshold, args.sink_dims,
                               args.sink_heads)
    except ValueError as exc:
        raise UserError(f"--sink: {exc}") from None


def read_data(args: argparse.Namespace):
    """The usable records of ``--data`` (the first ``--max-samples``) and the rejected ones; no
    usable record at all is a user error. Shared with ``sdrpn heads``."""
    from ..distill.records import read_records

    try:
        records, issues = read_records(args.data)
    except OSError as exc:
        raise UserError(f"--data {args.data}: {exc}") from None
    if args.max_samples is not None:
        records = records[:args.max_samples]
    if not records:
        raise UserError(f"--data {args.data}: no usable record ({len(issues)} rejected; first: "
                        f"{issues[0] if issues else 'the file is empty'})")
    return records, issues


def _options(args: argparse.Namespace, family):
    """The label options of the arguments, with ``family`` (the model's adapter class) filling in
    the heads, rules and sink detector not given."""
    from ..distill.heads import HeadSelection
    from ..distill.label_job import LabelOptions

    heads = args.heads or family.default_label_heads
    if heads is None:
        raise _heads_needed(family)
    try:
        heads = HeadSelection.parse(heads)
    except ValueError as exc:
        raise UserError(f"--heads: {exc}") from None
    sink = sink_spec(args, family.default_sink_preset)
    if (args.tau_fg or 0) < 0 or (args.tau_bg or 0) < 0:
        raise UserError(f"--tau-fg and --tau-bg must not be negative, got {args.tau_fg} and {args.tau_bg}")
    if args.max_box_frac is not None and not 0 < args.max_box_frac <= 1:
        raise UserError(f"--max-box-frac must be in (0, 1], got {args.max_box_frac}")
    rules = LABEL_RULE_PRESETS[args.rules or family.default_label_rules]
    changed = {name: value for name, value in (("tau_fg", args.tau_fg), ("tau_bg", args.tau_bg),
                                                ("max_box_frac", args.max_box_frac), ("min_peak", args.min_peak),
                                                ("blur_box", args.blur_box)) if value is not None}
    return LabelOptions(heads=heads, sink=sink, rules=replace(rules, **changed),
                        question_rewrite=args.question_rewrite, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, shard_size=args.shard_size, flush_seconds=args.flush_seconds,
                        prompt=args.prompt)


def _family_head_presets(family) -> list[str]:
    """The grounding-head presets of ``family``'s models (named after its models' RPN depth presets)."""
    models = tuple(family.rpn_depth_presets.values())
    return [name for name in HEAD_PRESETS if models and name.startswith(models)]


def _heads_needed(family) -> UserError:
    presets = _family_head_presets(family)
    if not presets:
        return UserError(f"--heads is needed for a {family.family} model, and none were released for it: run "
                         f"`sdrpn heads` on calibration data first and pass the file it writes (--heads heads.json)")
    return UserError(f"--heads is needed for a {family.family} model: its grounding heads differ by size and image "
                     f"kind; use a preset ({', '.join(presets)}) or a file written by `sdrpn heads`")


def model_family(args: argparse.Namespace):
    """The adapter class of ``--model``'s checkpoint, from its config.json (before loading it)."""
    from ..models import adapter_class
    from .common import checkpoint_config

    try:
        return adapter_class(checkpoint_config(args.model).get("model_type"))
    except TypeError as exc:
        raise UserError(f"--model {args.model}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..distill.label_job import Labeller, run_label_job, run_settings_for
    from ..issues import report_issue
    from .common import load_model, resolve_device

    options = _options(args, model_family(args))
    records, issues = read_data(args)
    with distributed.process_group("gloo") as context:
        if context.is_main:
            for issue in issues:
                report_issue("label", issue)
        args.device = str(distributed.device_for(context, resolve_device(args.device)))
        model, processor = load_model(args)
        labeller = Labeller(model, processor, options)
        summary = run_label_job(labeller, records, args.image_root, args.out,
                                run_settings_for(args.model, labeller.adapter, args.data, args.image_root, args.max_samples),
                                parse_issues=issues, progress=not args.no_progress)
        if context.is_main:
            print(summary.report())
            print(f"wrote {args.out}/index.jsonl")
    return 0
