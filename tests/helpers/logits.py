"""Comparing the logits of one question answered in a batch and alone."""

from __future__ import annotations

from typing import Sequence

import torch


def assert_same_step_logits(batched: Sequence[torch.Tensor], alone: Sequence[torch.Tensor], rtol: float = 1e-4,
                            what: str = "") -> None:
    """Every step's logits of one question (1-D, or one row each), in a batch and alone, within
    ``rtol`` of the step's largest logit. A row may run on in a batch after it ended (rows still
    answering keep the batch going): only its own steps count."""
    assert len(alone) >= 1 and len(batched) >= len(alone), (len(batched), len(alone))
    for step, (got, expected) in enumerate(zip(batched, alone)):
        error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        assert error < rtol, f"{what}step {step}: relative logit error {error:.2e}"
