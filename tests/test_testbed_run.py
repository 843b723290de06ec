"""The whole self-distillation loop on the shipped tiny model, on a small subset of a data set in the
model's own design but of another seed than it was trained on: labels from the model's own
attention -> RPN -> evaluation at the loop's RoI threshold (0.1, the authors' for small details).

It checks what the method claims on that subset: SD-RPN beats the baseline by more than a zoom of
the same RoI sizes at random places could (``random_zoom_bound``, every covered number counted as
read), and the trained RPN beats the raw attention it learnt from (``sdrpn-attention``).

640 labelled questions leave 510 to train the RPN (the rest are held out); 16 epochs of 32 make
240 steps, the shipped RPN's count on its 3,982 labels. Seeds 1, 2, 3 and 4, 300 test questions,
right answers: baseline 10, 10, 5, 7; sdrpn 203, 188, 212, 202 (59-69 points above the baseline,
where a random zoom of its RoI sizes could add at most 6.8-7.9); sdrpn-attention 185, 172, 183,
176. ``MARGIN`` and ``ATTENTION_MARGIN`` are below all of them. About 3 minutes on 2 CPU threads.
"""

from __future__ import annotations

from sdrpn.data.synthetic import DESIGNS, generate_dataset
from sdrpn.testbed.loop import LoopOptions, run_loop
from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN
from sdrpn.testbed.train_model import trained_design

SEED = 1  # the shipped model was trained on seed 0
LABELS = 640
TESTS = 300
EPOCHS = 16
# Accuracy by which sdrpn must beat the baseline (120 of the 300 questions; measured 178 to 207).
MARGIN = 0.40
# ... and the raw grounding attention (9 of the 300; measured 16 to 29): the self-distillation signal.
ATTENTION_MARGIN = 0.03


def _shipped_heads() -> str:
    """The grounding heads the shipped RPN was trained with (``sdrpn heads`` is not rerun)."""
    import json

    from sdrpn.distill.heads import HeadSelection

    pairs = json.loads((SHIPPED_RPN / "config.json").read_text())["labels"]["heads"]
    return str(HeadSelection(tuple(tuple(pair) for pair in pairs)))


def test_loop_on_a_subset_zooms_where_the_answer_is(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, LABELS, 0, TESTS, seed=SEED, config=DESIGNS[trained_design(SHIPPED_MODEL)],
                     progress=False)
    options = LoopOptions(label_samples=LABELS, test_samples=TESTS, heads=_shipped_heads(), fractions=(),
                          ablation=False, rpn_batch_size=32, rpn_epochs=EPOCHS)
    summary = run_loop(SHIPPED_MODEL, data, tmp_path / "work", options, progress=False)
    methods = summary["methods"]
    sdrpn, baseline = methods["sdrpn"], methods["baseline"]
    gain = sdrpn["accuracy"] - baseline["accuracy"]
    assert gain >= MARGIN, methods
    assert gain > sdrpn["random_zoom_bound"], methods
    assert sdrpn["accuracy"] >= methods["sdrpn-attention"]["accuracy"] + ATTENTION_MARGIN, methods
    assert sdrpn["visual_tokens"] > baseline["visual_tokens"]  # it did zoom in
