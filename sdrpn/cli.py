"""The ``sdrpn`` command.

Each subcommand lives in ``sdrpn/commands/<name>.py`` (a hyphen in the name is an underscore in
the file's) and provides ``HELP`` (one line), ``EPILOG`` (examples for ``--help``),
``add_arguments(parser)`` and ``run(args) -> int``. Only the module of
the subcommand being run is imported, so ``sdrpn --help`` answers at once; the names and one-line
helps of all subcommands are kept here for that listing.

A :class:`sdrpn.errors.UserError` (or a bad option) ends the command with a one-line message and
exit status 2; ``--debug`` adds the traceback. Ctrl-C ends it with status 130, and with what was
kept when the command says so (:class:`sdrpn.errors.Interrupted`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
from typing import NoReturn, Sequence

from .errors import Interrupted, UserError
from .version import __version__

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130

# name -> one-line help. Keep each line equal to the module's HELP (a test checks it).
SUBCOMMANDS = {
    "demo": "Answer a few test questions with the shipped tiny model, with and without SD-RPN.",
    "generate": "Answer a question about an image; print the answer, RoI boxes, visual tokens, latency.",
    "show": "Draw where the model looked: RoI heatmap, mask, boxes, zoomed crop and both answers.",
    "label": "Write self-distilled RoI pseudo-labels from the model's own attention.",
    "heads": "Rank (layer, head) pairs by how well their attention grounds the answer.",
    "train": "Train an RPN on pseudo-labels and save it with RPN.save_pretrained.",
    "eval": "Evaluate methods on a benchmark: metric, samples/s, visual tokens; plot the trade-off.",
    "bench": "Run the speed benchmarks (kernels, end-to-end generation, distillation).",
    "testbed": "Generate the synthetic fine-grained VQA testbed and train its tiny LLaVA.",
    "convert": "Convert an RPN released by the SD-RPN authors (LLaVA-1.5, Qwen2.5-VL) into an RPN directory for its model.",
    "import-labels": "Turn the SD-RPN authors' pseudo-label pickle into label shards for sdrpn train.",
}

DESCRIPTION = """\
SD-RPN: self-distilled region proposal networks that let a multimodal LLM look closer.
Everything runs on local checkpoints (--model is a Hugging Face checkpoint directory); nothing is
downloaded."""

EPILOG = """\
typical session:
  sdrpn label --model ckpt/llava-1.5-7b --data train.jsonl --image-root images --out labels
  sdrpn train --model ckpt/llava-1.5-7b --labels labels --out rpn
  sdrpn generate --model ckpt/llava-1.5-7b --rpn rpn --image photo.jpg --question "What is written on the sign?"
  sdrpn eval --model ckpt/llava-1.5-7b --rpn rpn --benchmark textvqa --data data/textvqa --out results.json

Run `sdrpn <command> --help` for a command's options and examples."""


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line on one line (argparse prints the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_module(name: str) -> str:
    """The module of subcommand ``name``."""
    return f"sdrpn.commands.{name.replace('-', '_')}"


def available_subcommands() -> dict[str, str]:
    """The subcommands whose module is installed, with their one-line help."""
    return {name: text for name, text in SUBCOMMANDS.items()
            if importlib.util.find_spec(command_module(name)) is not None}


def _requested(argv: Sequence[str], names) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in names else None
    return None


def build_parser(argv: Sequence[str] = ()) -> tuple[argparse.ArgumentParser, object | None]:
    """The parser, fully built only for the subcommand named in ``argv``, and that module."""
    parser = _Parser(prog="sdrpn", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdrpn {__version__}")
    commands = available_subcommands()
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands",
                                       parser_class=_Parser)
    requested = _requested(argv, commands)
    module = None
    for name, one_line in commands.items():
        if name != requested:
            subparsers.add_parser(name, help=one_line)
            continue
        module = importlib.import_module(command_module(name))
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP,
                                    epilog=f"examples:\n{module.EPILOG}",
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.add_argument("--debug", action="store_true",
                         help="show the full traceback of an error instead of a one-line message")
    return parser, module


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sdrpn`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:  # no command given
        parser.print_help()
        return USER_ERROR_EXIT
    prog = f"sdrpn {args.command}"
    try:
        return int(module.run(args) or 0)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt as interruption:
        kept = f"; {interruption}" if isinstance(interruption, Interrupted) else ""
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (MemoryError, RuntimeError) as error:
        # torch.OutOfMemoryError (device memory) is a RuntimeError; anything else is a bug and
        # keeps its traceback.
        if not isinstance(error, MemoryError) and type(error).__name__ != "OutOfMemoryError":
            raise
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: out of memory ({_one_line(error)[:200]}); "
              f"try a smaller --batch-size or a 16-bit --dtype", file=sys.stderr)
        return 1
