"""``sdrpn show``: one picture of where the model looked, with the answers with and without SD-RPN."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import (add_max_regions_argument, add_model_arguments, add_prompt_argument, add_threshold_argument,
                     existing_file, positive_int)

HELP = "Draw where the model looked: RoI heatmap, mask, boxes, zoomed crop and both answers."

EPILOG = """\
  sdrpn show --model ckpt/llava-1.5-7b-hf --rpn rpn/llava-1.5-7b --image street.jpg \\
      --question "What is the name of the store?" --out roi.png
  sdrpn show --model ckpt/llava-1.5-7b-hf --rpn rpn/llava-1.5-7b --image page.png \\
      --question "What is the invoice number?" --threshold 0.1 --size 768 --out invoice.png

Left: the image lit by the RPN's RoI probabilities over the model's view (dimmed where they are
low, never tinted, so the shapes keep their colours), heat-coloured isolines of them, the contour of
the thresholded mask and the RoI boxes; the caption counts the mask's regions and the boxes kept of
them. Right: the zoomed crop the model saw in stage 2 (with masked upscaling, the parts whose tokens
were not kept are dimmed). Below: the question and both answers. Both answer the same prompt, in the conversation template the RPN was trained with (--prompt
overrides it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpn="required")
    query = parser.add_argument_group("picture")
    query.add_argument("--image", required=True, type=existing_file, metavar="FILE", help="the image")
    query.add_argument("--question", required=True, help="the question about the image")
    query.add_argument("--out", required=True, type=Path, metavar="PNG", help="where to write the picture")
    add_threshold_argument(query, "the RPN's default, 0.15 for LLaVA-1.5, 0.25 for Qwen2.5-VL")
    add_prompt_argument(query, "the one the RPN was trained with")
    add_max_regions_argument(query)
    query.add_argument("--size", type=positive_int, default=512, metavar="PX",
                       help="side of each of the two panels in pixels (default 512)")
    query.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                       help="answer length limit (default 128)")


def run(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: the picture is written as PNG; name it *.png")
    if args.size < 64:
        raise UserError(f"--size {args.size}: panels need at least 64 pixels")
    question = args.question.strip()
    if not question:
        raise UserError("--question is empty")

    from ..eval.datasets import open_image
    from ..eval.predictors import EnginePredictor, build_engine, resolve_threshold
    from ..viz import render, roi_figure
    from .common import load_model, load_rpn

    image = open_image(args.image)
    model, processor = load_model(args)
    rpn = load_rpn(args, model)
    engine = build_engine(model, processor, rpn, max_regions=args.max_regions, prompt=args.prompt)
    with_rpn = EnginePredictor(engine, "sdrpn", threshold=resolve_threshold(rpn, args.threshold),
                               max_new_tokens=args.max_new_tokens)
    without = EnginePredictor(engine, "baseline", max_new_tokens=args.max_new_tokens)
    answer = with_rpn.run([image], [question])
    prediction = answer.predictions[0]
    plain = without.run([image], [question]).predictions[0]
    figure = roi_figure(engine, image, question, prediction, plain, with_rpn.settings["threshold"], answer.latency_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(figure, size=args.size).save(args.out)
    print(f"with SD-RPN: {prediction.shown_text}")
    print(f"without:     {plain.shown_text}")
    print(f"wrote {args.out}")
    return 0
