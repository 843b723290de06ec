"""The Qwen2.5-VL adapter on a tiny random model: per-image grids, 3-D positions, and the engine's
plain generation equal to ``model.generate``."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_qwen import qwen_images, qwen_inputs, tiny_qwen2_5_vl
from sdrpn import RPN, SDRPN
from sdrpn.models import adapter_for

SIZES = [(120, 90), (60, 200), (100, 100)]
TEXTS = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14]), ([15, 16], [17, 18, 19, 20, 21, 22])]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl()


@pytest.fixture(scope="module")
def engine(model):
    return SDRPN(model, RPN.from_model(model, 2, 2))


def test_embedding_places_each_image_and_its_3d_positions(model):
    adapter = adapter_for(model)
    inputs = qwen_inputs(qwen_images(SIZES), TEXTS)
    vision = {name: inputs[name] for name in adapter.vision_input_names}
    embedded = adapter.embed(inputs["input_ids"], vision, inputs["attention_mask"])
    grids = inputs["image_grid_thw"]
    assert embedded.image_lengths.tolist() == (grids.prod(dim=1) // 4).tolist()
    expected, deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=(inputs["input_ids"] == 110).int(),
                                                  image_grid_thw=grids, attention_mask=inputs["attention_mask"])
    assert torch.equal(embedded.rope_position_ids, expected)
    # After the image every axis runs ahead of the layer position by the row's delta.
    last = embedded.position_ids[:, -1]
    assert torch.equal(embedded.rope_position_ids[:, :, -1], (last + embedded.rope_delta)[None].expand(3, -1))


@pytest.mark.parametrize("rows", [slice(0, 3), slice(1, 2)], ids=["batch3", "batch1"])
def test_baseline_equals_model_generate(model, engine, rows):
    inputs = qwen_inputs(qwen_images(SIZES[rows]), TEXTS[rows])
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = engine.generate(**inputs, max_new_tokens=NEW_TOKENS, method="baseline")
    assert torch.equal(got, expected)


def test_baseline_logits_equal_model_generate(model, engine):
    inputs = qwen_inputs(qwen_images(SIZES), TEXTS)
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    got = engine.generate(**inputs, max_new_tokens=NEW_TOKENS, method="baseline", output_logits=True)
    for step, (ours, theirs) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5, msg=f"step {step}")


def test_a_batch_equals_each_row_alone(model, engine):
    images, batch = qwen_images(SIZES), qwen_inputs(qwen_images(SIZES), TEXTS)
    together = engine.generate(**batch, max_new_tokens=NEW_TOKENS, method="baseline", output_logits=True)
    for row in range(len(SIZES)):
        alone = engine.generate(**qwen_inputs(images[row:row + 1], TEXTS[row:row + 1]), max_new_tokens=NEW_TOKENS,
                                method="baseline", output_logits=True)
        for step, (a, b) in enumerate(zip(together.logits, alone.logits)):
            torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-5, msg=f"row {row}, step {step}")


def test_missing_grid_is_a_clear_error(engine):
    inputs = qwen_inputs(qwen_images(SIZES[:1]), TEXTS[:1])
    del inputs["image_grid_thw"]
    with pytest.raises(ValueError, match="image_grid_thw"):
        engine.generate(**inputs, max_new_tokens=2, method="baseline")


@pytest.mark.parametrize("row", range(len(SIZES)))
def test_rpn_scores_are_the_head_layers_attention_logits(row):
    """A fresh RPN's map is layer K+T-1's own q.k of the last prompt token against the image tokens
    (M-RoPE on both, grouped keys repeated, mean over heads): up to a constant it is the mean over
    heads of the log of that layer's eager attention weights, which transformers computes."""
    model = tiny_qwen2_5_vl(attn_implementation="eager")
    adapter = adapter_for(model)
    start, blocks = 2, 3
    rpn = RPN.from_model(model, start, blocks)
    inputs = qwen_inputs(qwen_images(SIZES[row:row + 1]), TEXTS[row:row + 1])
    vision = {name: inputs[name] for name in adapter.vision_input_names}
    with torch.no_grad():
        embedded = adapter.embed(inputs["input_ids"], vision)
        hidden = adapter.run_layers(embedded.inputs_embeds, 0, start, embedded.position_ids, None, None,
                                    embedded.rope_position_ids)
        image = (inputs["input_ids"][0] == 110).nonzero().flatten()[None]
        logits = rpn(hidden, hidden.shape[1] - 1, image, position_ids=embedded.position_ids,
                     rope_position_ids=embedded.rope_position_ids)[0]
        attentions = model(**inputs, output_attentions=True).attentions[start + blocks - 1]
    expected = attentions[0, :, -1, image[0]].log().mean(dim=0)
    torch.testing.assert_close(logits - logits.mean(), expected - expected.mean(), rtol=1e-4, atol=1e-4)
    assert rpn.config["use_final_norm"] is False and "norm.weight" not in rpn.state_dict()


def test_an_rpn_round_trips_and_is_refused_by_the_other_family(tmp_path, model):
    from helpers.tiny_models import tiny_llava

    rpn = RPN.from_model(model, 2, 2)
    rpn.save_pretrained(tmp_path / "qwen")
    loaded = RPN.from_pretrained(tmp_path / "qwen", model)
    assert loaded.threshold == 0.25 and loaded.config["use_rope"] and not loaded.config["use_final_norm"]
    inputs = qwen_inputs(qwen_images(SIZES), TEXTS)
    adapter = adapter_for(model)
    embedded = adapter.embed(inputs["input_ids"], adapter.vision_input(inputs), inputs["attention_mask"])
    hidden = adapter.run_layers(embedded.inputs_embeds, 0, 2, embedded.position_ids, embedded.attention_mask,
                                rope_position_ids=embedded.rope_position_ids)
    arguments = (hidden, hidden.shape[1] - 1, embedded.image_start, embedded.attention_mask, embedded.position_ids,
                 embedded.rope_position_ids, embedded.image_lengths)
    with torch.no_grad():
        assert torch.equal(rpn(*arguments), loaded(*arguments))
    llava = tiny_llava()[0]
    with pytest.raises(ValueError, match="family"):
        RPN.from_pretrained(tmp_path / "qwen", llava)
    RPN.from_model(llava, 1, 1).save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match="family"):
        RPN.from_pretrained(tmp_path / "llava", model)
