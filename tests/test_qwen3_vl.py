"""The Qwen3-VL adapter on tiny random models (dense and MoE): deepstack features injected after the
first decoder layers, q/k norms, 32-pixel cells, M-RoPE. Plain generation equals ``model.generate``;
two-stage SD-RPN with KV reuse equals the plain reference (each sample alone, both views placed by
the model's own ``get_rope_index``, every layer re-run), and the reference's stage 2 equals the
model's own forward pass on the two-image prompt."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from helpers.tiny_qwen import IMAGE, VISION_END, VISION_START, assert_same_logits, forced_maps
from helpers.tiny_qwen3 import DEEPSTACK_LAYERS, image_processor, qwen3_inputs, qwen_images, tiny_qwen3_vl
from helpers.two_stage_checks import (batch_equals_each_row_alone, fast_equals_reference,
                                      without_roi_equals_reference_and_baseline)
from sdrpn import RPN, SDRPN
from sdrpn.models import adapter_for
from sdrpn.models.qwen2_5_vl import Qwen2_5_VLAdapter
from sdrpn.roi import MODE_MASK, MODE_NONE

SIZES = [(400, 300), (200, 560), (330, 330)]  # grids 9 x 13, 18 x 6, 10 x 10 (32-pixel cells)
MAX_TOKENS = 256
TEXTS = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14]), ([15, 16], [17, 18, 19, 20, 21, 22])]
# Per row, grid boxes on its own view: two blobs (masked upscaling keeps the mask's cells only), one
# blob, none.
BOXES = [[(1, 1, 4, 4), (9, 5, 12, 8)], [(2, 5, 5, 12)], []]
NEW_TOKENS = 5
START, BLOCKS = 3, 2  # K = 3: the first layer after the deepstack injections (layers 0, 1, 2)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_vl()


@pytest.fixture(scope="module")
def engine(model):
    return SDRPN(model, RPN.from_model(model, START, BLOCKS), processor=image_processor(MAX_TOKENS))


@pytest.fixture(scope="module")
def moe_engine():
    model = tiny_qwen3_vl(moe=True)
    return SDRPN(model, RPN.from_model(model, START, BLOCKS), processor=image_processor(MAX_TOKENS))


def inputs_for(rows):
    return qwen3_inputs(qwen_images(SIZES)[rows], TEXTS[rows], MAX_TOKENS)


def vision_of(adapter, inputs):
    return {name: inputs[name] for name in adapter.vision_input_names}




def generate(engine, rows, method, strategy=None):
    images = qwen_images(SIZES)[rows]
    inputs = inputs_for(rows)
    return engine.generate(**inputs, images=images, method=method, roi_logits=forced_maps(inputs, BOXES[rows]),
                           max_new_tokens=NEW_TOKENS, output_logits=True, return_roi=True, strategy=strategy)




def largest_logit_difference(ours, theirs) -> float:
    return max(float((a - b)[torch.isfinite(b)].abs().max()) for a, b in zip(ours, theirs))


# -- the adapter -------------------------------------------------------------------------------------


def test_the_family_facts(model):
    adapter = adapter_for(model)
    assert adapter.family == "qwen3_vl" and adapter.cell_size == 32
    assert adapter.injection_layers == tuple(range(DEEPSTACK_LAYERS))
    assert adapter.rpn_uses_rope and not adapter.rpn_uses_final_norm
    assert adapter.layer(0).self_attn.q_norm is not None  # Qwen3's per-head q/k norms
    # No Qwen3-VL release: the authors' Qwen2.5-VL inference rules (masked upscaling, threshold 0.25, ...).
    assert adapter.roi_defaults == Qwen2_5_VLAdapter.roi_defaults and adapter.default_threshold == 0.25
    assert adapter.roi_block_ids == ((VISION_START,), (VISION_END,))


def test_embedding_places_each_image_its_deepstack_features_and_3d_positions(model):
    adapter = adapter_for(model)
    inputs = inputs_for(slice(0, 3))
    vision = vision_of(adapter, inputs)
    embedded = adapter.embed(inputs["input_ids"], vision, inputs["attention_mask"])
    grids = inputs["image_grid_thw"]
    assert embedded.image_lengths.tolist() == (grids.prod(dim=1) // 4).tolist()
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=grids, attention_mask=inputs["attention_mask"])
    assert torch.equal(embedded.rope_position_ids, expected)
    last = embedded.position_ids[:, -1]
    assert torch.equal(embedded.rope_position_ids[:, :, -1], (last + embedded.rope_delta)[None].expand(3, -1))

    # Deepstack map i at the image tokens (row-major, image after image), zeros elsewhere.
    with torch.no_grad():
        output = model.model.get_image_features(inputs["pixel_values"], grids)
    is_image = inputs["input_ids"] == IMAGE
    assert sorted(embedded.layer_additions) == list(range(DEEPSTACK_LAYERS))
    for layer, features in enumerate(output.deepstack_features):
        features = features if isinstance(features, torch.Tensor) else torch.cat(features)
        additions = embedded.layer_additions[layer]
        assert additions.shape == embedded.inputs_embeds.shape
        assert torch.equal(additions[is_image], features)
        assert not additions[~is_image].any()


def test_image_features_without_deepstack_are_refused(model):
    adapter = adapter_for(model)
    inputs = inputs_for(slice(0, 1))
    vision = vision_of(adapter, inputs)
    with pytest.raises(ValueError, match="encode_views_full"):
        adapter.embed(inputs["input_ids"], vision, image_features=adapter.encode_views(vision))
    full = adapter.embed(inputs["input_ids"], vision, image_features=adapter.encode_views_full(vision))
    plain = adapter.embed(inputs["input_ids"], vision)
    assert torch.equal(full.inputs_embeds, plain.inputs_embeds)
    assert all(torch.equal(full.layer_additions[i], plain.layer_additions[i]) for i in plain.layer_additions)


@pytest.mark.parametrize("layout", ["concatenated", "per-image"])
def test_both_deepstack_layouts_of_transformers_are_read(model, monkeypatch, layout):
    """transformers 5.17 returns each deepstack map concatenated over the images, 5.25 a tuple of
    per-image maps: the adapter gives the same per-view features for both."""
    adapter = adapter_for(model)
    vision = vision_of(adapter, inputs_for(slice(0, 3)))
    expected_features, expected = adapter.encode_views_full(vision)
    real = model.model.get_image_features

    def relaid(*args, **kwargs):
        output = real(*args, **kwargs)
        maps = [torch.cat(list(m)) if not isinstance(m, torch.Tensor) else m for m in output.deepstack_features]
        counts = [feature.shape[0] for feature in output.pooler_output]
        output.deepstack_features = maps if layout == "concatenated" else [tuple(m.split(counts)) for m in maps]
        return output

    monkeypatch.setattr(model.model, "get_image_features", relaid)
    features, injected = adapter.encode_views_full(vision)
    assert all(torch.equal(a, b) for a, b in zip(features, expected_features))
    assert sorted(injected) == sorted(expected) == list(range(DEEPSTACK_LAYERS))
    for layer in expected:
        assert [tuple(v.shape) for v in injected[layer]] == [tuple(f.shape) for f in features]
        assert all(torch.equal(a, b) for a, b in zip(injected[layer], expected[layer]))


# -- plain generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("rows", [slice(0, 3), slice(1, 2)], ids=["batch3", "batch1"])
def test_baseline_equals_model_generate(engine, moe_engine, moe, rows):
    engine = moe_engine if moe else engine
    inputs = inputs_for(rows)
    expected = engine.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
    got = engine.generate(**inputs, max_new_tokens=NEW_TOKENS, method="baseline", output_logits=True)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (ours, theirs) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5, msg=f"step {step}")


def test_baseline_batch_equals_each_row_alone(engine):
    together = engine.generate(**inputs_for(slice(0, 3)), max_new_tokens=NEW_TOKENS, method="baseline",
                               output_logits=True)
    for row in range(len(SIZES)):
        alone = engine.generate(**inputs_for(slice(row, row + 1)), max_new_tokens=NEW_TOKENS, method="baseline",
                                output_logits=True)
        for step, (a, b) in enumerate(zip(together.logits, alone.logits)):
            torch.testing.assert_close(a[row], b[0], rtol=1e-4, atol=1e-5, msg=f"row {row}, step {step}")


# -- the RPN and the attention rows: q/k norms ---------------------------------------------------------


@pytest.mark.parametrize("row", range(len(SIZES)))
def test_rpn_scores_and_attention_rows_are_the_layers_eager_attention(row):
    """With q/k norms of their own (random weights, so that leaving them out shows), a fresh RPN's
    map is the mean over heads of the log of layer K+T-1's eager attention weights of the last
    prompt token against the image tokens, up to a constant; and ``attention_qk``'s q.k rows are that
    layer's attention logits."""
    model = tiny_qwen3_vl(attn_implementation="eager")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
    adapter = adapter_for(model)
    rpn = RPN.from_model(model, START, BLOCKS)
    head = START + BLOCKS - 1
    inputs = inputs_for(slice(row, row + 1))
    with torch.no_grad():
        embedded = adapter.embed(inputs["input_ids"], vision_of(adapter, inputs))
        rope, positions = embedded.rope_position_ids, embedded.position_ids
        hidden = adapter.run_layers(embedded.inputs_embeds, 0, START, positions, None, None, rope,
                                    embedded.layer_additions)
        image = (inputs["input_ids"][0] == IMAGE).nonzero().flatten()[None]
        logits = rpn(hidden, hidden.shape[1] - 1, image, position_ids=positions, rope_position_ids=rope)[0]
        attentions = model(**inputs, output_attentions=True).attentions
        entering = adapter.run_layers(hidden, START, head, positions, None, None, rope)
        q, k = adapter.attention_qk(head, entering, positions, rope)
    expected = attentions[head][0, :, -1, image[0]].log().mean(dim=0)
    torch.testing.assert_close(logits - logits.mean(), expected - expected.mean(), rtol=1e-4, atol=1e-4)
    assert "q_norm.weight" in rpn.state_dict() and "norm.weight" not in rpn.state_dict()

    # attention_qk (project_qk with the q/k norms, M-RoPE): softmax of q.k / sqrt(d), causal, grouped
    # keys repeated, is the layer's attention.
    k = k.repeat_interleave(adapter.num_heads // adapter.num_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / adapter.head_dim**0.5
    length = scores.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    torch.testing.assert_close(weights, attentions[head], rtol=1e-4, atol=1e-6)


# -- two stages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [slice(0, 3), slice(0, 1), slice(1, 2)], ids=["batch3", "two-blobs", "one-blob"])
def test_fast_path_equals_the_reference(engine, rows):
    fast_equals_reference(partial(generate, engine), rows)


def test_moe_fast_path_equals_the_reference(moe_engine):
    fast_equals_reference(partial(generate, moe_engine), slice(0, 3))


def test_the_default_rule_is_masked_upscaling(engine):
    result = generate(engine, slice(0, 3), "sdrpn")
    assert result.roi.mode.tolist() == [MODE_MASK, MODE_MASK, MODE_NONE]
    reference = generate(engine, slice(0, 1), "sdrpn-reference").roi[0]
    assert 0 < reference.keep.sum() < reference.keep.size  # row 0's two blobs: part of the RoI view's grid
    assert engine.options.threshold == 0.25 and engine.options.edge_sink_above == 768


def test_without_a_roi_the_fast_path_equals_the_reference_and_the_baseline(engine):
    without_roi_equals_reference_and_baseline(partial(generate, engine), slice(0, 3))


def test_a_batch_equals_each_row_alone(engine):
    batch_equals_each_row_alone(partial(generate, engine), 3)


def test_the_reference_stage_2_is_the_models_own_two_image_forward(engine):
    """The oracle's oracle: with the box rule every RoI token is kept, so the reference's stage-2
    sequence is a plain two-image prompt ``<vs> image <vs> RoI <ve> <ve> question``, and its first
    logits are the model's own forward pass on it (deepstack of both views, get_rope_index)."""
    adapter, model = engine.adapter, engine.model
    images = qwen_images(SIZES)[:1]
    inputs = inputs_for(slice(0, 1))
    result = engine.generate(**inputs, images=images, method="sdrpn-reference", strategy="box",
                             roi_logits=forced_maps(inputs, [[(9, 5, 12, 8)]]), max_new_tokens=1,
                             output_logits=True, return_roi=True)
    roi = result.roi[0]
    assert roi.mode == "box" and roi.keep.all()
    x0, y0, width, height = roi.crop
    roi_view = image_processor(MAX_TOKENS)(images=[images[0].crop((x0, y0, x0 + width, y0 + height))],
                                           return_tensors="pt")
    ids = inputs["input_ids"][0]
    image_end = int((ids == IMAGE).nonzero().max()) + 1
    roi_tokens = int(roi_view["image_grid_thw"].prod()) // 4
    sequence = torch.cat([ids[:image_end], torch.tensor([VISION_START] + [IMAGE] * roi_tokens + [VISION_END]),
                          ids[image_end:]])[None]
    with torch.no_grad():
        expected = model(input_ids=sequence, mm_token_type_ids=(sequence == IMAGE).int(),
                         pixel_values=torch.cat([inputs["pixel_values"], roi_view["pixel_values"]]),
                         image_grid_thw=torch.cat([inputs["image_grid_thw"], roi_view["image_grid_thw"]])).logits[:, -1]
    assert int(result.visual_tokens[0]) == int((sequence == IMAGE).sum())
    torch.testing.assert_close(result.logits[0], expected, rtol=1e-4, atol=1e-5)


def test_stage_2_needs_the_roi_views_deepstack_features(engine, monkeypatch):
    """The RoI tokens must get the RoI view's deepstack features after layers 0-2, as in a plain
    two-image call: with them the fast path equals the reference, with them zeroed it does not."""
    adapter = engine.adapter
    rows = slice(0, 3)
    reference = generate(engine, rows, "sdrpn-reference")
    fast = generate(engine, rows, "sdrpn")
    assert_same_logits(fast.logits, reference.logits)

    roi_views = set()  # the RoI views' pixel tensors (the original views' come from the processor call)
    roi_vision_input, encode_views_full = adapter.roi_vision_input, adapter.encode_views_full

    def marked(*args, **kwargs):
        vision = roi_vision_input(*args, **kwargs)
        roi_views.add(id(vision["pixel_values"]))
        return vision

    def without_roi_deepstack(vision):
        features, injected = encode_views_full(vision)
        if id(vision["pixel_values"]) in roi_views:
            injected = {layer: [torch.zeros_like(view) for view in views] for layer, views in injected.items()}
        return features, injected

    monkeypatch.setattr(adapter, "roi_vision_input", marked)
    monkeypatch.setattr(adapter, "encode_views_full", without_roi_deepstack)
    dropped = generate(engine, rows, "sdrpn")
    assert roi_views  # the RoI views went through the patched encoder
    assert largest_logit_difference(dropped.logits, reference.logits) > 1e-2  # about 0.08 here
    # Rows without a RoI are untouched.
    torch.testing.assert_close(dropped.logits[0][2], reference.logits[0][2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("start", range(DEEPSTACK_LAYERS))
def test_k_inside_the_injection_layers_is_refused(model, start):
    rpn = RPN.from_model(model, start, 2)
    with pytest.raises(ValueError, match=rf"K={start}.*layers \[0, 1, 2\].*K >= 3"):
        SDRPN(model, rpn, processor=image_processor(MAX_TOKENS))


def test_sync_free_is_refused_with_the_reason(model):
    with pytest.raises(ValueError, match="sync_free=False"):
        SDRPN(model, RPN.from_model(model, START, BLOCKS), processor=image_processor(), sync_free=True)
