"""Write an lmms-eval task for a JSONL question file of ``sdrpn eval --benchmark jsonl``.

    python -m sdrpn.integrations.lmms_task --data data/synthetic --split test --out tasks/synthetic
    python -m lmms_eval --model sdrpn --model_args pretrained=ckpt/tiny,rpn=rpn \\
        --include_path tasks/synthetic --tasks sdrpn_jsonl --output_path out --log_samples

It writes ``<task>.yaml`` (``dataset_path: json`` over the file, by its absolute path) and
``<task>_hooks.py``, whose :class:`~sdrpn.integrations.jsonl_task.JsonlTask` opens each question's
image from its path and prompts and scores it as ``sdrpn eval`` does. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .jsonl_task import METRIC_KEYS

__all__ = ["write_jsonl_task", "main"]

YAML = """\
# lmms-eval task over {data}: the questions, images, prompts and scores of
# `sdrpn eval --benchmark jsonl`, written by `python -m sdrpn.integrations.lmms_task`.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function {task}_hooks.doc_to_visual
doc_to_text: !function {task}_hooks.doc_to_text
doc_to_target: answers
process_results: !function {task}_hooks.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: {metric_key}
    aggregation: mean
    higher_is_better: true
"""

HOOKS = """\
\"\"\"Hooks of the lmms-eval task {task}, written by `python -m sdrpn.integrations.lmms_task`.\"\"\"

from sdrpn.integrations.jsonl_task import JsonlTask

_TASK = JsonlTask({data}, metric={metric})
doc_to_visual = _TASK.doc_to_visual
doc_to_text = _TASK.doc_to_text
process_results = _TASK.process_results
"""


def _question_file(data: Path, split: str | None) -> Path:
    """The JSONL file ``sdrpn eval --data DATA --split SPLIT`` reads."""
    return data / f"{split or 'test'}.jsonl" if data.is_dir() else data


def write_jsonl_task(data: Path, out: Path, task: str = "sdrpn_jsonl", split: str | None = None,
                     metric: str = "exact", max_new_tokens: int = 128) -> Path:
    """Write the task ``task`` over ``data`` (a JSONL file, or its folder and ``split``) into the folder
    ``out``; returns the YAML file. The questions are read first, so a bad file fails here."""
    from ..eval.datasets import get_benchmark

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", task):
        raise ValueError(f"task name {task!r}: use letters, digits and underscores (it names a Python module)")
    if metric not in METRIC_KEYS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRIC_KEYS)}")
    questions = _question_file(Path(data).expanduser(), split).resolve()
    get_benchmark("jsonl").read(questions, None, None)
    out.mkdir(parents=True, exist_ok=True)
    # json.dumps quotes a path for YAML and Python alike.
    yaml_file = out / f"{task}.yaml"
    yaml_file.write_text(YAML.format(data=json.dumps(str(questions)), task=task, max_new_tokens=max_new_tokens,
                                     metric_key=METRIC_KEYS[metric]))
    (out / f"{task}_hooks.py").write_text(HOOKS.format(task=task, data=json.dumps(str(questions)),
                                                       metric=json.dumps(metric)))
    return yaml_file


def main(argv: list[str] | None = None) -> int:
    from ..errors import UserError

    parser = argparse.ArgumentParser(prog="python -m sdrpn.integrations.lmms_task", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the JSONL file, or its folder (with --split)")
    parser.add_argument("--split", help="the file of a folder to read, <split>.jsonl (default test)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the task into (--include_path)")
    parser.add_argument("--task", default="sdrpn_jsonl", help="task name for --tasks (default sdrpn_jsonl)")
    parser.add_argument("--metric", choices=list(METRIC_KEYS), default="exact",
                        help="score of open questions, as sdrpn eval --metric (default exact)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    args = parser.parse_args(argv)
    try:
        yaml_file = write_jsonl_task(args.data, args.out, args.task, args.split, args.metric, args.max_new_tokens)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {yaml_file} and {yaml_file.with_name(f'{args.task}_hooks.py')}; run it with\n"
          f"  python -m lmms_eval --model sdrpn --model_args pretrained=DIR,rpn=DIR "
          f"--include_path {args.out} --tasks {args.task} --output_path OUT --log_samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
