"""``SDRPN(..., compile=True)`` on Qwen2.5-VL, whose views have grids of their own: the compiled stage
1 gives the eager RPN logits and RoIs, and given each row's image-token count on the host, the RPN
and its RoI post-processing trace as one graph (``fullgraph=True``), with the pruning scores too.

Compiled with the ``aot_eager`` backend: it traces as the default one does (dynamo, then AOT
autograd on fake tensors) but skips inductor's C++ code generation, minutes on a small CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

from helpers.tiny_qwen import qwen_images, qwen_inputs, tiny_qwen2_5_vl
from helpers.tiny_qwen_rpn import structured_rpn
from sdrpn import SDRPN
from sdrpn.engine.stage1 import rpn_proposal

SIZES = [(400, 300), (200, 560)]  # grids 6 x 9 and 13 x 4 at the helper's 64-token budget
TEXTS = [([5, 6, 7], [8, 9, 10]), ([12], [13, 14])]
COMPILE = functools.partial(torch.compile, backend="aot_eager")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces from scratch (and leaves no compiled graphs behind)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def engine():
    model = tiny_qwen2_5_vl()
    return SDRPN(model, structured_rpn(model))


@pytest.fixture(scope="module")
def inputs():
    return qwen_inputs(qwen_images(SIZES, seed=0), TEXTS)


@pytest.fixture(scope="module")
def stage1_arguments(engine, inputs):
    """What stage 1 gives :func:`rpn_proposal`, recorded on an eager run."""
    recorded = []

    def record(*arguments):
        recorded.append(arguments)
        return rpn_proposal(*arguments)

    engine.proposal_fn = record
    try:
        engine.predict_roi(**inputs)
    finally:
        engine.proposal_fn = rpn_proposal
    return recorded[0]


def test_compiled_stage1_gives_the_eager_logits_and_rois(engine, inputs, monkeypatch):
    monkeypatch.setattr(torch, "compile", COMPILE)
    compiled = SDRPN(engine.adapter, engine.rpn, compile=True)
    assert compiled.proposal_fn is not rpn_proposal
    got, expected = compiled.predict_roi(**inputs).proposal, engine.predict_roi(**inputs).proposal
    assert torch.isfinite(expected.logits).sum() == 54 + 52  # each row's own grid, the rest -inf
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    for name in ("mask", "boxes", "valid", "region", "mode"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_stage1_gives_the_rpn_host_counts(stage1_arguments):
    """Stage 1 knows each row's image-token count from the grids: the RPN reads nothing back."""
    grids, lengths = stage1_arguments[5], stage1_arguments[9]
    assert lengths == [rows * cols for rows, cols in grids] and all(type(count) is int for count in lengths)


def test_the_rpn_traces_as_one_graph_given_host_counts(stage1_arguments):
    rpn, hidden, image_start, attention_mask, position_ids, grids, _, _, rope, lengths, _ = stage1_arguments
    question_start = hidden.shape[1] - 3  # the pruning scores of the last tokens, as above 1024 tokens
    arguments = (hidden, hidden.shape[1] - 1, image_start, attention_mask, position_ids, rope)
    with torch.inference_mode():
        expected = rpn(*arguments, torch.tensor(lengths), question_start)  # the counts as a tensor, eager
        got = COMPILE(rpn, fullgraph=True)(*arguments, lengths, question_start)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_proposal_traces_as_one_graph_given_host_counts(stage1_arguments):
    with torch.inference_mode():
        expected, _ = rpn_proposal(*stage1_arguments)
        got, _ = COMPILE(rpn_proposal, fullgraph=True, dynamic=False)(*stage1_arguments)
    for name in ("logits", "prob", "mask", "boxes", "valid", "counts", "cells", "region", "mode"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0, msg=name)
