"""``sdrpn-attention``: the raw grounding attention of the last prompt token as the RoI map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.logits import assert_same_step_logits
from helpers.tiny_models import TINY_GRID, tiny_llava, tiny_prompt
from sdrpn import RPN, SDRPN

GROUNDING = {"heads": [[2, 0], [2, 3], [3, 1]],
             "sink": {"method": "attention", "layer": 1, "threshold": 0.004, "dims": None}}
QUESTIONS = ["what is the color of the car ?", "name ?"]


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_llava()
    rpn = RPN.from_model(model, 2, 2, labels=GROUNDING)
    return model, processor, SDRPN(model, rpn, processor)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


def _eager_last_token_rows(model, inputs, image_token_id, image_length):
    """layer -> (H, N) eager attention weights of the last prompt token to the image tokens."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    start = int((inputs["input_ids"][0] == image_token_id).nonzero()[0])
    return {layer: weights[0, :, -1, start:start + image_length] for layer, weights in enumerate(attentions)}


def test_map_equals_eager_attention_with_sinks_zeroed_and_drives_stage_two(tiny):
    model, processor, engine = tiny
    adapter = engine.adapter
    images = _images([(140, 100)])
    inputs = processor(images=images, text=[tiny_prompt(QUESTIONS[0])], return_tensors="pt")
    rows = _eager_last_token_rows(model, inputs, adapter.image_token_id, adapter.image_length)
    grounding = torch.stack([rows[layer][head] for layer, head in GROUNDING["heads"]]).mean(0)
    sinks = rows[1].mean(0) >= GROUNDING["sink"]["threshold"]
    assert 0 < int(sinks.sum()) < adapter.image_length  # the threshold must make the sink branch matter
    expected = grounding.masked_fill(sinks, 0.0)

    from sdrpn.engine.attention_roi import grounding_settings, prompt_grounding

    heads, sink = grounding_settings(engine.rpn)
    got = prompt_grounding(adapter, inputs["input_ids"], inputs["attention_mask"].bool(), inputs["pixel_values"],
                           heads, sink)
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-6)

    # Stage 2 runs on that map exactly as SD-RPN runs on a forced RPN map.
    logits = torch.logit(expected / expected.max(), eps=1e-6).view(1, *TINY_GRID)
    ours = engine.generate(**inputs, images=images, method="sdrpn-attention", max_new_tokens=4, return_roi=True)
    forced = engine.generate(**inputs, images=images, method="sdrpn", roi_logits=logits, max_new_tokens=4,
                             return_roi=True)
    assert torch.equal(ours.sequences, forced.sequences)
    assert torch.equal(ours.visual_tokens, forced.visual_tokens)
    assert int(ours.visual_tokens[0]) > adapter.image_length  # a RoI was used


def test_batched_prompts_of_different_lengths_match_one_by_one(tiny):
    _, processor, engine = tiny
    images = _images([(140, 100), (90, 160)], seed=1)
    batch = processor(images=images, text=[tiny_prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    together = engine.generate(**batch, images=images, method="sdrpn-attention", max_new_tokens=4, return_roi=True,
                               output_logits=True)
    for row, (image, question) in enumerate(zip(images, QUESTIONS)):
        alone = processor(images=[image], text=[tiny_prompt(question)], return_tensors="pt")
        single = engine.generate(**alone, images=[image], method="sdrpn-attention", max_new_tokens=4, return_roi=True,
                                 output_logits=True)
        length = alone["input_ids"].shape[1]
        generated = together.sequences[row, batch["input_ids"].shape[1]:]
        assert torch.equal(generated[: single.sequences.shape[1] - length], single.sequences[0, length:])
        assert int(together.visual_tokens[row]) == int(single.visual_tokens[0])
        assert_same_step_logits([step[row] for step in together.logits], [step[0] for step in single.logits])


def test_an_rpn_trained_with_sinks_kept_reads_the_map_with_sinks_kept(tiny):
    from sdrpn.engine.attention_roi import grounding_settings

    model = tiny[0]
    heads, sink = grounding_settings(RPN.from_model(model, 2, 2, labels={**GROUNDING, "keep_sinks": True}))
    assert sink.method == "none" and heads.pairs == ((2, 0), (2, 3), (3, 1))
    assert grounding_settings(tiny[2].rpn)[1].method == "attention"


def test_an_rpn_without_label_settings_is_refused(tiny):
    model, processor, _ = tiny
    engine = SDRPN(model, RPN.from_model(model, 2, 2), processor)
    images = _images([(100, 100)])
    inputs = processor(images=images, text=[tiny_prompt(QUESTIONS[1])], return_tensors="pt")
    with pytest.raises(ValueError, match="records none"):
        engine.generate(**inputs, images=images, method="sdrpn-attention", max_new_tokens=2)
