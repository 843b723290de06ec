"""The authors' Qwen2.5-VL labelling rules as options of our label and sink code.

Each rule is checked against a plain-torch transcription of the authors' code (YuHengsss/SD-RPN,
commit 00876ac, files under ``Qwen2.5-VL/``), on hand-built maps at the rule's edges and on random
ones. Their training builds the labels with ``create_pseudo_labels`` (``qwen_src/mm_utils.py:330``,
called from ``qwen-vl-finetune/qwenvl/data/data_qwen.py:790-801`` with ``mask_known_bg`` =
``--fix_res True``), not with ``create_pseudo_labels_torch`` (517), so that is what is transcribed.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from sdrpn.distill.attention import Capture, CaptureRequest
from sdrpn.distill.heads import PRESETS, RPN_DEPTH_PRESETS, HeadSelection
from sdrpn.distill.labels import (ANSWER_FORMAT_SUFFIX, BOX_GROUNDING_INSTRUCTION, IGNORE_INDEX, LABEL_RULE_PRESETS,
                                  QUESTION_REWRITES, LabelRules, QuestionRewrite, assign_labels, is_valid)
from sdrpn.models.qwen_geometry import square_padding_cells
from sdrpn.distill.sinks import SINK_PRESETS, SinkSpec, attention_sinks

I = IGNORE_INDEX
SIDE = 24
QWEN = LabelRules.qwen2_5_vl()

# Model sizes of the released checkpoints (config.json of Qwen/Qwen2.5-VL-7B-Instruct and -3B-Instruct).
MODEL_SIZES = {"qwen2.5-vl-7b": (28, 28), "qwen2.5-vl-3b": (36, 16)}


# ---------------------------------------------------------------------------------------------
# Transcriptions of the authors' code, step by step (plain torch, float64 as their numpy code).
# ---------------------------------------------------------------------------------------------

def _authors_known_image(image_size, side):
    """``get_foreground_mask`` (mm_utils.py:258-326): True on the cells that hold the image."""
    width, height = image_size                                   # 284
    longest = max(width, height)                                 # 290
    new_height = max(int(height / longest * side), 1)            # 292-295
    new_width = max(int(width / longest * side), 1)              # 296-299
    if new_width > new_height:                                   # 302-306
        x1, y1 = 0, (side - new_height) // 2
        x2, y2 = new_width, new_height + math.ceil((side - new_height) / 2)
    elif new_height > new_width:                                 # 307-311
        x1, y1 = (side - new_width) // 2, 0
        x2, y2 = new_width + math.ceil((side - new_width) / 2), new_height
    else:                                                        # 312-314
        x1, y1, x2, y2 = 0, 0, side, side
    x2, y2 = min(x2, side), min(y2, side)                        # 317-318
    mask = torch.zeros(side, side, dtype=torch.bool)             # 321
    mask[y1:y2, x1:x2] = True                                    # 323
    return mask


def _authors_blur(map_2d):
    """torchvision ``gaussian_blur(kernel_size=3, sigma=1.0)`` as mm_utils.py:393 calls it: a
    separable normalised Gaussian over offsets -1, 0, 1 and reflect padding."""
    offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    kernel_1d = torch.exp(-0.5 * offsets ** 2)
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :])[None, None]
    padded = torch.nn.functional.pad(map_2d[None, None], (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel)[0, 0]


def _authors_qwen_labels(sink_attn, grounding, image_size, sink_thresh=1e-2, binary_coff=0.2, bg_coff=0.1,
                         max_ratio_limit=0.5):
    """``create_pseudo_labels`` (mm_utils.py:330-476) with ``mask_known_bg=True``, as their
    training calls it (data_qwen.py:790-801: sink threshold 1e-2 from 724, coefficient 0.2 from 725)."""
    h, w = grounding.shape                                              # 356
    original = grounding.flatten().double()                             # 358
    sink_attn = sink_attn.flatten().double()                            # 359
    sink = sink_attn >= sink_thresh                                     # 362
    known_image = _authors_known_image(image_size, h).flatten()         # 365
    sink = sink | ~known_image                                          # 367
    g = original * (~sink).double()                                     # 372
    g = g * (g > g.max() * binary_coff).double()                        # 384-385
    fg = g > 0                                                          # 388
    blurred = _authors_blur(g.reshape(h, w))                            # 391-393
    rows, cols = torch.nonzero(blurred > 0, as_tuple=True)              # get_foreground_bbox 244-256
    if rows.numel() == 0:
        top, left, bottom, right = 0, 0, h - 1, w - 1
    else:
        top, left, bottom, right = int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())
    row_of, col_of = torch.arange(h * w) // w, torch.arange(h * w) % w  # 401
    in_box = (row_of >= top) & (row_of <= bottom) & (col_of >= left) & (col_of <= right)  # 404-407
    bg_values = original * (sink_attn < sink_thresh).double()           # 412: attention sinks only
    bg = ~in_box & (bg_values < g.max() * bg_coff)                      # 411, 417-429
    bg = bg | ~known_image                                              # 431-432
    labels = torch.full((h * w,), I, dtype=torch.int64)                 # 445
    if (right - left + 1) * (bottom - top + 1) < max_ratio_limit * h * w and g.max() >= 5e-3:  # 448
        labels[bg] = 0
        labels[fg] = 1
    return labels.reshape(h, w)


def _ours(sink_attn, grounding, image_size, threshold=1e-2):
    """Our labels for one sample: the sink mask by the detector's ``>=`` and the Qwen2.5-VL rules."""
    sink = (sink_attn.flatten() >= threshold)[None]
    padding = square_padding_cells(image_size, grounding.shape[0])[None]
    return QWEN.assign(grounding.flatten().double()[None], sink, grounding.shape, known_background=padding)[0]


def _check(sink_attn, grounding, image_size):
    ours = _ours(sink_attn, grounding, image_size)
    assert ours.tolist() == _authors_qwen_labels(sink_attn, grounding, image_size).tolist()
    return ours


def _zeros():
    return torch.zeros(SIDE, SIDE, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Padding cells
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1000, 510), (510, 1000), (640, 480), (480, 640), (333, 334), (1000, 999),
                                  (1, 1000), (1000, 1), (5000, 7), (100, 100), (24, 23), (23, 24), (50, 27)])
def test_padding_cells_follow_their_foreground_mask(size):
    assert torch.equal(square_padding_cells(size, SIDE), ~_authors_known_image(size, SIDE))


def test_padding_cells_on_many_sizes():
    rng = random.Random(0)
    for _ in range(500):
        size = (rng.randint(1, 3000), rng.randint(1, 3000))
        side = rng.choice([1, 2, 5, 23, 24, 25])
        assert torch.equal(square_padding_cells(size, side), ~_authors_known_image(size, side)), (size, side)


def test_padding_cells_shapes():
    # 1000x510: the short side covers int(12.24) = 12 rows, 6..17; the long side the whole grid.
    padding = square_padding_cells((1000, 510), SIDE)
    assert padding[:6].all() and padding[18:].all() and not padding[6:18].any()
    # 640x470: 17 rows (int(17.625)); 24 - 17 = 7 is odd, so the image gets 18 rows, 3..20.
    padding = square_padding_cells((640, 470), SIDE)
    assert padding[:3].all() and padding[21:].all() and not padding[3:21].any()
    assert torch.equal(square_padding_cells((470, 640), SIDE), padding.T)
    assert not square_padding_cells((77, 77), SIDE).any()
    with pytest.raises(ValueError, match="positive"):
        square_padding_cells((0, 10), SIDE)


# ---------------------------------------------------------------------------------------------
# Hand-built maps at each rule's edge
# ---------------------------------------------------------------------------------------------

def test_padding_cells_are_sinks_and_background_even_inside_the_box():
    size = (1000, 510)                       # rows 0-5 and 18-23 are padding
    grounding, sink_attn = _zeros(), _zeros()
    grounding[0, 3] = 0.9                    # the largest value, on padding: must not be the peak
    grounding[6, 10] = 0.05                  # the real peak, on the first image row
    grounding[7, 11] = 0.02                  # foreground (> 0.2 * 0.05)
    grounding[7, 10] = 0.004                 # below 0.1 * peak but inside the box: unsure
    sink_attn[8, 10] = 1e-2                  # an attention sink inside the blurred box: unsure
    grounding[8, 10] = 0.5
    sink_attn[12, 20] = 1e-2                 # an attention sink outside the box: background
    grounding[12, 20] = 0.5
    labels = _check(sink_attn, grounding, size)
    assert labels[6, 10] == 1 and labels[7, 11] == 1
    assert labels[0, 3] == 0                 # padding is background, never foreground
    # The blurred box spans rows 5-8, cols 9-12: row 5 is padding, hence background, not unsure.
    assert labels[5, 9:13].tolist() == [0, 0, 0, 0]
    assert labels[7, 10] == I and labels[8, 10] == I and labels[6, 9] == I
    assert labels[12, 20] == 0 and labels[9, 10] == 0
    # Without the padding rule the padding cell would be the peak and the labels unrelated.
    plain = assign_labels(grounding.flatten()[None], (sink_attn.flatten() >= 1e-2)[None], (SIDE, SIDE),
                          **QWEN.options())[0]
    assert plain[0, 3] == 1 and plain[6, 10] != 1


@pytest.mark.parametrize("peak, valid", [(5e-3, True), (math.nextafter(5e-3, 0.0), False), (4.99e-3, False),
                                         (5.01e-3, True)])
def test_peak_floor(peak, valid):
    grounding, sink_attn = _zeros(), _zeros()
    grounding[10, 10] = peak
    grounding[11, 12] = 0.5 * peak
    grounding[3, 3] = 0.9                    # larger, but an attention sink: not the peak
    sink_attn[3, 3] = 0.5
    labels = _check(sink_attn, grounding, (300, 300))
    assert bool(is_valid(labels)) is valid
    if not valid:
        assert (labels == I).all()


@pytest.mark.parametrize("cells, area", [
    (((5, 0), (14, 23)), 12 * 24),           # blurred box rows 4-15, cols 0-23: exactly half -> ignored
    (((5, 1), (14, 21)), 12 * 23),           # rows 4-15, cols 0-22: just below half
    (((5, 5), (18, 18)), 16 * 16),           # rows 4-19, cols 4-19
    (((4, 4), (17, 19)), 16 * 18),           # rows 3-18, cols 3-20: exactly half -> ignored
    (((4, 4), (17, 18)), 16 * 17),           # just below half
])
def test_box_fraction_counts_the_blurred_box(cells, area):
    grounding = _zeros()
    for cell in cells:
        grounding[cell] = 0.1
    labels = _check(_zeros(), grounding, (500, 500))
    assert bool(is_valid(labels)) is (area < SIDE * SIDE / 2)
    # The tight box (the LLaVA rule) is always smaller: each of these samples is valid there.
    assert is_valid(assign_labels(grounding.flatten(), torch.zeros(SIDE * SIDE, dtype=torch.bool), (SIDE, SIDE)))


def test_box_of_the_blur_is_the_tight_box_grown_by_one():
    grounding = _zeros()
    grounding[0, 0] = 0.1                    # corner: the growth is clipped to the grid
    grounding[2, 5] = 0.05
    labels = _check(_zeros(), grounding, (64, 64))
    assert labels[0:4, 0:7].eq(0).sum() == 0 and labels[4, 0:7].eq(0).all() and labels[0:4, 7].eq(0).all()


@pytest.mark.parametrize("value, is_sink", [(1e-2, True), (math.nextafter(1e-2, 0.0), False), (0.5, True)])
def test_sink_threshold_is_inclusive(value, is_sink):
    grounding, sink_attn = _zeros(), _zeros()
    grounding[4, 4] = 0.9
    sink_attn[4, 4] = value
    grounding[15, 15] = 0.1
    labels = _check(sink_attn, grounding, (90, 90))
    assert (labels[4, 4] == 0 and labels[15, 15] == 1) if is_sink else (labels[4, 4] == 1 and labels[15, 15] == I)


def test_exact_threshold_values():
    grounding = _zeros()
    grounding[10, 10] = 0.05
    grounding[10, 11] = 0.05 * 0.2           # exactly the fg threshold: not fg (strict)
    grounding[20, 20] = 0.05 * 0.1           # exactly the bg threshold: not bg (strict)
    grounding[20, 21] = math.nextafter(0.05 * 0.1, 0.0)
    labels = _check(_zeros(), grounding, (128, 128))
    assert labels[10, 10] == 1 and labels[10, 11] == I and labels[20, 20] == I and labels[20, 21] == 0


def test_all_padding_or_empty_maps_are_ignored():
    grounding = _zeros()
    grounding[:6] = 0.5                      # all the attention on padding rows
    assert (_check(_zeros(), grounding, (1000, 510)) == I).all()
    assert (_check(_zeros(), _zeros(), (300, 300)) == I).all()


def _random_case(rng, generator):
    size = rng.choice([(rng.randint(1, 4000), rng.randint(1, 4000)), (500, 500), (1000, 300), (300, 1000)])
    kind = rng.randrange(5)
    grounding = torch.rand(SIDE, SIDE, generator=generator, dtype=torch.float64) ** rng.choice([4, 8, 16, 32])
    grounding *= rng.choice([1e-3, 5e-3, 2e-2, 0.1, 1.0])
    if kind == 0:                            # a peak at the floor, either side
        grounding *= rng.choice([5e-3, math.nextafter(5e-3, 0.0)]) / float(grounding.max())
    elif kind == 1:                          # a compact blob: box near half the grid
        grounding = _zeros()
        top, left = rng.randint(0, 12), rng.randint(0, 12)
        height, width = rng.randint(1, 14), rng.randint(1, 14)
        grounding[top:top + height, left:left + width] = torch.rand(height, width, generator=generator,
                                                                    dtype=torch.float64)[:SIDE - top, :SIDE - left]
    elif kind == 2:                          # values exactly on the fg / bg thresholds
        peak = float(grounding.max())
        flat = grounding.view(-1)
        for index in torch.randint(0, SIDE * SIDE, (20,), generator=generator).tolist():
            flat[index] = peak * rng.choice([0.2, 0.1])
    sink_attn = torch.rand(SIDE, SIDE, generator=generator, dtype=torch.float64) * 1.2e-2
    sink_attn[torch.rand(SIDE, SIDE, generator=generator) < 0.02] = 1e-2
    if kind == 3:
        sink_attn = _zeros()                 # the text-image setting: no sink heads
    return sink_attn, grounding, size


def test_random_maps_match_their_rules():
    rng, generator = random.Random(1), torch.Generator().manual_seed(1)
    outcomes = set()
    for _ in range(300):
        sink_attn, grounding, size = _random_case(rng, generator)
        labels = _check(sink_attn, grounding, size)
        outcomes.add(bool(is_valid(labels)))
    assert outcomes == {True, False}


def test_batched_call_equals_one_by_one():
    rng, generator = random.Random(2), torch.Generator().manual_seed(2)
    cases = [_random_case(rng, generator) for _ in range(12)]
    grounding = torch.stack([case[1].flatten() for case in cases]).view(3, 4, -1)
    sink = torch.stack([case[0].flatten() >= 1e-2 for case in cases]).view(3, 4, -1)
    padding = torch.stack([square_padding_cells(case[2], SIDE) for case in cases]).view(3, 4, SIDE, SIDE)
    labels = QWEN.assign(grounding, sink, (SIDE, SIDE), known_background=padding)
    assert labels.shape == (3, 4, SIDE, SIDE)
    expected = torch.stack([_authors_qwen_labels(*case) for case in cases]).view(3, 4, SIDE, SIDE)
    assert torch.equal(labels, expected)
    # One (H, W) mask broadcasts over the batch.
    shared = square_padding_cells((1000, 510), SIDE)
    assert torch.equal(QWEN.assign(grounding, sink, (SIDE, SIDE), known_background=shared),
                       QWEN.assign(grounding, sink, (SIDE, SIDE), known_background=shared.expand(3, 4, SIDE, SIDE)))


# ---------------------------------------------------------------------------------------------
# Options, presets, default path
# ---------------------------------------------------------------------------------------------

def test_presets():
    assert LABEL_RULE_PRESETS["llava-1.5"] == LabelRules.llava() == LabelRules()
    assert LabelRules.named("qwen2.5-vl") == QWEN
    assert QWEN.options() == {"tau_fg": 0.2, "tau_bg": 0.1, "max_box_frac": 0.5, "min_peak": 5e-3, "blur_box": True}
    assert QWEN.padding_is_background and not LabelRules.llava().padding_is_background
    assert LabelRules(**QWEN.to_dict()) == QWEN
    with pytest.raises(ValueError, match="presets"):
        LabelRules.named("qwen3-vl")
    with pytest.raises(ValueError, match="min_peak"):
        LabelRules(min_peak=-1.0)


def test_rules_demand_the_padding_mask_they_need():
    grounding, sink = torch.rand(2, 16), torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="known_background"):
        QWEN.assign(grounding, sink, (4, 4))
    with pytest.raises(ValueError, match="no known-background"):
        LabelRules.llava().assign(grounding, sink, (4, 4), known_background=torch.zeros(4, 4, dtype=torch.bool))


def test_default_path_unchanged():
    generator = torch.Generator().manual_seed(3)
    grounding = torch.rand(4, 5, 35, generator=generator) ** 8
    sink = torch.rand(4, 5, 35, generator=generator) < 0.1
    default = assign_labels(grounding, sink, (5, 7))
    assert torch.equal(LabelRules.llava().assign(grounding, sink, (5, 7)), default)
    assert torch.equal(assign_labels(grounding, sink, (5, 7), known_background=None), default)
    # An all-False padding mask changes nothing either, under any rules.
    no_padding = torch.zeros(5, 7, dtype=torch.bool)
    for rules in LABEL_RULE_PRESETS.values():
        assert torch.equal(assign_labels(grounding, sink, (5, 7), **rules.options(), known_background=no_padding),
                           assign_labels(grounding, sink, (5, 7), **rules.options()))


def test_known_background_errors():
    grounding, sink = torch.rand(2, 6), torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        assign_labels(grounding, sink, (2, 3), known_background=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 3\)"):
        assign_labels(grounding, sink, (2, 3), known_background=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        assign_labels(grounding, sink, (2, 3), known_background=torch.zeros(3, 2, 3, dtype=torch.bool))


@pytest.mark.parametrize("model", ["qwen2.5-vl-7b", "qwen2.5-vl-3b"])
def test_qwen_presets_fit_the_models(model):
    num_layers, num_heads = MODEL_SIZES[model]
    for kind in ("text", "natural"):
        HeadSelection.parse(f"{model}-{kind}").check(num_layers, num_heads)
        sink = SINK_PRESETS[f"{model}-{kind}"]
        if sink.heads is not None:
            HeadSelection(sink.heads).check(num_layers, num_heads)
            assert sink.resolved_layer(0) < num_layers
    depth = RPN_DEPTH_PRESETS[model]
    assert depth.num_blocks >= 1 and depth.start_layer + depth.num_blocks <= num_layers
    # A preset of the other model size would not fit one of them (their heads differ by model).
    if model == "qwen2.5-vl-3b":
        with pytest.raises(ValueError):
            HeadSelection.parse("qwen2.5-vl-7b-natural").check(num_layers, num_heads)


def test_preset_values():
    # make_pseudo_label_textual.py:91-96 and make_pseudo_label_natural.py:93-99.
    expected = {
        "qwen2.5-vl-7b-text": {22: (1, 4), 23: (6, 11)},
        "qwen2.5-vl-7b-natural": {16: (1, 7, 17), 19: (17, 20)},
        "qwen2.5-vl-3b-text": {20: (1, 4), 22: (14,)},
        "qwen2.5-vl-3b-natural": {21: (9, 11), 22: (0, 7)},
    }
    for name, by_layer in expected.items():
        assert HeadSelection.parse(name).by_layer == by_layer
        assert HeadSelection.parse(PRESETS[name]) == HeadSelection.parse(name)
    assert SINK_PRESETS["qwen2.5-vl-7b-natural"] == SinkSpec.create("attention", threshold=1e-2, heads="9:4,22")
    assert SINK_PRESETS["qwen2.5-vl-3b-natural"].heads_by_layer == {8: (1, 13)}
    assert SINK_PRESETS["qwen2.5-vl-3b-natural"].threshold == 1e-2
    for name in ("qwen2.5-vl-7b-text", "qwen2.5-vl-3b-text"):
        assert SINK_PRESETS[name].method == "none"
    assert SINK_PRESETS["llava-1.5-7b"] == SinkSpec.create()          # the label job's default
    # finetune_roi_fix_res_7b.sh:18-19 and finetune_roi_fix_res.sh:18-19.
    assert RPN_DEPTH_PRESETS["qwen2.5-vl-7b"] == (16, 3) and RPN_DEPTH_PRESETS["qwen2.5-vl-3b"] == (21, 3)
    assert RPN_DEPTH_PRESETS["llava-1.5-7b"] == (15, 3)


# ---------------------------------------------------------------------------------------------
# Sink detector from given heads
# ---------------------------------------------------------------------------------------------

def _authors_sink_map(rows_by_layer, sink_heads):
    """make_pseudo_label_natural.py:115-121: per head, the answer-to-image map averaged over the
    answer tokens (ana_utils.py:146); summed over the sink heads and divided by their count."""
    total, count = 0.0, 0
    for layer, heads in sink_heads.items():
        for head in heads:
            total = total + rows_by_layer[layer][:, head].double().mean(dim=1)
            count += 1
    return total / count


def test_sink_heads_detector_matches_their_sink_map():
    spec = SINK_PRESETS["qwen2.5-vl-3b-natural"]                     # heads 1 and 13 of layer 8, >= 1e-2
    num_heads, answers, tokens = 16, 3, SIDE * SIDE
    generator = torch.Generator().manual_seed(4)
    full = {layer: torch.rand(2, num_heads, answers, tokens, generator=generator, dtype=torch.float64) * 2.2e-2
            for layer in (8, 21, 22)}
    # Exactly the threshold on both heads: a sink. Our detector averages in float32, where 1e-2 is
    # rounded, so "a hair below" is one float32 step below it (in float64 terms, the values in
    # [float32(1e-2), 1e-2) are sinks for us and not for them: see the report).
    full[8][:, [1, 13], :, 5] = 1e-2
    below = float(torch.tensor(1e-2, dtype=torch.float32).nextafter(torch.tensor(0.0)))
    full[8][:, [1, 13], :, 6] = below
    grounding = HeadSelection.parse("qwen2.5-vl-3b-natural")
    request = CaptureRequest(grounding.by_layer).merge(spec.request(min(grounding.by_layer), num_heads))
    assert request.heads[8] == (1, 13)
    rows = {layer: full[layer][:, list(heads)] for layer, heads in request.heads.items()}
    captured = Capture(request, rows, {}, torch.ones(2, answers, dtype=torch.bool))
    found = spec.detect(captured, min(grounding.by_layer), tokens)
    expected = _authors_sink_map(full, {8: [1, 13]}) >= 1e-2         # mm_utils.py:362
    assert torch.equal(found, expected)
    assert found[:, 5].all() and not found[:, 6].any() and found.any() and not found.all()


def test_sink_spec_with_heads():
    spec = SinkSpec.create("attention", heads="9:22,4;9:4", threshold=1e-2)
    assert spec.heads == ((9, 4), (9, 22)) and spec.layer is None and spec.resolved_layer(16) == 9
    data = spec.to_dict()
    assert data["heads"] == [[9, 4], [9, 22]]
    assert SinkSpec(**data) == spec                                  # what an RPN config is read back with
    assert "heads" not in SinkSpec.create().to_dict()                # settings without heads read as before
    assert SinkSpec.preset("qwen2.5-vl-7b-natural") == spec
    with pytest.raises(ValueError, match="not both"):
        SinkSpec("attention", 2, 1e-2, heads=((9, 4),))
    with pytest.raises(ValueError, match="attention sink detector only"):
        SinkSpec("norm", None, 20.0, heads=((9, 4),))
    with pytest.raises(ValueError, match="LAYER:HEAD"):
        SinkSpec.create("attention", heads="9-4")
    with pytest.raises(ValueError, match="non-empty"):
        SinkSpec("attention", None, 1e-2, heads=())
    with pytest.raises(ValueError, match="presets"):
        SinkSpec.preset("qwen3-vl")


def test_sink_heads_on_a_tiny_model():
    import numpy as np
    from PIL import Image

    from helpers.tiny_models import TINY_GRID, tiny_llava
    from sdrpn.distill.attention import AttentionReader

    model, processor = tiny_llava()
    reader = AttentionReader(model, processor, max_new_tokens=4)
    spec = SinkSpec.create("attention", heads="0:1,3;1:2", threshold=7e-3)
    request = CaptureRequest({1: (0, 2)}).merge(spec.request(1, reader.adapter.num_heads))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 80, 3), dtype=np.uint8)) for i in range(2)]
    captured = reader.read(images, ["what color ?", "where is the dog ?"], request).capture
    found = spec.detect(captured, 1, TINY_GRID[0] * TINY_GRID[1])
    assert captured.request.heads[0] == (1, 3) and captured.request.heads[1] == (0, 2)
    rows = torch.cat([captured.rows[0], captured.rows[1][:, [1]]], dim=1)   # heads 0:1, 0:3 and 1:2
    assert torch.equal(found, attention_sinks(rows, captured.query_mask, 7e-3))


# ---------------------------------------------------------------------------------------------
# The natural-image question
# ---------------------------------------------------------------------------------------------

def test_natural_image_question_rewrite():
    rewrite = QUESTION_REWRITES["qwen2.5-vl-natural"]
    # The literal prompt text of make_pseudo_label_natural.py:49-50 (braces included: their
    # string is not formatted).
    assert rewrite == QuestionRewrite(
        "Answer the question using a single word or phrase.",
        "Output the grounding bounding box of Region of Interest for the question. IMPORTANT: The output MUST be "
        "raw text, one box per line. DO NOT use JSON. Follow this exact format: x_min y_min x_max y_max "
        "{detail_label}.")
    assert rewrite.old == ANSWER_FORMAT_SUFFIX and rewrite.new == BOX_GROUNDING_INSTRUCTION
    question = "What color is the car on the left?\nAnswer the question using a single word or phrase."
    assert rewrite.apply(question) == "What color is the car on the left?\n" + BOX_GROUNDING_INSTRUCTION
    assert rewrite.apply("Who wrote this book?") == "Who wrote this book?"      # no suffix: asked as is
    assert QuestionRewrite(**rewrite.to_dict()) == rewrite
    with pytest.raises(ValueError, match="non-empty"):
        QuestionRewrite("", "x")
