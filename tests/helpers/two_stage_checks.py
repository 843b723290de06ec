"""Checks every family's two-stage engine must pass, shared by the family test files.

``run(rows, method, strategy=None)`` generates for a slice of the family's test rows with forced
RoI maps and returns ``SDRPNOutput`` with every step's logits.
"""

from __future__ import annotations

import torch

from helpers.tiny_qwen import assert_same_logits

__all__ = ["fast_equals_reference", "without_roi_equals_reference_and_baseline", "batch_equals_each_row_alone"]


def fast_equals_reference(run, rows) -> None:
    fast, reference = run(rows, "sdrpn"), run(rows, "sdrpn-reference")
    assert torch.equal(fast.visual_tokens.cpu(), reference.visual_tokens)
    assert_same_logits(fast.logits, reference.logits)
    assert torch.equal(fast.sequences, reference.sequences)


def without_roi_equals_reference_and_baseline(run, rows) -> None:
    fast = run(rows, "sdrpn", strategy="none")
    assert_same_logits(fast.logits, run(rows, "sdrpn-reference", strategy="none").logits)
    baseline = run(rows, "baseline")
    assert torch.equal(fast.sequences, baseline.sequences)
    assert_same_logits(fast.logits, baseline.logits)


def batch_equals_each_row_alone(run, count: int) -> None:
    together = run(slice(0, count), "sdrpn")
    for row in range(count):
        alone = run(slice(row, row + 1), "sdrpn")
        assert int(together.visual_tokens[row]) == int(alone.visual_tokens[0])
        for step, (a, b) in enumerate(zip(together.logits, alone.logits)):
            torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-5, msg=f"row {row}, step {step}")
