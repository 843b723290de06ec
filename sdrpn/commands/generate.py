"""``sdrpn generate``: answer one question about one image with a chosen method."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError
from .common import (RPN_FREE_METHODS_NOTE, add_max_regions_argument, add_model_arguments, add_prompt_argument,
                     add_threshold_argument, existing_file, format_box, positive_int)

HELP = "Answer a question about an image; print the answer, RoI boxes, visual tokens, latency."

EPILOG = """\
  sdrpn generate --model ckpt/llava-1.5-7b-hf --rpn rpn/llava-1.5-7b --image street.jpg \\
      --question "What is the name of the store?"
  sdrpn generate --model ckpt/llava-1.5-7b-hf --rpn rpn/llava-1.5-7b --image page.png \\
      --question "What is the invoice number?" --threshold 0.1 --json
  sdrpn generate --model ckpt/llava-1.5-7b-hf --image street.jpg \\
      --question "What is the name of the store?" --method baseline
  sdrpn generate --model ckpt/tiny --rpn rpn/tiny --image page.png --question "What is the total?" \\
      --threshold calibrated

The prompt follows the conversation template the RPN was trained with (--prompt overrides it);
without --rpn (baseline, res-scaling, vicrop), the model family's (vicuna_v1 for LLaVA, the
checkpoint's own chat template for Qwen2.5-VL).
RoI boxes are [x0, y0, x1, y1) in pixels of the source image. The latency is the wall time of the
generation call (the first call of a process includes one-time setup)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpn="optional", rpn_note=RPN_FREE_METHODS_NOTE)
    query = parser.add_argument_group("question")
    query.add_argument("--image", required=True, type=existing_file, metavar="FILE", help="the image")
    query.add_argument("--question", required=True, help="the question about the image")
    query.add_argument("--method", default="sdrpn",
                       help="sdrpn (default), baseline, sdrpn-reference, res-scaling or vicrop")
    add_threshold_argument(query, "the RPN's default, 0.15 for LLaVA-1.5, 0.25 for Qwen2.5-VL")
    add_prompt_argument(query, "the one the RPN was trained with, else the model family's")
    add_max_regions_argument(query)
    query.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                       help="answer length limit (default 128)")
    query.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from ..eval.datasets import open_image
    from ..eval.predictors import EnginePredictor, build_engine, check_methods, resolve_threshold
    from .common import load_model, load_rpn

    image = open_image(args.image)
    question = args.question.strip()
    if not question:
        raise UserError("--question is empty")
    check_methods([args.method], has_rpn=args.rpn is not None)
    model, processor = load_model(args)
    rpn = load_rpn(args, model)
    engine = build_engine(model, processor, rpn, max_regions=args.max_regions, prompt=args.prompt)
    threshold = resolve_threshold(rpn, args.threshold) if rpn is not None else None
    predictor = EnginePredictor(engine, args.method, threshold=threshold, max_new_tokens=args.max_new_tokens)
    result = predictor.run([image], [question])
    prediction = result.predictions[0]
    original = result.view_tokens[0] if result.view_tokens else None
    report = {
        "image": str(args.image), "question": question, "method": args.method,
        **{key: value for key, value in predictor.settings.items() if key in ("threshold", "strategy", "max_regions")},
        "answer": prediction.text, "boxes": prediction.boxes, "visual_tokens": prediction.visual_tokens,
        "latency_s": round(result.latency_s, 4),
    }
    if args.json:
        print(json.dumps(report))
        return 0

    print(f"answer: {prediction.shown_text}")
    boxes = "; ".join(format_box(box) for box in prediction.boxes)
    print(f"RoI boxes (source pixels): {boxes or 'none (answered from the original view)'}")
    print(f"visual tokens: {_visual_tokens(prediction, original)}")
    print(f"latency: {result.latency_s:.3f} s ({args.method}"
          + (f", threshold {report['threshold']:g})" if "threshold" in report else ")"))
    return 0


def _visual_tokens(prediction, original: int | None) -> str:
    """The visual token count, split into the original view (``original`` tokens; None: not known)
    and the RoI view where there is one."""
    extra = prediction.visual_tokens - original if original is not None else 0
    if not extra:
        return str(prediction.visual_tokens)
    if prediction.boxes:
        return f"{prediction.visual_tokens} ({original} original + {extra} RoI)"
    return f"{prediction.visual_tokens} (the original view alone has {original})"

