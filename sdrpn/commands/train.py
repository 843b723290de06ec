"""``sdrpn train``: train an RPN on pseudo-labels and save it with ``RPN.save_pretrained``."""

from __future__ import annotations

import argparse

from ..errors import UserError
from .common import add_model_arguments, existing_dir, positive_int, probability, rpn_layer_range

HELP = "Train an RPN on pseudo-labels and save it with RPN.save_pretrained."
EPILOG = """\
  sdrpn train --model ckpt/llava-1.5-7b --labels labels --out rpn
  sdrpn train --model ckpt/llava-1.5-7b --labels labels --out rpn --batch-size 512 --grad-accum 8 \\
      --cache /scratch/features
  torchrun --nproc_per_node 8 -m sdrpn train --model ckpt/llava-1.5-7b --labels labels --out rpn

--labels is the output directory of `sdrpn label`; samples with valid labels are used, a few of them
held out for the RoI metrics (IoU of the predicted mask with the foreground labels, BCE). Rerun the
same command to resume from the last checkpoint in --out (written every --save-every steps).
--batch-size is the global batch: processes x --grad-accum x micro-batch.
--target attention and --keep-sinks are ablations; the held-out metrics still use the 3-valued
labels (recomputed with sinks kept under --keep-sinks), on the same samples for either target.
The RPN records the conversation template of the labels (sdrpn label --prompt), where its image
tokens start and the processor's base view geometry; generate, show, eval and demo use them.
Its default RoI threshold is the authors' for the family (0.15 LLaVA-1.5, 0.25 Qwen; --threshold sets
another). A threshold calibrated on
the held-out samples is saved beside it: of 0.01 .. 0.5, the one whose RoIs (the cells the engine's
second view shows, no RoI where a map's only component is dropped as noise) best overlap the
foreground labels; the other commands use it with --threshold calibrated."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpn="none")
    data = parser.add_argument_group("data")
    data.add_argument("--labels", required=True, type=existing_dir, metavar="DIR", help="output of `sdrpn label`")
    data.add_argument("--image-root", type=existing_dir, metavar="DIR",
                      help="image directory (default: the one `sdrpn label` read)")
    data.add_argument("--out", required=True, metavar="DIR", help="RPN directory (RPN.save_pretrained) and checkpoint")
    data.add_argument("--cache", metavar="DIR",
                      help="keep the frozen layers' outputs here and reuse them in later epochs and runs")

    rpn = parser.add_argument_group("RPN")
    rpn.add_argument("--K", type=int, dest="start_layer",
                     help="first model layer the RPN replaces; layers below run frozen (default: the preset K "
                          "for the model: the authors' 15 for LLaVA-1.5-7B/13B, 16 for Qwen2.5-VL-7B, 21 for 3B; "
                          "for Qwen3-VL, none released, 16 for 2B, 21 for 4B/8B, 37 for 32B at the same relative "
                          "depth; other models need it; 0 .. the model's layers - 1)")
    rpn.add_argument("--T", type=positive_int, dest="num_blocks",
                     help="layers spanned by the RPN: T-1 decoder blocks + the q/k head (default: the preset T "
                          "for the model, 3; K+T at most the model's layers)")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    recipe.add_argument("--batch-size", type=positive_int, default=512, help="global batch (default 512)")
    recipe.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (default 1)")
    recipe.add_argument("--epochs", type=positive_int, default=1, help="passes over the data (default 1)")
    recipe.add_argument("--max-steps", type=positive_int, metavar="N", help="optimizer steps, overriding --epochs")
    recipe.add_argument("--max-samples", type=positive_int, metavar="N",
                        help="train on the first N usable samples only (data-efficiency studies)")
    recipe.add_argument("--warmup", type=float, default=0.03, help="linear warmup fraction (default 0.03)")
    recipe.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1.0)")
    recipe.add_argument("--seed", type=int, default=0, help="data order and held-out split (default 0)")
    recipe.add_argument("--target", choices=("labels", "attention"), default="labels",
                        help="what the RPN fits: the 3-valued labels, or the grounding map over its peak "
                             "on every cell (ablation) (default labels)")
    recipe.add_argument("--keep-sinks", action="store_true",
                        help="do not zero attention-sink tokens: labels recomputed from the grounding (ablation)")
    recipe.add_argument("--threshold", type=probability, metavar="T",
                        help="default RoI threshold saved with the RPN (default: the authors' for the family, 0.15 "
                             "for LLaVA-1.5, 0.25 for Qwen); the "
                             "calibrated one is saved beside it")

    run = parser.add_argument_group("run")
    run.add_argument("--eval-samples", type=int, default=256,
                     help="held-out samples, at most a fifth of the data (default 256)")
    run.add_argument("--eval-every", type=positive_int, metavar="N", help="held-out evaluation every N steps")
    run.add_argument("--save-every", type=positive_int, default=500, help="checkpoint every N steps (default 500)")
    run.add_argument("--log-every", type=positive_int, default=10, help="log line every N steps (default 10)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..distill.label_job import label_geometry
    from ..distill.train import TrainOptions, read_label_set, train_rpn
    from ..models import adapter_for
    from .common import check_rpn_layers, load_model, match_processor_geometry, resolve_device

    if not 0.0 <= args.warmup < 1.0:
        raise UserError(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.lr <= 0 or args.max_grad_norm <= 0:
        raise UserError("--lr and --max-grad-norm must be positive")
    args.start_layer, args.num_blocks = rpn_depth(args)
    options = TrainOptions(start_layer=args.start_layer, num_blocks=args.num_blocks, lr=args.lr,
                           batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
                           max_steps=args.max_steps, max_samples=args.max_samples, warmup=args.warmup, max_grad_norm=args.max_grad_norm,
                           eval_samples=max(args.eval_samples, 0), eval_every=args.eval_every,
                           save_every=args.save_every, log_every=args.log_every, seed=args.seed,
                           target=args.target, keep_sinks=args.keep_sinks, threshold=args.threshold)
    label_set = read_label_set(args.labels, args.image_root)
    if not label_set.samples:
        raise UserError(f"--labels {args.labels}: no sample has valid labels")
    device = resolve_device(args.device)
    with distributed.process_group(device=device) as context:
        args.device = str(distributed.device_for(context, device))
        model, processor = load_model(args)
        check_rpn_layers(args.start_layer, args.num_blocks, adapter_for(model, processor).num_layers)
        geometry = label_geometry(label_set.settings)
        if geometry is not None:  # the label maps are on these views: train on them too
            match_processor_geometry(model, processor, geometry, "the labels were made on")
        labelled_with = label_set.settings.get("model_config")
        if labelled_with is not None and labelled_with != adapter_for(model, processor).config_fingerprint():
            raise UserError(f"--labels {args.labels} were made with another model architecture than --model {args.model}")
        result = train_rpn(model, processor, label_set, args.out, options, cache_dir=args.cache,
                           progress=not args.no_progress)
        if context.is_main:
            print(f"trained {result.history[-1]['step'] if result.history else 'no new'} steps; "
                  f"wrote the RPN to {args.out}")
    return 0


def rpn_depth(args: argparse.Namespace) -> tuple[int, int]:
    """``(K, T)``: the arguments, or where not given the preset depth for ``--model`` (its family
    and decoder layers, read off config.json)."""
    if args.start_layer is not None and args.num_blocks is not None:
        return args.start_layer, args.num_blocks
    import transformers

    from ..distill.heads import RPN_DEPTH_PRESETS
    from .label import model_family

    family = model_family(args)
    try:  # the full config: checkpoints leave out what their class defaults (llava-hf: the 32 layers)
        config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {args.model}: cannot read its config ({exc})") from None
    layers = config.get_text_config(decoder=True).num_hidden_layers
    preset = family.rpn_depth_presets.get(layers)
    if preset is None:  # the suggested pair sits at the authors' Qwen2.5-VL-7B depth, 16 of 28 layers
        raise UserError(f"--model {args.model}: no released RPN depth for a {layers}-layer model of this family; "
                        f"give --K and --T: {rpn_layer_range(layers, relative_depth=16 / 28)}")
    depth = RPN_DEPTH_PRESETS[preset]
    return (depth.start_layer if args.start_layer is None else args.start_layer,
            depth.num_blocks if args.num_blocks is None else args.num_blocks)
