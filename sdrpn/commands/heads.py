"""``sdrpn heads``: rank (layer, head) pairs by how well their attention grounds the answer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .common import add_model_arguments, add_prompt_argument, existing_dir, existing_file, positive_int, ratio
from .label import add_sink_arguments, model_family, read_data, sink_spec

HELP = "Rank (layer, head) pairs by how well their attention grounds the answer."
EPILOG = """\
  sdrpn heads --model ckpt/llava-1.5-7b --data calibration.jsonl --image-root images --layers 8-20 --top 3
  sdrpn label --model ckpt/llava-1.5-7b --data train.json --image-root data --out labels --heads heads.json

Each head is scored over the calibration answers by image share x specificity: the Jensen-Shannon
divergence of its answer-to-image maps across questions (sink tokens removed), high only for a head
that is concentrated and looks at a different place for every question; see sdrpn.distill.heads.
Fewer than 32 usable records draw a warning; when every head scores 0 nothing is selected.
Records that cannot be used are reported with file, line and reason, skipped and counted.
The top heads (those within --min-score-ratio of the best) are written to --out (default
heads.json), which `sdrpn label --heads FILE` reads; it records the conversation template (--prompt)
the heads were scored with, which the labels should use too.
LLaVA-1.5-7B preset (the authors' choice): layer 14, heads 13, 24, 26 (--heads llava-1.5-7b)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpn="none")
    data = parser.add_argument_group("calibration data")
    data.add_argument("--data", required=True, type=existing_file, metavar="FILE",
                      help="LLaVA instruction JSON/JSONL or plain JSONL questions (as for sdrpn label)")
    data.add_argument("--image-root", required=True, type=existing_dir, metavar="DIR",
                      help="directory the records' image paths are relative to")
    data.add_argument("--max-samples", type=positive_int, default=64, metavar="N",
                      help="calibration samples: the first N usable records (default 64)")
    add_prompt_argument(data, "the model family's, vicuna_v1 for LLaVA")
    search = parser.add_argument_group("search")
    search.add_argument("--layers", metavar="RANGE",
                        help="layers to score: 8-20, 14 or 8,10,12 (default: the middle third of the model)")
    search.add_argument("--top", type=positive_int, default=3, help="heads to select, at most (default 3)")
    search.add_argument("--min-score-ratio", type=ratio, default=0.5, metavar="R",
                        help="leave out heads of the top ones that score under R x the best: the labels "
                             "average the chosen maps, and a weak head blurs them (default 0.5; 0 keeps --top)")
    search.add_argument("--out", default="heads.json", metavar="FILE",
                        help="where to write the selection (default heads.json)")
    search.add_argument("--show", type=positive_int, default=20, metavar="N", help="table rows to print (default 20)")
    add_sink_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch (default 8)")
    run.add_argument("--max-new-tokens", type=positive_int, default=128, help="longest answer (default 128)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..distill.heads import calibrate_heads, format_table, parse_layer_range
    from ..issues import issues_summary, report_issue
    from ..models import adapter_for
    from ..prompts import template_for
    from .common import load_model

    sink = sink_spec(args, model_family(args).default_sink_preset)
    records, issues = read_data(args)
    for issue in issues:
        report_issue("heads", issue)

    model, processor = load_model(args)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    try:
        layers = (parse_layer_range(args.layers, num_layers) if args.layers
                  else list(range(num_layers // 3, max(2 * num_layers // 3, num_layers // 3 + 1))))
    except ValueError as exc:
        raise UserError(f"--layers: {exc}") from None
    template = template_for(args.prompt, adapter_for(model, processor))
    scorer, skipped = calibrate_heads(model, processor, records, args.image_root, layers, sink, args.batch_size,
                                      args.max_new_tokens, progress=not args.no_progress, prompt=template)
    skipped_summary = issues_summary([*issues, *skipped])
    try:
        selection = scorer.select(args.top, args.min_score_ratio)
    except ValueError as exc:
        raise UserError(f"--data {args.data}: {exc}" + (f" ({skipped_summary})" if skipped_summary else "")) from None
    table = scorer.table()
    print(format_table(table, selection, args.show))
    print(f"scored {len(layers)} layers x {scorer.num_heads} heads over {scorer.samples} samples")
    if skipped_summary:
        print(f"{skipped_summary} (each reported above)")
    _warn_if_few(scorer.samples)
    selection.save(Path(args.out), table, prompt=template)
    print(f"selected {selection}; wrote {args.out} (use: sdrpn label --heads {args.out})")
    return 0


def _warn_if_few(samples: int) -> None:
    """The ranking of a few samples is mostly noise: say so beside the selection."""
    from ..distill.heads import RECOMMENDED_SAMPLES

    if samples < RECOMMENDED_SAMPLES:
        print(f"sdrpn heads: warning: only {samples} usable calibration samples were scored; below "
              f"{RECOMMENDED_SAMPLES} the ranking is mostly noise (raise --max-samples, or fix the skipped "
              f"records)", file=sys.stderr)
