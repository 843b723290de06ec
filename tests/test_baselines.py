"""The peer methods: res-scaling against transformers' own path, ViCrop's attention and window rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.eager_attention import eager_relative_attention
from helpers.logits import assert_same_step_logits
from helpers.tiny_models import TINY_GRID, TINY_IMAGE, tiny_llava, tiny_prompt
from sdrpn import RPN, SDRPN
from sdrpn.engine.baselines import GENERIC_PROMPT, relative_attention, select_window

QUESTIONS = ["what is the color of the car ?", "name ?"]


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_llava()
    return model, processor, SDRPN(model, RPN.from_model(model, 2, 2), processor)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


def test_res_scaling_equals_transformers_on_a_double_size_view(tiny):
    model, processor, engine = tiny
    images = _images([(150, 150)])  # square: the view is the whole image, at 2x: a 192-pixel resize
    inputs = processor(images=images, text=[tiny_prompt(QUESTIONS[0])], return_tensors="pt")
    got = engine.generate(**inputs, images=images, method="res-scaling", max_new_tokens=5, return_roi=True)
    assert got.visual_tokens.tolist() == [4 * TINY_GRID[0] * TINY_GRID[1]]

    big = 2 * TINY_IMAGE
    pixel_values = processor.image_processor(images, size={"shortest_edge": big},
                                             crop_size={"height": big, "width": big}, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default",
                                            interpolate_pos_encoding=True).pooler_output[0]
        ids = inputs["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero().flatten()
        embeds = model.get_input_embeddings()(ids)
        sequence = torch.cat([embeds[: image[0]], features, embeds[image[-1] + 1:]])[None]
        expected = model.generate(inputs_embeds=sequence, attention_mask=torch.ones(sequence.shape[:2], dtype=torch.long),
                                  max_new_tokens=5, do_sample=False)
    assert torch.equal(got.sequences[0, ids.shape[0]:], expected[0])


def test_vicrop_attention_equals_eager_attention_rows(tiny):
    """Our q/k attention of the last token equals the eager attention weights of the model."""
    model, processor, engine = tiny
    adapter = engine.adapter
    images = _images([(120, 90)])
    question = processor(images=images, text=[tiny_prompt(QUESTIONS[0])], return_tensors="pt")
    generic = processor(images=images, text=[tiny_prompt(GENERIC_PROMPT)], return_tensors="pt")
    layer = 2
    expected = eager_relative_attention(model, question, generic, layer, adapter.image_token_id, TINY_GRID)
    with torch.no_grad():
        embedded = [adapter.embed(i["input_ids"], i["pixel_values"]) for i in (question, generic)]
        ratio = relative_attention(adapter, embedded[0], embedded[1], layer, [TINY_GRID])
    torch.testing.assert_close(ratio[0], expected, rtol=1e-4, atol=1e-6)


def test_window_rule_finds_a_peak_and_sizes_windows_in_source_pixels():
    grid_map = torch.zeros(24, 24)
    grid_map[17, 5] = 10.0
    # Cells of 14 source pixels (a 336-pixel view of a 336-pixel image): windows of 1.0-2.0 views
    # cover the whole grid, so the box is the grid.
    assert select_window(grid_map, (14.0, 14.0), (336, 336)).tolist() == [0, 0, 24, 24]
    # A 4x larger image: cells of 56 pixels, windows of 6 to 12 cells; the peak lies inside the box.
    x0, y0, x1, y1 = select_window(grid_map, (56.0, 56.0), (336, 336)).tolist()
    assert x0 <= 5 < x1 and y0 <= 17 < y1
    assert 6 <= x1 - x0 <= 12 and x1 - x0 == y1 - y0


def test_window_rule_prefers_the_window_that_fits_the_blob():
    """Per size the largest sum; across sizes (sum - neighbour mean) / area, which is largest for the
    window that fits a compact blob exactly (its neighbours lose a whole row or column)."""
    grid_map = torch.zeros(24, 24)
    grid_map[9:15, 4:10] = 1.0  # 6 x 6 cells; with 56-pixel cells the windows span 6 to 12 cells
    assert select_window(grid_map, (56.0, 56.0), (336, 336)).tolist() == [4, 9, 10, 15]


def test_vicrop_appends_a_second_image_and_batches_like_single_rows(tiny):
    _, processor, engine = tiny
    images = _images([(130, 70), (64, 200)])
    inputs = processor(images=images, text=[tiny_prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    together = engine.generate(**inputs, images=images, method="vicrop", max_new_tokens=4, return_roi=True,
                               output_logits=True)
    assert together.visual_tokens.tolist() == [2 * TINY_GRID[0] * TINY_GRID[1]] * 2
    for row in range(2):
        single = processor(images=[images[row]], text=[tiny_prompt(QUESTIONS[row])], return_tensors="pt")
        alone = engine.generate(**single, images=[images[row]], method="vicrop", max_new_tokens=4, output_logits=True)
        assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
        assert_same_step_logits([step[row] for step in together.logits], [step[0] for step in alone.logits])


def test_peer_methods_need_the_images(tiny):
    _, processor, engine = tiny
    inputs = processor(images=_images([(64, 64)]), text=[tiny_prompt("name ?")], return_tensors="pt")
    for method in ("res-scaling", "vicrop"):
        with pytest.raises(ValueError, match="images"):
            engine.generate(**inputs, method=method, max_new_tokens=2)
