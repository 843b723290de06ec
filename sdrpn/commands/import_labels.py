"""``sdrpn import-labels``: the SD-RPN authors' pseudo-label pickle as label shards for ``sdrpn train``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import existing_dir, existing_file, positive_int

HELP = "Turn the SD-RPN authors' pseudo-label pickle into label shards for sdrpn train."
EPILOG = """\
  sdrpn import-labels --pickle data/llava_v1_5_7b_pseudo_roi_release.pkl --image-root data --out labels-authors
  sdrpn train --model ckpt/llava-1.5-7b-hf --labels labels-authors --out rpn-reproduced

--pickle is their released pseudo-label file: a list of records with question_id, image, prompt,
text, sink_attn and grounding_attn_o2i (576 attention values each). It is read without running code
from it: only plain data and numpy arrays are admitted, anything else is refused by name.
Labels follow their training's rule: sinks where sink_attn >= 1e-3, foreground above 0.2 and
background below 0.1 of the peak, a sample ignored when its foreground box covers half the grid.
--image-root is the folder their image paths start from (the one holding gqa/ and ocr_vqa/); with
it, every image is checked to exist and sdrpn train finds them. Unusable records are reported,
skipped and listed in issues.jsonl. Rerun the same command to resume; another pickle, --grid or
--image-root into the same --out is refused.
Output: shard-*.safetensors (grounding, sink, labels), index.jsonl, issues.jsonl, run.json."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pickle", required=True, type=existing_file, metavar="FILE",
                        help="the authors' pseudo-label pickle (llava_v1_5_7b_pseudo_roi_release.pkl)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output directory (created; reused to resume)")
    parser.add_argument("--image-root", type=existing_dir, metavar="DIR",
                        help="folder the records' image paths are relative to; recorded for sdrpn train")
    parser.add_argument("--grid", type=positive_int, default=24, metavar="N",
                        help="image tokens per side of the maps (default 24: LLaVA-1.5's 576 tokens)")
    parser.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard file (default 256)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..authors.label_import import import_labels
    from ..authors.safe_pickle import RefusedPickle

    try:
        summary = import_labels(args.pickle, args.out, (args.grid, args.grid), args.image_root, args.shard_size,
                                progress=not args.no_progress)
    except RefusedPickle as exc:
        raise UserError(f"--pickle: {exc}") from None
    except OSError as exc:  # unreadable pickle, or an output directory that cannot be written
        raise UserError(str(exc)) from None
    print(summary.report())
    print(f"wrote {args.out}/index.jsonl")
    return 0
