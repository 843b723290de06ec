"""``sdrpn testbed``: the synthetic fine-grained VQA data and the tiny LLaVA trained on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..testbed.loop import LoopOptions
from .common import existing_dir, non_negative_int, positive_int, probability, warn_if_cpu_bfloat16_is_emulated

HELP = "Generate the synthetic fine-grained VQA testbed and train its tiny LLaVA."
EPILOG = """\
  sdrpn testbed generate --out data/synthetic --seed 0
  sdrpn testbed train-model --data data/synthetic --out ckpt/tiny-llava --seed 0
  sdrpn testbed train-model --data data/synthetic --out ckpt/tiny-llava --steps 200 --threads 2
  sdrpn testbed run --data data/synthetic --work runs/testbed
  sdrpn testbed run --data data/synthetic --work runs/quick --label-samples 600 --test-samples 100 --no-ablation

generate writes train/val/test JSONL files (the generic format of `sdrpn eval --benchmark jsonl`)
and PNG images; the same seed gives the same files. train-model trains the tiny LLaVA from scratch
on the train split and saves it with save_pretrained (weights in fp16) together with its processor
and training.json; rerun the same command to resume from the checkpoint in --out. run takes the model
(default: the shipped one) through heads -> label -> train -> eval with the public commands, measures
localisation IoU, data efficiency and the ablation, and writes <work>/testbed.json; rerun it to resume."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The actions' parsers are of the command's own class, so bad options stay one-line errors.
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True, parser_class=type(parser))

    generate = actions.add_parser("generate", help="write the synthetic train/val/test splits",
                                  description="Write the synthetic train/val/test splits (JSONL + PNG).")
    generate.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    generate.add_argument("--train", type=non_negative_int, default=20000, help="train questions (default 20000)")
    generate.add_argument("--val", type=non_negative_int, default=500, help="validation questions (default 500)")
    generate.add_argument("--test", type=non_negative_int, default=1000, help="test questions (default 1000)")
    generate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_design_argument(generate, "what the images and questions look like")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = actions.add_parser("train-model", help="train the tiny LLaVA from scratch on the train split",
                               description="Train the tiny LLaVA from scratch on a generated data set.")
    train.add_argument("--data", required=True, type=existing_dir, metavar="DIR",
                       help="a directory written by `sdrpn testbed generate`")
    train.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="model directory (save_pretrained) and checkpoint")
    train.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation (default 0)")
    _add_design_argument(train, "the recipe of the data set's design; the options below change it")
    train.add_argument("--steps", type=positive_int, help="optimizer steps (default: the recipe's)")
    train.add_argument("--batch-size", type=positive_int, help="questions per step (default: the recipe's)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    train.add_argument("--eval-every", type=positive_int, help="steps between validation runs")
    train.add_argument("--refine-steps", type=non_negative_int, metavar="N",
                       help="steps after the main schedule at a constant lr with coarse questions in single "
                            "views; 0 skips them (default: the recipe's)")
    train.add_argument("--vision-steps", type=non_negative_int, metavar="N",
                       help="steps of the vision warm start before the language model trains; 0 skips it "
                            "(default: the recipe's)")
    train.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                       help="autocast precision of the forward and backward passes; weights and optimizer stay "
                            "fp32 (default bf16, the recipe's). CPUs without AVX512-BF16 or AMX emulate bf16 "
                            "about 20x slower: use fp32 there (the model then differs from a bf16 run)")
    train.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's choice)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    loop = actions.add_parser("run", help="the self-distillation loop on the tiny model, measured end to end",
                              description="heads -> label -> train -> eval on a generated data set, with "
                                          "localisation IoU, data efficiency and the ablation.")
    loop.add_argument("--data", required=True, type=existing_dir, metavar="DIR",
                      help="a directory written by `sdrpn testbed generate`")
    loop.add_argument("--work", required=True, type=Path, metavar="DIR",
                      help="where every step's output goes (reused to resume)")
    loop.add_argument("--model", type=existing_dir, metavar="DIR", help="the tiny LLaVA (default: the shipped one)")
    defaults = LoopOptions()
    loop.add_argument("--label-samples", type=positive_int, default=defaults.label_samples,
                      help=f"train questions to label (default {defaults.label_samples})")
    loop.add_argument("--test-samples", type=positive_int, default=defaults.test_samples,
                      help=f"test questions to evaluate (default {defaults.test_samples})")
    loop.add_argument("--heads", metavar="SPEC", help="grounding heads LAYER:HEAD,... (default: run sdrpn heads)")
    loop.add_argument("--heads-layers", metavar="RANGE",
                      help="layers sdrpn heads scores: 1-4, 2 or 1,3 (default: its own, the middle third)")
    loop.add_argument("--sink-layer", type=int, default=defaults.sink_layer, metavar="L",
                      help=f"layer the attention-sink detector reads (default {defaults.sink_layer})")
    loop.add_argument("--sink-threshold", type=float, default=defaults.sink_threshold,
                      help=f"mean attention of a sink token at --sink-layer (default {defaults.sink_threshold})")
    loop.add_argument("--rpn-epochs", type=positive_int, default=defaults.rpn_epochs,
                      help=f"RPN training epochs (default {defaults.rpn_epochs})")
    loop.add_argument("--rpn-lr", type=float, default=defaults.rpn_lr,
                      help=f"RPN learning rate (default {defaults.rpn_lr})")
    loop.add_argument("--rpn-batch-size", type=positive_int, default=defaults.rpn_batch_size,
                      help=f"RPN training batch (default {defaults.rpn_batch_size})")
    loop.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                      help=f"questions per batch in labelling and evaluation (default {defaults.batch_size})")
    loop.add_argument("--threshold", type=probability, metavar="T", default=defaults.threshold,
                      help=f"RoI threshold saved with every RPN and used by the evaluations (default "
                           f"{defaults.threshold:g}, the authors' for benchmarks of small details; one more row "
                           f"uses the threshold sdrpn train calibrates on held-out labels)")
    loop.add_argument("--no-data-efficiency", action="store_true", help="skip the 10%% / 30%% label-set runs")
    loop.add_argument("--no-ablation", action="store_true", help="skip the ablation rows")
    loop.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's choice)")
    loop.add_argument("--no-progress", action="store_true", help="no progress bars")
    for sub in (generate, train, loop):
        # Accepted after the action too; SUPPRESS keeps a --debug given before it.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_design_argument(parser: argparse.ArgumentParser, what: str) -> None:
    from ..data.synthetic import DEFAULT_DESIGN, DESIGNS

    parser.add_argument("--design", choices=tuple(DESIGNS), default=DEFAULT_DESIGN,
                        help=f"{what} (default {DEFAULT_DESIGN}: every shape holds a number; one-detail, the shipped "
                             f"model's: only the named shape holds one)")


def run(args: argparse.Namespace) -> int:
    if args.action == "generate":
        return _generate(args)
    if args.action == "run":
        return _run_loop(args)
    return _train_model(args)


def _generate(args: argparse.Namespace) -> int:
    from ..data.synthetic import DESIGNS, generate_dataset

    manifest = generate_dataset(args.out, args.train, args.val, args.test, seed=args.seed,
                                config=DESIGNS[args.design], progress=not args.no_progress)
    splits = ", ".join(f"{count} {split}" for split, count in manifest["splits"].items())
    print(f"{args.out}: {splits} questions (seed {manifest['seed']})")
    return 0


def _train_model(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..testbed.train_model import DESIGN_RECIPES, train_model

    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    changes = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "eval_every": args.eval_every, "vision_steps": args.vision_steps, "refine_steps": args.refine_steps,
               "bf16": args.precision == "bf16"}
    options = dataclasses.replace(DESIGN_RECIPES[args.design], **{k: v for k, v in changes.items() if v is not None})
    if options.bf16:  # the tiny model trains on the CPU
        warn_if_cpu_bfloat16_is_emulated("--precision bf16", "--precision fp32")
    summary = train_model(args.data, args.out, options, progress=not args.no_progress)
    final = summary["final"] or {}
    accuracy = ", ".join(f"{name} {value:.1%}" for name, value in final.items())
    print(f"{args.out}: trained {options.total_steps} steps in {summary['train_seconds'] / 60:.1f} min; "
          f"validation accuracy: {accuracy}")
    return 0


def _run_loop(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..testbed.loop import format_report, run_loop
    from ..testbed.shipped import SHIPPED_MODEL

    if args.rpn_lr <= 0:
        raise UserError(f"--rpn-lr must be positive, got {args.rpn_lr}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        if not SHIPPED_MODEL.is_dir():
            raise UserError(f"the shipped tiny model is missing ({SHIPPED_MODEL}); pass --model")
        model = SHIPPED_MODEL
    options = dataclasses.replace(
        LoopOptions(), label_samples=args.label_samples, test_samples=args.test_samples, heads=args.heads,
        heads_layers=args.heads_layers,
        sink_layer=args.sink_layer, sink_threshold=args.sink_threshold, rpn_epochs=args.rpn_epochs, rpn_lr=args.rpn_lr,
        rpn_batch_size=args.rpn_batch_size, batch_size=args.batch_size, threshold=args.threshold,
        ablation=not args.no_ablation, **({"fractions": ()} if args.no_data_efficiency else {}))
    summary = run_loop(model, args.data, args.work, options, progress=not args.no_progress)
    print(format_report(summary))
    print(f"wrote {args.work / 'testbed.json'}")
    return 0
