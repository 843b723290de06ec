"""The tiny model's auxiliary grounding loss: the rows it reads, its value, and that it teaches."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from sdrpn.data.synthetic import generate_dataset
from sdrpn.errors import UserError
from sdrpn.models import adapter_for
from sdrpn.testbed import batches
from sdrpn.testbed import train_model as training
from sdrpn.testbed.grounding_loss import grounding_loss, tap_attention
from sdrpn.testbed.tiny_model import build_model, build_processor
from test_tiny_model import MICRO, OPTIONS

HEADS = (1,)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    generate_dataset(out, 12, 4, 2, seed=5, progress=False)
    return out


def micro_setup(data, seed=0):
    processor = build_processor(MICRO)
    model = build_model(MICRO, seed=seed)
    model.set_attn_implementation("eager")
    adapter = adapter_for(model, processor)
    return model, processor, adapter, batches.QuestionSet(data, "train", processor)


def answer_rows(batch, row, tokens):
    """Start of the base view and the positions of the fed-back answer tokens, counted by hand."""
    question = batch.questions[row]
    roi = 0 if batch.roi_keep is None else int(batch.roi_keep[row].sum())
    first = len(question.prefix) + tokens + roi + len(question.suffix)
    return len(question.prefix), list(range(first, first + len(question.answer) - 1))


@pytest.mark.parametrize("mode", ["single", "mask"])
def test_loss_is_the_log_share_of_image_attention_inside_the_box(data, mode):
    model, processor, adapter, questions = micro_setup(data)
    batch = batches.make_batch(questions, [0, 1, 2], mode, processor, adapter.geometry, adapter.image_grid,
                               np.random.default_rng(1), max_grow=1)
    rows, cols = adapter.image_grid
    tokens = rows * cols
    length = max(len(q.prefix) + len(q.suffix) + len(q.answer) - 1 for q in batch.questions) + 2 * tokens
    weights = torch.zeros(3, MICRO.text_heads, length, length)
    expected = []
    for row, question in enumerate(batch.questions):
        start, queries = answer_rows(batch, row, tokens)
        x0, y0, x1, y1 = batches.box_cells(question.box, question.image_size, adapter.geometry, adapter.image_grid)
        inside = torch.zeros(rows, cols, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        # Each query row: 0.3 on text, the image part split 1:3 between the box and the rest.
        image = torch.where(inside.flatten(), 0.7 * 0.25 / inside.sum(), 0.7 * 0.75 / (~inside).sum())
        for query in queries:
            weights[row, :, query, 0] = 0.3
            weights[row, :, query, start:start + tokens] = image
        expected.append(-math.log(0.25))
    value = grounding_loss(weights, batch, HEADS, adapter.geometry, adapter.image_grid)
    assert value.item() == pytest.approx(sum(expected) / 3, rel=1e-4)
    weights[:, HEADS[0]] *= 0.5  # the share, not the mass, counts
    assert grounding_loss(weights, batch, HEADS, adapter.geometry, adapter.image_grid).item() == pytest.approx(
        value.item(), rel=1e-4)


def test_tapped_weights_are_the_eager_attentions_of_the_training_forward(data):
    model, processor, adapter, questions = micro_setup(data, seed=2)
    model.eval()
    batch = batches.make_batch(questions, [0, 1], "single", processor, adapter.geometry, adapter.image_grid)
    layer = MICRO.text_layers - 1
    with torch.no_grad(), tap_attention(model, layer) as tap:
        training.answer_logits(model, adapter, batch)
    question = batch.questions[0]
    ids = torch.cat([question.prefix, torch.full((adapter.image_length,), processor.image_token_id),
                     question.suffix, question.answer[:-1]])
    with torch.no_grad():
        attentions = model(input_ids=ids[None], pixel_values=batch.pixel_values[:1], output_attentions=True).attentions
    torch.testing.assert_close(tap.weights[0, :, :len(ids), :len(ids)], attentions[layer][0], atol=1e-5, rtol=1e-5)


def test_tapping_needs_eager_attention(data):
    model = build_model(MICRO)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"), tap_attention(model, 0):
        pass


def test_a_few_steps_move_the_heads_attention_into_the_box(data):
    torch.manual_seed(0)
    model, processor, adapter, questions = micro_setup(data)
    model.train()
    batch = batches.make_batch(questions, list(range(8)), "single", processor, adapter.geometry, adapter.image_grid)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        with tap_attention(model, 1) as tap:
            training.answer_logits(model, adapter, batch)
        loss = grounding_loss(tap.weights, batch, HEADS, adapter.geometry, adapter.image_grid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


def test_training_with_the_loss_logs_it(data, tmp_path):
    torch.set_num_threads(1)
    options = dataclasses.replace(OPTIONS, grounding_weight=0.5, grounding_layer=1, grounding_heads=HEADS)
    summary = training.train_model(data, tmp_path / "model", options, spec=MICRO, progress=False)
    assert summary["history"][-1]["train_grounding_loss"] > 0
    assert json.loads((tmp_path / "model" / "training.json").read_text())["recipe"]["grounding_weight"] == 0.5


@pytest.mark.parametrize("changes", [{"grounding_layer": 3}, {"grounding_heads": (0, 2)}])
def test_heads_outside_the_model_are_refused(data, tmp_path, changes):
    options = dataclasses.replace(OPTIONS, grounding_weight=0.5, **changes)
    with pytest.raises(UserError, match="not in the 3 layers of 2 heads"):
        training.train_model(data, tmp_path / "model", options, spec=MICRO, progress=False)


def test_a_negative_weight_is_refused():
    with pytest.raises(UserError, match="grounding weight"):
        training.TrainModelOptions(grounding_weight=-1.0)
