"""Answer-to-image attention rows from q/k of a few heads vs eager attention's output_attentions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.tiny_models import TINY_GRID, tiny_llava, tiny_prompt
from sdrpn.distill.attention import CaptureRequest, capture, grounding_map, teacher_forced_batch
from sdrpn.models import adapter_for

QUESTIONS = ["what is written on the sign ?", "color ?", "how many dogs are on the left of the car ?"]
# Generated ids per sample; all but the last are fed back. The second answers with EOS at once.
ANSWERS = [[40, 41, 42, 2], [2], [50, 51, 52, 53, 54, 55]]
REQUEST = CaptureRequest({1: (0, 3), 4: (1, 2, 3)}, hidden_layers=(2,))


def _images(count):
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 255, (70 + 9 * i, 90, 3), dtype=np.uint8)) for i in range(count)]


def _pair(num_kv_heads):
    """The same weights with SDPA (ours) and eager attention (reference)."""
    model, processor = tiny_llava(num_kv_heads=num_kv_heads)
    eager, _ = tiny_llava(num_kv_heads=num_kv_heads, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    return model, eager, processor


def _capture(model, processor):
    encoded = processor(images=_images(3), text=[tiny_prompt(q) for q in QUESTIONS], return_tensors="pt",
                        padding=True, padding_side="left")
    adapter = adapter_for(model, processor)
    inputs = adapter.embed(encoded["input_ids"], encoded["pixel_values"], encoded["attention_mask"])
    assert not inputs.attention_mask.all(), "the prompts must need padding for this test"
    batch = teacher_forced_batch(inputs, ANSWERS, pad_id=3)
    return capture(adapter, batch, REQUEST), encoded


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_rows_equal_eager_output_attentions(num_kv_heads):
    model, eager, processor = _pair(num_kv_heads)
    captured, encoded = _capture(model, processor)
    image_token = model.config.image_token_id
    image_tokens = TINY_GRID[0] * TINY_GRID[1]
    assert model.config.text_config._attn_implementation == "sdpa"  # the model was left as it was
    for sample, answer in enumerate(ANSWERS):
        real = encoded["attention_mask"][sample].bool()
        prompt = encoded["input_ids"][sample][real]
        full = torch.cat([prompt, torch.tensor(answer[:-1], dtype=torch.int64)])[None]
        with torch.no_grad():
            reference = eager(input_ids=full, pixel_values=encoded["pixel_values"][sample:sample + 1],
                              output_attentions=True, output_hidden_states=True)
        start = int((prompt == image_token).nonzero()[0])
        queries = len(answer) - 1
        assert captured.query_mask[sample].sum() == queries
        for layer, heads in REQUEST.heads.items():
            expected = reference.attentions[layer][0, list(heads), len(prompt):, start:start + image_tokens]
            got = captured.rows[layer][sample, :, :queries]
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        hidden = reference.hidden_states[2][0, start:start + image_tokens]
        torch.testing.assert_close(captured.hidden[2][sample], hidden, atol=1e-5, rtol=1e-5)


def test_forward_stops_after_the_last_needed_layer():
    model, processor = tiny_llava()
    adapter = adapter_for(model, processor)
    calls = []
    handles = [layer.register_forward_hook(lambda module, args, output, i=i: calls.append(i))
               for i, layer in enumerate(adapter.layers)]
    try:
        _capture(model, processor)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(set(calls)) == [0, 1, 2, 3]  # layer 4's q/k are read; layers 4 and 5 never run


def test_grounding_map_averages_heads_and_real_queries():
    rows = torch.zeros(2, 2, 3, 4)
    rows[0, 0, 0, 1] = 0.6
    rows[0, 1, 1, 1] = 0.2
    rows[0, :, 2, 3] = 9.0  # padding query
    rows[1] = 1.0
    mask = torch.tensor([[True, True, False], [False, False, False]])
    expected = torch.tensor([[0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(grounding_map(rows, mask), expected)


def test_capture_rejects_layers_the_model_does_not_have():
    model, processor = tiny_llava()
    with pytest.raises(ValueError, match="requested"):
        encoded = processor(images=_images(1), text=[tiny_prompt("color ?")], return_tensors="pt")
        adapter = adapter_for(model, processor)
        inputs = adapter.embed(encoded["input_ids"], encoded["pixel_values"], encoded["attention_mask"])
        capture(adapter, teacher_forced_batch(inputs, [[5, 2]], 3), CaptureRequest({6: (0,)}))


def test_reader_answers_like_generate_and_shares_the_prompt_pass():
    """AttentionReader: greedy answers equal model.generate's, and the rows read with the prompt
    part taken from the prefill equal eager attention's."""
    from sdrpn.distill.attention import AttentionReader
    from sdrpn.prompts import TEMPLATES

    model, eager, processor = _pair(2)
    reader = AttentionReader(model, processor, max_new_tokens=5)
    assert reader.template == TEMPLATES["vicuna_v1"]  # LLaVA's default template
    images = _images(3)
    reading = reader.read(images, QUESTIONS, REQUEST)
    prompts = [TEMPLATES["vicuna_v1"].render(question, processor) for question in QUESTIONS]
    encoded = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=5, do_sample=False)[:, encoded["input_ids"].shape[1]:]
    assert reading.answers == reader._cut(generated)
    captured = reading.capture
    image_tokens = TINY_GRID[0] * TINY_GRID[1]
    for sample, answer in enumerate(reading.answers):
        prompt = encoded["input_ids"][sample][encoded["attention_mask"][sample].bool()]
        full = torch.cat([prompt, torch.tensor(answer[:-1], dtype=torch.int64)])[None]
        with torch.no_grad():
            reference = eager(input_ids=full, pixel_values=encoded["pixel_values"][sample:sample + 1],
                              output_attentions=True, output_hidden_states=True)
        start = int((prompt == model.config.image_token_id).nonzero()[0])
        for layer, heads in REQUEST.heads.items():
            expected = reference.attentions[layer][0, list(heads), len(prompt):, start:start + image_tokens]
            torch.testing.assert_close(captured.rows[layer][sample, :, :len(answer) - 1], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(captured.hidden[2][sample], reference.hidden_states[2][0, start:start + image_tokens],
                                   atol=1e-5, rtol=1e-5)
