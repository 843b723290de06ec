"""The peer methods on a tiny random Qwen2.5-VL: ``res-scaling`` equals ``model.generate`` on the
processor's own view at four times the pixels, ``vicrop``'s attention equals the model's eager
attention rows, its second view equals ``model.generate`` on the processor's two-image prompt, and
a batch of different grids equals each row alone (every step's logits)."""

from __future__ import annotations

import pytest
import torch

from helpers.eager_attention import eager_relative_attention
from helpers.tiny_qwen import assert_same_logits, qwen_images, qwen_inputs, tiny_qwen2_5_vl
from helpers.tiny_qwen_checkpoint import save_tiny_qwen_checkpoint
from sdrpn import RPN, SDRPN
from sdrpn.commands.common import load_processor
from sdrpn.engine.baselines import GENERIC_PROMPT, relative_attention, vicrop_layer
from sdrpn.models.qwen2_5_vl import Qwen2_5_VLAdapter
from sdrpn.prompts import template_for

SIZES = [(1600, 1200), (600, 1680)]  # grids of different shapes at the checkpoint's 64-token budget, cells
# of about 170 source pixels: ViCrop's windows (448 to 896 pixels) cover part of each image
QUESTIONS = ["what number is on the sign ?", "which color is the car ?"]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    directory = save_tiny_qwen_checkpoint(tmp_path_factory.mktemp("qwen_peers") / "model")
    return load_processor(directory, "qwen2_5_vl")


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl()


def engine_for(model, processor, roi_layout="nested"):
    adapter = Qwen2_5_VLAdapter(model, processor, roi_layout=roi_layout)
    return SDRPN(adapter, RPN.from_model(model, 2, 2), processor, prompt=template_for(None, adapter))


def inputs_of(engine, processor, rows, **kwargs):
    images = qwen_images(SIZES, seed=5)
    images, questions = [images[row] for row in rows], [QUESTIONS[row] for row in rows]
    inputs = processor(images=images, text=[engine.prompt(q) for q in questions], return_tensors="pt",
                       padding=True, padding_side="left", **kwargs)
    return images, inputs


def generate(engine, processor, method, rows):
    images, inputs = inputs_of(engine, processor, rows)
    return engine.generate(**inputs, images=images, method=method, max_new_tokens=NEW_TOKENS, output_logits=True,
                           return_roi=True)


def transformers_generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:], list(out.logits)


def test_res_scaling_is_the_view_at_four_times_the_pixels(model, processor):
    engine = engine_for(model, processor)
    together = generate(engine, processor, "res-scaling", [0, 1])
    _, inputs = inputs_of(engine, processor, [0, 1])
    for row, (rows, cols) in enumerate((inputs["image_grid_thw"][:, 1:] // 2).tolist()):
        budget = 4 * rows * cols * 28 * 28
        _, scaled = inputs_of(engine, processor, [row], size={"shortest_edge": budget, "longest_edge": budget})
        tokens, logits = transformers_generate(model, scaled)
        assert int(together.visual_tokens[row]) == int(scaled["image_grid_thw"][0].prod()) // 4
        assert int(together.visual_tokens[row]) > 3 * rows * cols  # about twice the side
        assert torch.equal(together.sequences[row, -NEW_TOKENS:], tokens)
        assert_same_logits([step[row:row + 1] for step in together.logits], logits)


def test_vicrop_attention_equals_eager_attention_rows(model, processor):
    """Our q/k attention of the last token, on each view's grid, equals the eager attention weights."""
    engine = engine_for(model, processor)
    adapter = engine.adapter
    layer = vicrop_layer(adapter.num_layers, adapter.vicrop_attention_layer)
    images, question = inputs_of(engine, processor, [0])
    generic = processor(images=images, text=[engine.prompt(GENERIC_PROMPT)], return_tensors="pt")
    grid = tuple((question["image_grid_thw"][0, 1:] // 2).tolist())
    expected = eager_relative_attention(model, question, generic, layer, adapter.image_token_id, grid)
    with torch.no_grad():
        embedded = [adapter.embed(i["input_ids"], adapter.vision_input(i), i["attention_mask"])
                    for i in (question, generic)]
        ratio = relative_attention(adapter, embedded[0], embedded[1], layer, [grid])
    torch.testing.assert_close(ratio[0], expected, rtol=1e-4, atol=1e-6)


def test_vicrop_adds_the_crop_as_the_processors_second_image(model, processor):
    """With the RoI block after the image (``roi_layout="separate"``), the second view is what the
    processor makes of a two-image prompt with the crop."""
    engine = engine_for(model, processor, roi_layout="separate")
    together = generate(engine, processor, "vicrop", [0, 1])
    images = qwen_images(SIZES, seed=5)
    for row in range(2):
        x0, y0, width, height = together.roi[row].tolist()
        assert width * height < images[row].size[0] * images[row].size[1] / 2  # a crop, not the image
        crop = images[row].crop((x0, y0, x0 + width, y0 + height))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": QUESTIONS[row]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        both = processor(images=[images[row], crop], text=[text], return_tensors="pt")
        tokens, logits = transformers_generate(model, both)
        assert int(together.visual_tokens[row]) == int(both["image_grid_thw"].prod(dim=1).sum()) // 4
        assert torch.equal(together.sequences[row, -NEW_TOKENS:], tokens)
        assert_same_logits([step[row:row + 1] for step in together.logits], logits)


@pytest.mark.parametrize("method", ["res-scaling", "vicrop"])
def test_a_batch_of_different_grids_equals_each_row_alone(model, processor, method):
    engine = engine_for(model, processor)
    together = generate(engine, processor, method, [0, 1])
    for row in range(2):
        alone = generate(engine, processor, method, [row])
        assert torch.equal(together.sequences[row, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
        assert_same_logits([step[row:row + 1] for step in together.logits], alone.logits)
        assert together.visual_tokens[row] == alone.visual_tokens[0]
        if method == "vicrop":
            assert together.roi[row].tolist() == alone.roi[0].tolist()


def test_res_scaling_on_qwen3_vl_carries_the_scaled_views_deepstack_features():
    """Qwen3-VL adds each view's deepstack features inside its first layers: res-scaling's view brings
    its own, as ``model.generate`` on that view does."""
    from helpers.tiny_qwen3 import CELL, image_processor, qwen3_inputs, tiny_qwen3_vl

    model = tiny_qwen3_vl()
    engine = SDRPN(model, RPN.from_model(model, 3, 2), image_processor())
    images = qwen_images(SIZES, seed=5)
    texts = [([5, 6], [7, 8, 9]), ([10], [11, 12])]
    inputs = qwen3_inputs(images, texts)
    together = engine.generate(**inputs, images=images, method="res-scaling", max_new_tokens=NEW_TOKENS,
                               output_logits=True)
    for row, (rows, cols) in enumerate((inputs["image_grid_thw"][:, 1:] // 2).tolist()):
        budget = 4 * rows * cols * CELL * CELL
        scaled = image_processor()
        scaled.size = {"shortest_edge": budget, "longest_edge": budget}
        expected = qwen_inputs([images[row]], [texts[row]], processor=scaled)
        tokens, logits = transformers_generate(model, expected)
        assert int(together.visual_tokens[row]) == int(expected["image_grid_thw"][0].prod()) // 4
        assert torch.equal(together.sequences[row, -NEW_TOKENS:], tokens)
        assert_same_logits([step[row:row + 1] for step in together.logits], logits)

