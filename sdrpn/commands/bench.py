"""``sdrpn bench``: run one of the speed benchmarks of ``benchmarks/``.

The benchmark scripts live in the source checkout (``benchmarks/bench_<name>.py``), next to the
committed results they produce; this command finds them beside the installed package (an editable
install, ``pip install -e .``) or in ``$SDRPN_BENCHMARKS_DIR``, and runs the one named with the
remaining arguments, in a fresh Python process of the same interpreter.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

from ..errors import UserError

HELP = "Run the speed benchmarks (kernels, end-to-end generation, distillation)."

EPILOG = """\
  sdrpn bench                                   # list the benchmarks
  sdrpn bench kernels --device cpu --quick      # compiled ops vs their references
  sdrpn bench e2e --arch tiny --methods baseline,sdrpn,sdrpn-reference --json e2e.json
  sdrpn bench distill --json distill.json
  sdrpn bench e2e --help                        # a benchmark's own options

Everything after the benchmark's name is passed to its script (benchmarks/bench_<name>.py).
e2e builds models with random weights, so it forces a RoI (--rois box:0.25 by default; a random RPN
proposes none), and warns when the machine is busy.
The scripts are in the source checkout; set SDRPN_BENCHMARKS_DIR when the package was not
installed from one with `pip install -e .`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="BENCHMARK", help="benchmark to run (omit to list them)")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="arguments of the benchmark script")


def benchmarks_dir() -> Path:
    """The folder holding the benchmark scripts."""
    configured = os.environ.get("SDRPN_BENCHMARKS_DIR")
    if configured:
        folder = Path(configured)
        if not folder.is_dir():
            raise UserError(f"SDRPN_BENCHMARKS_DIR={configured}: no such directory")
        return folder
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not folder.is_dir():
        raise UserError("the benchmark scripts are not installed with the package: run sdrpn bench from a "
                        "source checkout installed with `pip install -e .`, or set SDRPN_BENCHMARKS_DIR")
    return folder


def available() -> dict[str, Path]:
    """Benchmark name -> script, for every ``bench_<name>.py`` of :func:`benchmarks_dir`."""
    return {path.stem.removeprefix("bench_"): path for path in sorted(benchmarks_dir().glob("bench_*.py"))}


def _summary(script: Path) -> str:
    """First line of the script's docstring (read without importing it)."""
    try:
        docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
    except (SyntaxError, UnicodeDecodeError):
        docstring = None
    return docstring.strip().splitlines()[0] if docstring else ""


def run(args: argparse.Namespace) -> int:
    scripts = available()
    if args.name is None:
        if not scripts:
            raise UserError(f"{benchmarks_dir()}: no benchmark scripts (bench_*.py)")
        width = max(map(len, scripts))
        for name, script in scripts.items():
            print(f"{name:{width}s}  {_summary(script)}")
        return 0
    if args.name not in scripts:
        known = ", ".join(scripts) or "none"
        raise UserError(f"unknown benchmark {args.name!r}; available: {known}")
    return subprocess.call([sys.executable, str(scripts[args.name]), *args.args])
