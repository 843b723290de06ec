"""Semantics of the sdrpn ops, checked for every backend against independent oracles.

Oracles: skimage.measure.label (connected components), a plain Python loop over
skimage.measure.regionprops (boxes), float64 NumPy/SciPy (scores, blur) and Python loops (packing),
plus hand-checked cases for every filter branch of component_boxes. The "reference" backend is
the pure-PyTorch implementation, so these tests also pin down sdrpn.ops.reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from ops_oracles import assert_boxes_match_regionprops, assert_labels_match_skimage, skimage_labels

from sdrpn.ops import reference, testing

# ------------------------------------------------------------------------------------------------
# connected_components


ADVERSARIAL_SHAPES = [(1, 1), (1, 13), (13, 1), (2, 2), (24, 24), (31, 17), (64, 64), (256, 256)]


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", ADVERSARIAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(testing.ADVERSARIAL_MASKS))
def test_connected_components_adversarial(backend, name, shape, connectivity):
    mask = testing.ADVERSARIAL_MASKS[name](*shape).unsqueeze(0)
    assert_labels_match_skimage(backend, mask, connectivity)


# Every height and width class from 1 to 256: tiny, odd, the LLaVA grid, powers of two and around.
GRID_SIDES = [1, 2, 3, 7, 24, 33, 64, 129, 256]


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("width", GRID_SIDES)
@pytest.mark.parametrize("height", GRID_SIDES)
def test_connected_components_random_sizes(backend, height, width, connectivity):
    generator = torch.Generator().manual_seed(height * 1000 + width)
    # Densities from empty to full within one batch, around the percolation thresholds.
    densities = torch.tensor([0.0, 0.3, 0.45, 0.6, 1.0]).view(5, 1, 1)
    mask = torch.rand(5, height, width, generator=generator) < densities
    assert_labels_match_skimage(backend, mask, connectivity)


def test_connected_components_blobs_and_noncontiguous(backend):
    generator = torch.Generator().manual_seed(0)
    assert_labels_match_skimage(backend, testing.blob_masks(4, 64, 64, generator), 8)
    mask = testing.noncontiguous(testing.random_masks(3, 24, 24, 0.5, generator))
    assert not mask.is_contiguous()
    assert_labels_match_skimage(backend, mask, 8)
    # A transposed view is another kind of non-contiguous input.
    assert_labels_match_skimage(backend, testing.random_masks(2, 17, 30, 0.5, generator).transpose(1, 2), 4)


def test_connected_components_empty_batch(backend):
    labels = backend("connected_components", torch.zeros(0, 5, 7, dtype=torch.bool), 8)
    assert labels.shape == (0, 5, 7) and labels.dtype == torch.int32


def test_adversarial_generators_are_what_they_claim():
    assert skimage_labels(testing.spiral(64, 64).unsqueeze(0), 4).max() == 1
    assert testing.spiral(64, 64).sum() > 64 * 64 // 3  # long: it really winds inwards
    assert skimage_labels(testing.checkerboard(8, 8).unsqueeze(0), 8).max() == 1
    assert skimage_labels(testing.checkerboard(8, 8).unsqueeze(0), 4).max() == 32
    assert skimage_labels(testing.diagonals(9, 9).unsqueeze(0), 8).max() == 5
    assert skimage_labels(testing.nested_u(24, 24).unsqueeze(0), 8).max() == 6
    assert skimage_labels(testing.comb(10, 10).unsqueeze(0), 4).max() == 1
    assert skimage_labels(testing.border_pixels(9, 9).unsqueeze(0), 8).max() == 8


# ------------------------------------------------------------------------------------------------
# component_boxes


@pytest.mark.parametrize("settings", list(testing.BOX_FILTERS.values()), ids=list(testing.BOX_FILTERS))
def test_component_boxes_match_regionprops(backend, settings):
    generator = torch.Generator().manual_seed(1)
    masks = torch.cat(
        [
            testing.random_masks(4, 24, 24, 0.3, generator),
            testing.blob_masks(4, 24, 24, generator),
            torch.stack([make(24, 24) for make in testing.ADVERSARIAL_MASKS.values()]),
        ]
    )
    assert_boxes_match_regionprops(backend, reference.connected_components(masks, 8), settings)


def labels_from_pixels(height: int, width: int, components: list[list[tuple[int, int]]]) -> torch.Tensor:
    """(1, H, W) labels with component i + 1 on the (y, x) pixels of components[i]."""
    labels = torch.zeros(1, height, width, dtype=torch.int32)
    for label, pixels in enumerate(components, start=1):
        for y, x in pixels:
            labels[0, y, x] = label
    return labels


def boxes_of(backend, labels, **settings):
    settings = {"max_components": 8, "drop_area": 1, "min_area": 4, "grow_to": 3, "max_area": 225, **settings}
    boxes, areas, valid, counts, overflow = backend("component_boxes", labels, *settings.values())
    count = counts[0].item()
    assert valid[0].tolist() == [True] * count + [False] * (settings["max_components"] - count)
    assert boxes[0, count:].eq(0).all() and areas[0, count:].eq(0).all()
    return boxes[0, :count].tolist(), areas[0, :count].tolist(), overflow[0].item()


def test_boxes_drop_noise(backend):
    labels = labels_from_pixels(10, 10, [[(1, 1)], [(5, 5), (5, 6), (6, 5), (6, 6)], [(8, 8)]])
    assert boxes_of(backend, labels) == ([[5, 5, 7, 7]], [4], 0)
    # drop_area = 0 keeps single pixels, grown to 3x3 ([0, 3) from centre 1.5) except at the far
    # border, where the end is clamped at 9 = W - 1 ([7, 9) from centre 8.5);
    # drop_area = 4 also drops the 2x2 square.
    assert boxes_of(backend, labels, drop_area=0) == (
        [[0, 0, 3, 3], [5, 5, 7, 7], [7, 7, 9, 9]],
        [1, 4, 1],
        0,
    )
    assert boxes_of(backend, labels, drop_area=4) == ([], [], 0)


def test_boxes_drop_huge(backend):
    square = [(y, x) for y in range(15) for x in range(15)]  # area 225
    labels = labels_from_pixels(20, 20, [square, [(18, 18), (18, 19), (19, 18), (19, 19)]])
    assert boxes_of(backend, labels) == ([[0, 0, 15, 15], [18, 18, 20, 20]], [225, 4], 0)
    assert boxes_of(backend, labels, max_area=224) == ([[18, 18, 20, 20]], [4], 0)


def test_boxes_grow_small_around_centre(backend):
    # Two pixels in a row: box x [5, 7), y [5, 6). Width max(3, 2 + 1) = 3 around x centre 6:
    # [trunc(4.5), trunc(7.5)) = [4, 7); height 3 around y centre 5.5: [4, 7).
    labels = labels_from_pixels(12, 12, [[(5, 5), (5, 6)]])
    assert boxes_of(backend, labels) == ([[4, 4, 7, 7]], [2], 0)
    # Width 4 around x centre 6: [4, 8); around y centre 5.5: [trunc(3.5), trunc(7.5)) = [3, 7).
    assert boxes_of(backend, labels, grow_to=4) == ([[4, 3, 8, 7]], [2], 0)
    # A component of exactly min_area keeps its tight box.
    assert boxes_of(backend, labels, min_area=2) == ([[5, 5, 7, 6]], [2], 0)


def test_boxes_grow_wider_than_grow_to(backend):
    # A 3-pixel column: box x [4, 5), y [2, 5). Height max(3, 3 + 1) = 4 around y centre 3.5:
    # [trunc(1.5), trunc(5.5)) = [1, 5); width 3 around x centre 4.5: [3, 6).
    labels = labels_from_pixels(12, 12, [[(2, 4), (3, 4), (4, 4)]])
    assert boxes_of(backend, labels) == ([[3, 1, 6, 5]], [3], 0)


def test_boxes_grow_small_clamped_at_borders(backend):
    top_left = [(0, 0), (0, 1)]
    bottom_right = [(9, 8), (9, 9)]
    top_right = [(0, 9), (1, 9), (2, 9)]
    labels = labels_from_pixels(10, 10, [top_left, top_right, bottom_right])
    expected = [
        # x: centre 1, width 3 -> [trunc(-0.5), trunc(2.5)) = [0, 2); y: centre 0.5 -> [0, 2).
        [0, 0, 2, 2],
        # x: centre 9.5, width 3 -> [8, min(9, 11)) = [8, 9), missing column 9;
        # y: centre 1.5, height 4 -> [trunc(-0.5), trunc(3.5)) = [0, 3).
        [8, 0, 9, 3],
        # x: centre 9, width 3 -> [trunc(7.5), min(9, 10)) = [7, 9); y: centre 9.5 -> [8, 9).
        [7, 8, 9, 9],
    ]
    assert boxes_of(backend, labels) == (expected, [2, 3, 2], 0)


def test_boxes_grow_on_tiny_grids(backend):
    labels = labels_from_pixels(2, 5, [[(0, 0), (0, 1)], [(1, 4)]])
    # Component 1: x centre 1 -> [0, 2); y centre 0.5, end clamped at H - 1 = 1 -> [0, 1).
    # Component 2: x centre 4.5 -> [3, 4); y centre 1.5 -> [0, 1): the box misses its pixel.
    assert boxes_of(backend, labels, drop_area=0) == ([[0, 0, 2, 1], [3, 0, 4, 1]], [2, 1], 0)
    # grow_to 7: x [trunc(-2.5), min(4, 4)) = [0, 4) and [trunc(1), min(4, 8)) = [1, 4).
    assert boxes_of(backend, labels, drop_area=0, grow_to=7) == ([[0, 0, 4, 1], [1, 0, 4, 1]], [2, 1], 0)
    # On a 1x1 grid both ends clamp to 0: an empty box.
    one_pixel = labels_from_pixels(1, 1, [[(0, 0)]])
    assert boxes_of(backend, one_pixel, drop_area=0) == ([[0, 0, 0, 0]], [1], 0)


def test_boxes_overflow_counts_kept_components_only(backend):
    pixels = [[(0, 2 * i), (1, 2 * i)] for i in range(5)] + [[(4, 0)]]  # 5 kept + 1 noise
    labels = labels_from_pixels(6, 10, pixels)
    boxes, areas, overflow = boxes_of(backend, labels, max_components=3, min_area=0)
    assert boxes == [[0, 0, 1, 2], [2, 0, 3, 2], [4, 0, 5, 2]] and areas == [2, 2, 2] and overflow == 2
    assert boxes_of(backend, labels, max_components=5, min_area=0)[2] == 0


def test_boxes_label_gaps_and_out_of_range_values(backend):
    labels = torch.zeros(1, 6, 6, dtype=torch.int32)
    labels[0, 0, :3] = 7  # labels need not be contiguous
    labels[0, 2, :2] = 3
    labels[0, 4, :] = -2  # negative values are background
    labels[0, 5, :] = 37  # beyond H * W: background
    assert boxes_of(backend, labels, min_area=0) == ([[0, 2, 2, 3], [0, 0, 3, 1]], [2, 3], 0)


def test_boxes_batch_is_independent(backend):
    generator = torch.Generator().manual_seed(3)
    labels = reference.connected_components(testing.random_masks(4, 16, 16, 0.3, generator), 8)
    together = backend("component_boxes", labels, 6, 1, 4, 3, 225)
    for b in range(4):
        alone = backend("component_boxes", labels[b : b + 1], 6, 1, 4, 3, 225)
        assert all(torch.equal(t[b : b + 1], a) for t, a in zip(together, alone))


# ------------------------------------------------------------------------------------------------
# rpn_scores


def float64_rpn_scores(q, k, num_heads, scale) -> np.ndarray:
    qn, kn = q.double().numpy(), k.double().numpy()
    head_dim = qn.shape[2] // num_heads
    total = np.zeros((qn.shape[0], kn.shape[1]))
    for h in range(num_heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        for i in range(qn.shape[1]):
            total += np.einsum("bd,bnd->bn", qn[:, i, part], kn[:, :, part])
    return total * scale / (qn.shape[1] * num_heads)


# bf16/fp16 inputs convert exactly to fp32, so every dtype shares the fp32 accumulation tolerance:
# relative to the sum of |terms| of each output.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 576, 1024, 8), (3, 4, 33, 96, 3), (2, 1, 7, 40, 1), (2, 1, 0, 8, 2)]
)
def test_rpn_scores_match_float64(backend, dtype, shape):
    batch, queries, tokens, dim, heads = shape
    q, k = testing.random_qk(batch, queries, tokens, dim, dtype, torch.Generator().manual_seed(tokens))
    scale = 1.0 / math.sqrt(dim // heads)
    out = backend("rpn_scores", q, k, heads, scale)
    assert out.dtype == torch.float32 and out.shape == (batch, tokens)
    magnitude = float64_rpn_scores(q.abs(), k.abs(), heads, scale)
    error = np.abs(out.double().numpy() - float64_rpn_scores(q, k, heads, scale))
    assert (error <= testing.RPN_SCORES_RTOL * magnitude).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rpn_scores_accumulate_in_float32(backend, dtype):
    # 4096 products of 1: exact in fp32, while bf16 / fp16 accumulators would stall at 256 / 2048.
    q = torch.ones(1, 2, 4096, dtype=dtype)
    k = torch.ones(1, 3, 4096, dtype=dtype)
    out = backend("rpn_scores", q, k, 4, 1.0)
    assert torch.equal(out, torch.full((1, 3), 1024.0))


def test_rpn_scores_noncontiguous(backend):
    q, k = testing.random_qk(2, 3, 20, 32, torch.float32, torch.Generator().manual_seed(0))
    expected = float64_rpn_scores(q, k, 4, 0.5)
    out = backend(
        "rpn_scores", testing.noncontiguous(q), k.transpose(0, 1).contiguous().transpose(0, 1), 4, 0.5
    )
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# roi_mask


def float64_roi_prob(logits: torch.Tensor, blur: bool) -> np.ndarray:
    prob = 1.0 / (1.0 + np.exp(-logits.double().numpy()))
    if blur:
        weights = np.array([math.exp(-0.5), 1.0, math.exp(-0.5)])
        weights /= weights.sum()
        # SciPy's "mirror" mode reflects without repeating the edge, as the op does.
        prob = scipy.ndimage.correlate1d(prob, weights, axis=2, mode="mirror")
        prob = scipy.ndimage.correlate1d(prob, weights, axis=1, mode="mirror")
    return prob


@pytest.mark.parametrize("blur", [True, False], ids=["blur", "sharp"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 6), (2, 5, 1), (2, 2, 2), (8, 24, 24), (1, 64, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_roi_mask_matches_float64(backend, shape, blur, dtype):
    logits = testing.random_logits(*shape, torch.Generator().manual_seed(sum(shape))).to(dtype)
    threshold = 0.15
    prob, mask = backend("roi_mask", logits, threshold, blur)
    assert prob.dtype == torch.float32 and mask.dtype == torch.bool and prob.shape == mask.shape == shape
    expected = float64_roi_prob(logits, blur)
    np.testing.assert_allclose(prob.numpy(), expected, rtol=0, atol=testing.PROB_ATOL)
    decided = np.abs(expected - threshold) > testing.PROB_ATOL
    assert np.array_equal(mask.numpy()[decided], (expected > threshold)[decided])


def test_roi_mask_threshold_is_strict(backend):
    logits = torch.zeros(1, 3, 3)  # sigmoid(0) = 0.5 exactly
    assert not backend("roi_mask", logits, 0.5, False)[1].any()
    assert backend("roi_mask", logits, 0.4999, False)[1].all()
    saturated = torch.tensor([[[-200.0, 200.0]]])  # probabilities exactly 0 and 1
    assert backend("roi_mask", saturated, 0.0, False)[1].tolist() == [[[False, True]]]
    assert not backend("roi_mask", saturated, 1.0, False)[1].any()


def test_roi_mask_noncontiguous(backend):
    logits = testing.random_logits(2, 24, 24, torch.Generator().manual_seed(0))
    prob, mask = backend("roi_mask", testing.noncontiguous(logits), 0.3, True)
    np.testing.assert_allclose(prob.numpy(), float64_roi_prob(logits, True), rtol=0, atol=testing.PROB_ATOL)


# ------------------------------------------------------------------------------------------------
# pack_tokens, pack_tokens_padded, unpack_tokens

TOKEN_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def python_pack(features: torch.Tensor, keep: torch.Tensor):
    rows, offsets = [], [0]
    for b in range(keep.shape[0]):
        for n in range(keep.shape[1]):
            if keep[b, n]:
                rows.append(features[b, n])
        offsets.append(len(rows))
    packed = torch.stack(rows) if rows else features.new_zeros(0, features.shape[2])
    return packed, torch.tensor(offsets, dtype=torch.int64)


@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_pack_tokens_matches_python_loop(backend, dtype, density):
    features, keep = testing.random_tokens(3, 40, 8, density, dtype, torch.Generator().manual_seed(5))
    packed, offsets = backend("pack_tokens", features, keep)
    expected_packed, expected_offsets = python_pack(features, keep)
    assert packed.dtype == dtype and torch.equal(packed, expected_packed)
    assert offsets.dtype == torch.int64 and torch.equal(offsets, expected_offsets)


@pytest.mark.parametrize("capacity", [0, 5, 20, 40, 64])
@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_pack_tokens_padded_capacity_below_and_above_counts(backend, dtype, capacity):
    features, keep = testing.random_tokens(4, 40, 8, 0.5, dtype, torch.Generator().manual_seed(6))
    keep[0] = False
    keep[1] = True
    packed, lengths = backend("pack_tokens_padded", features, keep, capacity)
    assert packed.shape == (4, capacity, 8) and packed.dtype == dtype
    assert lengths.dtype == torch.int64 and lengths.tolist() == keep.sum(1).tolist()
    for b in range(4):
        rows = features[b][keep[b]][:capacity]
        assert torch.equal(packed[b, : len(rows)], rows)
        assert packed[b, len(rows) :].eq(0).all()


@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_unpack_inverts_pack_exactly(backend, dtype):
    generator = torch.Generator().manual_seed(7)
    for density in (0.0, 0.3, 1.0):
        features, keep = testing.random_tokens(3, 50, 16, density, dtype, generator)
        packed, offsets = backend("pack_tokens", features, keep)
        restored = backend("unpack_tokens", packed, offsets, keep)
        assert restored.dtype == dtype and torch.equal(restored, features * keep.unsqueeze(-1))


def test_unpack_inconsistent_offsets_never_read_out_of_bounds(backend):
    # Offsets that disagree with keep are either rejected (where checking them costs no host
    # synchronisation) or give zero rows for the kept positions they do not cover.
    packed = torch.arange(1.0, 11.0).unsqueeze(1)  # rows 1..10
    keep = torch.tensor([[True, True, True], [True, False, True], [True, True, False]])
    offsets = torch.tensor([0, 2, 2, 12])  # sample 0 has 2 rows for 3 kept, sample 1 none, 2 past the end
    try:
        restored = backend("unpack_tokens", packed, offsets, keep).squeeze(-1)
    except RuntimeError as error:
        assert "offsets" in str(error)
    else:
        assert restored.tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]


def test_pack_tokens_noncontiguous_and_empty(backend):
    features, keep = testing.random_tokens(2, 30, 6, 0.5, torch.float32, torch.Generator().manual_seed(8))
    packed, offsets = backend("pack_tokens", testing.noncontiguous(features), testing.noncontiguous(keep))
    expected = python_pack(features, keep)
    assert torch.equal(packed, expected[0]) and torch.equal(offsets, expected[1])
    packed, offsets = backend("pack_tokens", torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert packed.shape == (0, 4) and offsets.tolist() == [0, 0, 0]
