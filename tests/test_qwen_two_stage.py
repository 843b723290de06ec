"""Two-stage SD-RPN on a tiny random Qwen2.5-VL: the fast path (KV reuse, RoI block with its own
3-D positions, views of different grids in one batch) equals the plain reference (each sample
alone, both views placed by the model's own ``get_rope_index``, every layer re-run)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from helpers.tiny_qwen import (assert_same_logits, forced_maps, image_processor, qwen_images, qwen_inputs,
                               tiny_qwen2_5_vl)
from helpers.two_stage_checks import (batch_equals_each_row_alone, fast_equals_reference,
                                      without_roi_equals_reference_and_baseline)
from sdrpn import RPN, SDRPN
from sdrpn.models.qwen2_5_vl import Qwen2_5_VLAdapter
from sdrpn.roi import MODE_MASK, MODE_NONE, RoIOptions

SIZES = [(400, 300), (200, 560), (330, 330)]  # grids 11 x 14, 20 x 7, 12 x 12
MAX_TOKENS = 256
TEXTS = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14]), ([15, 16], [17, 18, 19, 20, 21, 22])]
# Per row, grid boxes on its own view: two blobs (masked upscaling keeps the mask's cells only), one
# blob, none.
BOXES = [[(1, 1, 4, 4), (9, 6, 12, 9)], [(2, 5, 5, 12)], []]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl()


@pytest.fixture(scope="module")
def engine(model):
    return SDRPN(model, RPN.from_model(model, 2, 2), processor=image_processor(MAX_TOKENS))




def generate(engine, rows, method, strategy=None):
    images = qwen_images(SIZES)[rows]
    inputs = qwen_inputs(images, TEXTS[rows], MAX_TOKENS)
    return engine.generate(**inputs, images=images, method=method, roi_logits=forced_maps(inputs, BOXES[rows]),
                           max_new_tokens=NEW_TOKENS, output_logits=True, return_roi=True, strategy=strategy)




@pytest.mark.parametrize("rows", [slice(0, 3), slice(0, 1), slice(1, 2)], ids=["batch3", "two-blobs", "one-blob"])
def test_fast_path_equals_the_reference(engine, rows):
    fast_equals_reference(partial(generate, engine), rows)


def test_the_default_rule_is_the_authors_masked_upscaling(engine):
    result = generate(engine, slice(0, 3), "sdrpn")
    assert result.roi.mode.tolist() == [MODE_MASK, MODE_MASK, MODE_NONE]
    # Row 0's two blobs: the RoI view keeps fewer tokens than its grid holds.
    reference = generate(engine, slice(0, 1), "sdrpn-reference").roi[0]
    assert 0 < reference.keep.sum() < reference.keep.size
    assert engine.options.threshold == 0.25 and engine.options.edge_sink_above == 768


def test_without_a_roi_the_fast_path_equals_the_reference_and_the_baseline(engine):
    without_roi_equals_reference_and_baseline(partial(generate, engine), slice(0, 3))


def test_a_batch_equals_each_row_alone(engine):
    batch_equals_each_row_alone(partial(generate, engine), 3)


def test_sync_free_is_refused_with_the_reason(model):
    with pytest.raises(ValueError, match="sync_free=False"):
        SDRPN(model, RPN.from_model(model, 2, 2), processor=image_processor(), sync_free=True)


def test_pruning_of_large_views_equals_the_reference(model):
    # The authors prune above 1024 tokens at sigmoid <= 0.01; here above 100 tokens at 0.5, so that a
    # random model prunes some tokens of the 154- and 140-token views (the 144-token one has no RoI).
    options = RoIOptions(strategy="masked", edge_sink_above=768, prune_above=100, prune_threshold=0.5)
    engine = SDRPN(model, RPN.from_model(model, 2, 2), processor=image_processor(MAX_TOKENS), roi_options=options)
    fast = generate(engine, slice(0, 3), "sdrpn")
    reference = generate(engine, slice(0, 3), "sdrpn-reference")
    dropped = [roi.dropped for roi in reference.roi]
    assert dropped[0] > 0 and dropped[1] > 0 and dropped[2] == 0
    assert torch.equal(fast.visual_tokens.cpu(), reference.visual_tokens)
    assert_same_logits(fast.logits, reference.logits)
    unpruned = generate(SDRPN(model, engine.rpn, processor=image_processor(MAX_TOKENS)), slice(0, 3), "sdrpn")
    assert not torch.allclose(unpruned.logits[0][0], fast.logits[0][0])


def test_the_separate_layout_equals_its_reference_and_differs_from_the_nested_one(model):
    adapter = Qwen2_5_VLAdapter(model, roi_layout="separate")
    engine = SDRPN(adapter, RPN.from_model(model, 2, 2), processor=image_processor(MAX_TOKENS))
    fast = generate(engine, slice(0, 3), "sdrpn")
    reference = generate(engine, slice(0, 3), "sdrpn-reference")
    assert_same_logits(fast.logits, reference.logits)
    nested = generate(SDRPN(model, engine.rpn, processor=image_processor(MAX_TOKENS)), slice(0, 3), "sdrpn")
    assert torch.equal(fast.visual_tokens, nested.visual_tokens)
    assert not torch.allclose(fast.logits[0][:2], nested.logits[0][:2])  # rows with a RoI
    torch.testing.assert_close(fast.logits[0][2], nested.logits[0][2])  # the row without one


def test_an_unknown_layout_is_refused(model):
    with pytest.raises(ValueError, match="nested"):
        Qwen2_5_VLAdapter(model, roi_layout="inside")


def test_the_raw_attention_method_runs_per_grid_and_a_batch_equals_each_row_alone(model):
    labels = {"heads": [[1, 0], [1, 2]], "sink": {"method": "none", "layer": None, "threshold": 1.0, "dims": None}}
    engine = SDRPN(model, RPN.from_model(model, 2, 2, labels=labels), processor=image_processor(MAX_TOKENS))
    images = qwen_images(SIZES)

    def run(rows):
        inputs = qwen_inputs(images[rows], TEXTS[rows], MAX_TOKENS)
        return engine.generate(**inputs, images=images[rows], method="sdrpn-attention", max_new_tokens=NEW_TOKENS,
                               output_logits=True, return_roi=True)

    together = run(slice(0, 3))
    assert (together.visual_tokens.cpu() > torch.tensor([154, 140, 144])).any()  # a RoI from the raw map
    for row in range(3):
        alone = run(slice(row, row + 1))
        assert int(together.visual_tokens[row]) == int(alone.visual_tokens[0])
        for step, (a, b) in enumerate(zip(together.logits, alone.logits)):
            torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-5, msg=f"row {row}, step {step}")
