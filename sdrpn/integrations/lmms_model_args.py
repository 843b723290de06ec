"""The ``--model_args`` of lmms-eval's ``--model sdrpn``, checked and turned into settings.

lmms-eval parses ``key=value`` pairs itself (numbers become int or float, true/false bool) and adds
``batch_size`` and ``device`` from its own options. Every mistake is a :class:`ValueError` that names
the argument and what it accepts, raised before anything is loaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .answerers import AnswerSettings

__all__ = ["ModelArgs", "parse_model_args", "MODEL_ARGS"]

MODEL_ARGS = {
    "pretrained": "local Hugging Face checkpoint directory (required)",
    "rpn": "RPN directory written by sdrpn train (required by every method but baseline)",
    "method": "sdrpn (default), baseline, sdrpn-reference, sdrpn-attention, res-scaling or vicrop",
    "threshold": "RoI threshold between 0 and 1, or calibrated (default: the RPN's, 0.15 for LLaVA-1.5)",
    "strategy": "RoI upscaling: mask, masked or box (default: the model family's rule)",
    "max_regions": "zoom into the N strongest RoI components only (default: all)",
    "dtype": "auto (default), float32, bfloat16 or float16 (also fp32/bf16/fp16)",
    "device": "cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)",
    "prompt": "conversation template: vicuna_v1, plain or processor (default: the RPN's)",
    "attn_implementation": "sdpa (default), eager, flash_attention_2 or flash_attention_3",
    "batch_size": "questions per batch (lmms-eval's --batch_size; default 1)",
    "roi_log": "JSONL file to append each answer's visual tokens and RoI boxes to (default: none)",
}


@dataclass(frozen=True)
class ModelArgs:
    """The parsed arguments: what to load and answer with, and how the harness side behaves."""

    answer: AnswerSettings
    batch_size: int = 1
    roi_log: Path | None = None


def _checked(name: str, value, check):
    """``check(str(value))`` with an argparse type of ``sdrpn``'s commands, its error named after ``name``."""
    try:
        return check(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"sdrpn model_args {name}={value}: {exc}") from None


def _choice(name: str, value, choices) -> str:
    if str(value) not in choices:
        raise ValueError(f"sdrpn model_args {name}={value}: choose from {', '.join(choices)}")
    return str(value)


def parse_model_args(pretrained=None, rpn=None, method="sdrpn", threshold=None, strategy=None, max_regions=None,
                     dtype="auto", device=None, prompt=None, attn_implementation="sdpa", batch_size=1, roi_log=None,
                     **unknown) -> ModelArgs:
    """Check lmms-eval's model arguments (see :data:`MODEL_ARGS`)."""
    from ..commands import common
    from ..prompts import TEMPLATES

    if unknown:
        known = "\n".join(f"  {name}: {help}" for name, help in MODEL_ARGS.items())
        raise ValueError(f"sdrpn does not take model_args {', '.join(sorted(unknown))}; it takes\n{known}")
    if pretrained is None:
        raise ValueError("sdrpn needs model_args pretrained=DIR, a local Hugging Face checkpoint directory")
    if str(batch_size).startswith("auto"):
        raise ValueError("sdrpn needs a fixed --batch_size N; it has no automatic batch size search")
    answer = AnswerSettings(
        model=_checked("pretrained", pretrained, common.existing_dir),
        rpn=None if rpn is None else _checked("rpn", rpn, common.existing_dir),
        method=str(method),
        threshold=None if threshold is None else _checked("threshold", threshold, common.roi_threshold),
        strategy=None if strategy is None else _choice("strategy", strategy, ("mask", "masked", "box")),
        max_regions=None if max_regions is None else _checked("max_regions", max_regions, common.positive_int),
        dtype=_choice("dtype", dtype, list(common.DTYPES)),
        device=None if device is None else str(device),
        prompt=None if prompt is None else _choice("prompt", prompt, sorted(TEMPLATES)),
        attn_implementation=_choice("attn_implementation", attn_implementation, common.ATTENTION_IMPLEMENTATIONS),
    )
    return ModelArgs(answer=answer, batch_size=_checked("batch_size", batch_size, common.positive_int),
                     roi_log=None if roi_log is None else Path(str(roi_log)))
