"""The whole self-distillation loop on the shipped tiny model, on a small fixed subset: labels from
the model's own attention -> RPN -> evaluation. SD-RPN must beat the plain model clearly.

It runs once the trained tiny model and its RPN are shipped in ``sdrpn/testbed/assets`` (see
the README's testbed section); until then it is skipped with that reason. ``MARGIN`` must be
checked against several seeds when the model is shipped.
"""

from __future__ import annotations

import pytest

from sdrpn.data.synthetic import generate_dataset
from sdrpn.testbed.loop import LoopOptions, run_loop
from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN

SEED = 7
LABELS = 320
TESTS = 120
# Points of accuracy by which sdrpn must beat baseline on the subset.
MARGIN = 0.15


def _shipped_heads() -> str:
    """The grounding heads the shipped RPN was trained with (``sdrpn heads`` is not rerun)."""
    import json

    from sdrpn.distill.heads import HeadSelection

    pairs = json.loads((SHIPPED_RPN / "config.json").read_text())["labels"]["heads"]
    return str(HeadSelection(tuple(tuple(pair) for pair in pairs)))


@pytest.mark.skipif(not (SHIPPED_MODEL.is_dir() and SHIPPED_RPN.is_dir()),
                    reason="the trained tiny model and RPN are not shipped in sdrpn/testbed/assets yet")
def test_loop_on_a_subset_beats_the_baseline(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, LABELS, 0, TESTS, seed=SEED, progress=False)
    options = LoopOptions(label_samples=LABELS, test_samples=TESTS, heads=_shipped_heads(), fractions=(),
                          ablation=False, rpn_batch_size=32)
    summary = run_loop(SHIPPED_MODEL, data, tmp_path / "work", options, progress=False)
    methods = summary["methods"]
    assert summary["labels"]["valid"] >= LABELS // 2  # most questions got usable labels
    assert methods["sdrpn"]["accuracy"] >= methods["baseline"]["accuracy"] + MARGIN, methods
    assert methods["sdrpn"]["visual_tokens"] > methods["baseline"]["visual_tokens"]  # it did zoom in
