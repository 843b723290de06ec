"""An RPN for the tiny Qwen2.5-VL model (:mod:`helpers.tiny_qwen`, the model of
:mod:`helpers.tiny_qwen_checkpoint`) whose map has structure: the tiny model's own q/k projections
give logits near 0 everywhere, so random ones take their place and the RoI keeps part of an image.

    rpn = structured_rpn(model)
    save_structured_rpn(tmp_path / "rpn")      # for the checkpoint of tiny_qwen2_5_vl()
"""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.tiny_qwen import tiny_qwen2_5_vl

__all__ = ["structured_rpn", "save_structured_rpn"]


def structured_rpn(model, seed: int = 0):
    """An RPN (K=2, T=2) on ``model`` with random q/k projections."""
    from sdrpn import RPN

    rpn = RPN.from_model(model, 2, 2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rpn.q_proj.weight.copy_(torch.randn(rpn.q_proj.weight.shape, generator=generator))
        rpn.k_proj.weight.copy_(torch.randn(rpn.k_proj.weight.shape, generator=generator))
    return rpn


def save_structured_rpn(directory, model_seed: int = 0, seed: int = 0) -> Path:
    """Writes :func:`structured_rpn` of ``tiny_qwen2_5_vl(model_seed)``; returns the directory."""
    return structured_rpn(tiny_qwen2_5_vl(seed=model_seed), seed).save_pretrained(directory)
