"""The ops under torch.compile(fullgraph=True) and on meta tensors (fake kernels)."""

from __future__ import annotations

import pytest
import torch

import sdrpn.ops as ops
from sdrpn.ops import testing


def rpn_stage(q: torch.Tensor, k: torch.Tensor):
    logits = ops.rpn_scores(q, k, num_heads=4).reshape(q.shape[0], 24, 24)
    return ops.roi_mask(logits, 0.15)


def rpn_stage_with_boxes(q: torch.Tensor, k: torch.Tensor):
    prob, mask = rpn_stage(q, k)
    labels = ops.connected_components(mask)
    return (prob, mask, labels, *ops.component_boxes(labels, max_components=8))


def stage_inputs(seed: int = 0):
    return testing.random_qk(2, 1, 576, 64, torch.float32, torch.Generator().manual_seed(seed))


def assert_same_outputs(compiled, eager):
    assert len(compiled) == len(eager)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, rtol=0, atol=testing.PROB_ATOL)


# One representative, non-degenerate input per op.
OPCHECK_CASES = [
    "rpn_scores[many_queries_bfloat16]",
    "roi_mask[8x24x24_blur]",
    "connected_components[roi_maps_8x24x24_c8]",
    "component_boxes[random_8x24x24_default]",
    "pack_tokens[bfloat16_p0.3]",
    "pack_tokens_padded[float16_p0.3_cap100]",
    "unpack_tokens[float32_p0.3]",
]


@pytest.mark.parametrize("case_id", OPCHECK_CASES)
def test_opcheck(extension, case_id):
    # torch's own consistency checks of a custom op: schema, fake kernel against the real kernel
    # (shapes, dtypes, strides), autograd registration and AOT dispatch with dynamic shapes.
    case = next(case for case in testing.validation_cases() if case.id == case_id)
    torch.library.opcheck(getattr(torch.ops.sdrpn, case.op).default, case.arguments(seed=0))


def test_rpn_scores_and_roi_mask_compile_fullgraph():
    # Runs on the fake kernels with the extension and traces the references without it.
    compiled = torch.compile(rpn_stage, fullgraph=True)
    q, k = stage_inputs()
    assert_same_outputs(compiled(q, k), rpn_stage(q, k))


def test_whole_stage_compiles_fullgraph(extension):
    compiled = torch.compile(rpn_stage_with_boxes, fullgraph=True)
    for seed in (0, 1):  # a second call with new values reuses the graph
        q, k = stage_inputs(seed)
        assert_same_outputs(compiled(q, k), rpn_stage_with_boxes(q, k))


def test_pack_tokens_dynamic_size_compiles_fullgraph(extension):
    def pack_and_scale(features, keep):
        packed, offsets = ops.pack_tokens(features, keep)
        return packed * 2, offsets, ops.pack_tokens_padded(features, keep, 6)

    # aot_eager traces exactly like the default backend (fake kernels, unbacked output size) but
    # skips the slow C++ code generation of the surrounding arithmetic.
    compiled = torch.compile(pack_and_scale, fullgraph=True, backend="aot_eager")
    features, keep = testing.random_tokens(3, 10, 4, 0.5, torch.float32, torch.Generator().manual_seed(0))
    (packed, offsets, padded), expected = compiled(features, keep), pack_and_scale(features, keep)
    assert torch.equal(packed, expected[0]) and torch.equal(offsets, expected[1])
    assert all(torch.equal(a, b) for a, b in zip(padded, expected[2]))


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_meta_tensors_give_output_shapes(extension):
    assert ops.rpn_scores(meta(2, 3, 64), meta(2, 50, 64), 4).shape == (2, 50)
    prob, mask = ops.roi_mask(meta(2, 5, 7, dtype=torch.bfloat16), 0.5)
    assert (prob.dtype, mask.dtype, prob.shape, mask.shape) == (
        torch.float32,
        torch.bool,
        (2, 5, 7),
        (2, 5, 7),
    )
    labels = ops.connected_components(meta(2, 5, 7, dtype=torch.bool))
    assert labels.dtype == torch.int32 and labels.shape == (2, 5, 7) and labels.device.type == "meta"
    boxes, areas, valid, counts, overflow = ops.component_boxes(meta(2, 5, 7, dtype=torch.int32), 9)
    assert [t.shape for t in (boxes, areas, valid, counts, overflow)] == [
        (2, 9, 4),
        (2, 9),
        (2, 9),
        (2,),
        (2,),
    ]
    packed, lengths = ops.pack_tokens_padded(
        meta(2, 5, 3, dtype=torch.float16), meta(2, 5, dtype=torch.bool), 4
    )
    assert packed.shape == (2, 4, 3) and packed.dtype == torch.float16 and lengths.shape == (2,)
    restored = ops.unpack_tokens(meta(6, 3), meta(3, dtype=torch.int64), meta(2, 5, dtype=torch.bool))
    assert restored.shape == (2, 5, 3)


def test_meta_pack_tokens_needs_fake_tensors(extension):
    # Its output size depends on the data: plain meta tensors cannot express that.
    with pytest.raises(RuntimeError, match="data-dependent"):
        ops.pack_tokens(meta(2, 5, 3), meta(2, 5, dtype=torch.bool))


def test_fake_kernels_validate_like_the_compiled_kernels(extension):
    # Raw ops raise RuntimeError whichever kernel runs; the wrappers raise TypeError / ValueError.
    with pytest.raises(RuntimeError, match="sdrpn.connected_components: `mask` must have dtype bool"):
        torch.ops.sdrpn.connected_components(meta(2, 5, 7), 8)
    with pytest.raises(RuntimeError, match="sdrpn.component_boxes: `max_components` must be"):
        torch.ops.sdrpn.component_boxes(meta(2, 5, 7, dtype=torch.int32), 0, 1, 4, 3, 225)


def test_proposal_with_the_strongest_regions_compiles_fullgraph(extension):
    from sdrpn.roi import RoIOptions, propose

    options = RoIOptions(max_regions=2)
    compiled = torch.compile(lambda logits: propose(logits, (24, 24), options), fullgraph=True)
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.full((3, 24, 24), -6.0)
        for corner in (2, 9, 16):  # three blobs of random strength per map
            logits[:, corner:corner + 4, corner:corner + 5] = torch.rand(3, 1, 1, generator=generator) * 4
        logits = (logits + torch.randn(logits.shape, generator=generator) * 0.3).flatten(1)
        got, expected = compiled(logits), propose(logits, (24, 24), options)
        assert expected.counts.max() == 2  # the cap is reached, so the choice is exercised
        for name in expected.__dataclass_fields__:
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
