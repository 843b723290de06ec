"""``sdrpn convert``: an RPN released by the SD-RPN authors (LLaVA-1.5, Qwen2.5-VL) as an RPN directory of ours."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import DTYPES, existing_dir

# Must equal sdrpn/cli.py's SUBCOMMANDS["convert"] (a test checks it).
HELP = "Convert an RPN released by the SD-RPN authors (LLaVA-1.5, Qwen2.5-VL) into an RPN directory for its model."
EPILOG = """\
  sdrpn convert --authors-checkpoint ckpt/llava-v1.5-7b-roi-K15T3-152k-v1bf16Mheads-twiginit-filled \\
      --model ckpt/llava-1.5-7b-hf --out rpn-authors
  sdrpn convert --authors-checkpoint ckpt/qwen2_5vl-7b-roi-K16T3-152k-v1bf16Mheads-twiginit-filled \\
      --model ckpt/Qwen2.5-VL-7B-Instruct --out rpn-authors-qwen
  sdrpn eval --model ckpt/llava-1.5-7b-hf --rpn rpn-authors --benchmark textvqa --data data/textvqa \\
      --out results/textvqa.json

--authors-checkpoint is their checkpoint with the RPN: config.json with enable_twig, twig_K, twig_T
and model_type (llava_llama: their LLaVA-1.5 release; qwen2_5_vl: their Qwen2.5-VL 3B/7B release), and
model.safetensors, pytorch_model.bin or shards of either with their index.json. Only the RPN's tensors
(model.twig_layers.*, and model.twig_norm.weight for LLaVA) and two base tensors are read; .bin files
only through torch.load(weights_only=True). --model is the model the RPN will run on (a llava-hf
LLaVA-1.5 for their LLaVA release, Qwen2.5-VL-3B/7B-Instruct for theirs): its sizes, embeddings and
layer K-1 must be those the RPN was trained on. The model is loaded on the CPU in its stored dtype
(about 14 GB for a 7B model in float16).
The RPN records the settings of their inference. LLaVA-1.5: the vicuna_v1 prompt and where its
image tokens start, the pad-to-square base view, RoI threshold 0.15 and the per-benchmark presets.
Qwen2.5-VL: the processor's chat template (and, when the processor loads, where its image tokens
start), the processor's own aspect-keeping views, RoI threshold 0.25 (fixed in their model)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--authors-checkpoint", required=True, type=existing_dir, metavar="DIR",
                        help="the authors' checkpoint holding the RPN (config.json with enable_twig)")
    parser.add_argument("--model", required=True, type=existing_dir, metavar="DIR",
                        help="local checkpoint of the model the RPN was trained on (llava-hf LLaVA-1.5 or "
                             "Qwen2.5-VL, with its processor)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="RPN directory to write (RPN.save_pretrained)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), metavar="DTYPE",
                        help="dtype of the saved RPN weights: float32, bfloat16 or float16 (also fp32/bf16/fp16); "
                             "auto (default) keeps the checkpoint's")


def load_model(path: Path):
    """The model at ``path`` on the CPU in its stored dtype."""
    import transformers

    if not (path / "config.json").is_file():
        raise UserError(f"--model {path}: not a Hugging Face checkpoint directory (no config.json)")
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype="auto", local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {path}: cannot load the checkpoint ({exc})") from exc
    return model.eval()


def load_processor(path: Path, required: bool):
    """The processor at ``path``; where it is not ``required``, None with the reason when it does not load."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True), None
    except (OSError, ValueError, KeyError, ImportError, TypeError) as exc:
        if required:
            raise UserError(f"--model {path}: cannot load the processor ({exc})") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, first


def run(args: argparse.Namespace) -> int:
    import torch

    from ..authors.checkpoint import AuthorsCheckpoint, CheckpointError
    from ..authors.rpn_conversion import check_model, convert_rpn

    try:  # the checkpoint's config first: a wrong directory fails before the model loads
        checkpoint = AuthorsCheckpoint(args.authors_checkpoint)
    except CheckpointError as exc:
        raise UserError(f"--authors-checkpoint: {exc}") from None
    layout = checkpoint.layout
    model = load_model(args.model)
    try:  # the model's family before its processor: a checkpoint for another family is named as such
        check_model(checkpoint, model)
    except CheckpointError as exc:
        raise UserError(f"--authors-checkpoint: {exc}") from None
    except TypeError as exc:  # a model of no supported family
        raise UserError(f"--model {args.model}: {exc}") from None
    processor, no_processor = load_processor(args.model, layout.needs_processor)
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    try:
        rpn = convert_rpn(checkpoint, model, processor, dtype)
    except CheckpointError as exc:
        raise UserError(f"--authors-checkpoint: {exc}") from None
    except (TypeError, ValueError) as exc:  # a processor that does not expand the image
        raise UserError(f"--model {args.model}: {exc}") from None
    rpn.save_pretrained(args.out)
    twig, config = checkpoint.twig, rpn.config
    if config["image_start"] is None:
        start = f"image start not recorded (no processor: {no_processor})"
    else:
        start = f"image tokens from index {config['image_start']}"
    theirs = (f"their model assumes {layout.image_start}" if layout.image_start is not None
              else "their model finds them in the prompt")
    print(f"converted the authors' {layout.name} RPN at K={twig.start_layer}, T={twig.num_blocks} "
          f"({next(rpn.parameters()).dtype}); prompt {config['prompt']['name']}, {start} ({theirs}), "
          f"geometry {config['geometry']}, threshold {rpn.threshold}")
    print(f"wrote {args.out}")
    return 0
