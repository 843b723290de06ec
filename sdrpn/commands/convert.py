"""``sdrpn convert``: the SD-RPN authors' released LLaVA-1.5 RPN as an RPN directory of ours."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import DTYPES, existing_dir

HELP = "Convert the SD-RPN authors' released LLaVA-1.5 RPN into an RPN directory for a llava-hf model."
EPILOG = """\
  sdrpn convert --authors-checkpoint ckpt/llava-v1.5-7b-roi-K15T3-152k-v1bf16Mheads-twiginit-filled \\
      --model ckpt/llava-1.5-7b-hf --out rpn-authors
  sdrpn eval --model ckpt/llava-1.5-7b-hf --rpn rpn-authors --benchmark textvqa --data data/textvqa \\
      --out results/textvqa.json

--authors-checkpoint is their checkpoint in the original LLaVA layout: config.json with enable_twig,
twig_K, twig_T, and model.safetensors, pytorch_model.bin or shards of either with their index.json.
Only the RPN's tensors (model.twig_layers.*, model.twig_norm.weight) and two base tensors are read;
.bin files only through torch.load(weights_only=True). --model is the llava-hf model the RPN will
run on: its sizes, embeddings and layer K-1 must be those the RPN was trained on. The model is
loaded on the CPU in its stored dtype (about 14 GB for a 7B model in float16).
The RPN records the authors' settings: the vicuna_v1 prompt and where its image tokens start,
the pad-to-square base view, RoI threshold 0.15 and the per-benchmark presets."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--authors-checkpoint", required=True, type=existing_dir, metavar="DIR",
                        help="the authors' LLaVA checkpoint holding the RPN (config.json with enable_twig)")
    parser.add_argument("--model", required=True, type=existing_dir, metavar="DIR",
                        help="local llava-hf checkpoint (LlavaForConditionalGeneration and its processor)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="RPN directory to write (RPN.save_pretrained)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), metavar="DTYPE",
                        help="dtype of the saved RPN weights: float32, bfloat16 or float16 (also fp32/bf16/fp16); "
                             "auto (default) keeps the checkpoint's")


def load_llava(path: Path):
    """The llava-hf model at ``path`` on the CPU in its stored dtype, and its processor."""
    import transformers

    if not (path / "config.json").is_file():
        raise UserError(f"--model {path}: not a Hugging Face checkpoint directory (no config.json)")
    transformers.utils.logging.disable_progress_bar()
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype="auto", local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {path}: cannot load the checkpoint ({exc})") from exc
    return model.eval(), processor


def run(args: argparse.Namespace) -> int:
    import torch

    from ..authors.checkpoint import AuthorsCheckpoint, CheckpointError
    from ..authors.rpn_conversion import AUTHORS_IMAGE_START, convert_rpn

    try:  # the checkpoint's config first: a wrong directory fails before the model loads
        checkpoint = AuthorsCheckpoint(args.authors_checkpoint)
    except CheckpointError as exc:
        raise UserError(f"--authors-checkpoint: {exc}") from None
    model, processor = load_llava(args.model)
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    try:
        rpn = convert_rpn(checkpoint, model, processor, dtype)
    except CheckpointError as exc:
        raise UserError(f"--authors-checkpoint: {exc}") from None
    except (TypeError, ValueError) as exc:  # not a LLaVA model, or a processor that does not expand the image
        raise UserError(f"--model {args.model}: {exc}") from None
    rpn.save_pretrained(args.out)
    twig, config = checkpoint.twig, rpn.config
    print(f"converted the RPN at K={twig.start_layer}, T={twig.num_blocks} ({next(rpn.parameters()).dtype}); "
          f"prompt {config['prompt']['name']}, image tokens from index {config['image_start']} (their model "
          f"assumes {AUTHORS_IMAGE_START}), geometry {config['geometry']}, threshold {rpn.threshold}")
    print(f"wrote {args.out}")
    return 0
