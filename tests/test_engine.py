"""The engine: baseline equals model.generate, the fast path equals the plain reference, batching
is invisible, the RPN round-trips through disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.tiny_models import TINY_GRID, save_tiny_llava, tiny_llava, tiny_prompt
from sdrpn import RPN, SDRPN
from sdrpn.roi import MODE_BOX, MODE_MASK, MODE_NONE, RoIOptions, forced_logits

K, T = 2, 2
NEW_TOKENS = 6
SIZES = [(130, 70), (64, 200), (96, 96)]
QUESTIONS = ["what is the color of the car ?", "name ?", "how many dogs are there in this picture ?"]
# Forced RoIs per sample: one box (box upscaling), two components (masked upscaling), nothing.
ROI_BOXES = [[(2, 2, 6, 5)], [(1, 1, 3, 3), (7, 7, 11, 10)], []]


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_llava()
    return model, processor, SDRPN(model, RPN.from_model(model, K, T), processor)


@pytest.fixture(scope="module", params=["sync-free", "trimmed"])
def engine(request, tiny):
    """The fast path in both modes: static shapes without host reads (the GPU default) and trimmed
    stage 2 (the CPU default)."""
    model, processor, default = tiny
    return SDRPN(model, default.rpn, processor, sync_free=request.param == "sync-free")


@pytest.fixture(scope="module")
def batch(tiny):
    _, processor, _ = tiny
    images = _images()
    inputs = processor(images=images, text=[tiny_prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True)
    return inputs, images


def _row(inputs, images, index, processor):
    """Sample ``index`` of the batch on its own (no padding)."""
    single = processor(images=[images[index]], text=[tiny_prompt(QUESTIONS[index])], return_tensors="pt")
    return single, [images[index]]


def _assert_logits_close(fast, reference, rtol=1e-4):
    assert len(fast) >= 1
    for step, (a, b) in enumerate(zip(fast, reference)):
        rows = ~torch.isnan(b).any(dim=1)  # the reference marks rows that already ended
        scale = b[rows].abs().amax(dim=1, keepdim=True)
        error = ((a[rows] - b[rows]).abs() / scale).max().item()
        assert error < rtol, f"step {step}: relative logit error {error:.2e}"


# -- baseline ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [slice(0, 3), slice(1, 2)], ids=["batch3", "batch1"])
def test_baseline_equals_model_generate(tiny, batch, rows):
    model, processor, engine = tiny
    inputs, images = batch
    if rows.stop - rows.start == 1:
        inputs, images = _row(inputs, images, rows.start, processor)
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, method="baseline")
    assert torch.equal(got, expected)


def test_baseline_continues_right_padded_rows_from_their_last_token(tiny):
    """A right-padded batch answers as the same prompts padded on the left (model.generate would
    continue those rows from a pad token)."""
    _, processor, engine = tiny
    images, prompts = _images(), [tiny_prompt(q) for q in QUESTIONS]
    steps = {}
    for side in ("left", "right"):
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side=side)
        assert side == "left" or not bool(inputs["attention_mask"][:, -1].all())
        output = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, method="baseline",
                                 output_logits=True)
        steps[side] = output.logits
    _assert_logits_close(steps["right"], steps["left"])


def test_baseline_sampling_equals_model_generate(tiny, batch):
    model, _, engine = tiny
    inputs, images = batch
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    expected = model.generate(**inputs, **options)
    torch.manual_seed(123)
    got = engine.generate(**inputs, images=images, method="baseline", **options)
    assert torch.equal(got, expected)


def test_eos_stops_rows_and_pads_them(tiny, batch):
    model, _, engine = tiny
    inputs, images = batch
    first = engine.generate(**inputs, images=images, max_new_tokens=1, method="baseline")[:, -1]
    eos = int(first[0])  # make row 0's first token the end of its sequence
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=3)
    got = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, method="baseline", eos_token_id=eos,
                          pad_token_id=3)
    assert torch.equal(got, expected)
    assert (got[0, inputs["input_ids"].shape[1] + 1:] == 3).all()


# -- fast path against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["mask", "box", "none"])
@pytest.mark.parametrize("size", [3, 1], ids=["batch3", "batch1"])
def test_fast_path_equals_reference(tiny, engine, batch, strategy, size):
    processor = tiny[1]
    inputs, images = batch
    roi_logits = forced_logits(ROI_BOXES, TINY_GRID)
    if size == 1:  # the masked-upscaling sample alone
        inputs, images = _row(inputs, images, 1, processor)
        roi_logits = roi_logits[1:2]
    options = dict(images=images, max_new_tokens=NEW_TOKENS, roi_logits=roi_logits, strategy=strategy,
                   output_logits=True)
    fast = engine.generate(**inputs, **options)
    reference = engine.generate(**inputs, method="sdrpn-reference", **options)
    assert torch.equal(fast.sequences, reference.sequences)
    assert torch.equal(fast.visual_tokens.cpu(), reference.visual_tokens)
    _assert_logits_close(fast.logits, reference.logits)


def test_forced_rois_take_the_expected_modes(engine, batch):
    inputs, images = batch
    length = TINY_GRID[0] * TINY_GRID[1]
    output = engine.generate(**inputs, images=images, max_new_tokens=2, roi_logits=forced_logits(ROI_BOXES, TINY_GRID),
                             return_roi=True)
    assert output.roi.mode.tolist() == [MODE_BOX, MODE_MASK, MODE_NONE]
    assert output.roi.counts.tolist() == [1, 2, 0]
    visual = output.visual_tokens.tolist()
    assert visual[0] == 2 * length and length < visual[1] < 2 * length and visual[2] == length
    boxed = engine.generate(**inputs, images=images, max_new_tokens=2, roi_logits=forced_logits(ROI_BOXES, TINY_GRID),
                            strategy="box", return_roi=True)
    assert boxed.visual_tokens.tolist() == [2 * length, 2 * length, length]


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync-free", "trimmed"])
def test_strongest_region_only_equals_reference(tiny, batch, sync_free):
    model, processor, default = tiny
    engine = SDRPN(model, default.rpn, processor, roi_options=RoIOptions(max_regions=1), sync_free=sync_free)
    inputs, images = batch
    options = dict(images=images, max_new_tokens=NEW_TOKENS, roi_logits=forced_logits(ROI_BOXES, TINY_GRID),
                   output_logits=True, return_roi=True)
    fast = engine.generate(**inputs, **options)
    reference = engine.generate(**inputs, method="sdrpn-reference", **options)
    # Sample 1's larger box has the higher blurred peak: it alone is zoomed, by box upscaling.
    assert fast.roi.mode.tolist() == [MODE_BOX, MODE_BOX, MODE_NONE] and fast.roi.counts.tolist() == [1, 1, 0]
    chosen = fast.roi.boxes[1][fast.roi.valid[1]].tolist()
    assert len(chosen) == 1 and chosen[0][:2] == [7, 7] and chosen == [list(b) for b in reference.roi[1].boxes]
    assert torch.equal(fast.sequences, reference.sequences)
    assert torch.equal(fast.visual_tokens.cpu(), reference.visual_tokens)
    _assert_logits_close(fast.logits, reference.logits)


def test_random_rpn_maps_match_the_reference(engine, batch):
    """Unforced: the RPN's own maps, post-processed on the device and on the CPU, agree."""
    inputs, images = batch
    fast = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, return_roi=True)
    reference = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, method="sdrpn-reference",
                                return_roi=True)
    assert torch.equal(fast.sequences, reference.sequences)
    for sample, roi in enumerate(reference.roi):
        np.testing.assert_allclose(fast.roi.prob[sample].cpu().numpy(), roi.prob, rtol=1e-5, atol=1e-6)
        assert np.array_equal(fast.roi.cells[sample].cpu().numpy(), roi.cells)


# -- no RoI, batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["strategy-none", "empty-map"])
def test_no_roi_equals_model_generate(tiny, engine, batch, how):
    model = tiny[0]
    inputs, images = batch
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    if how == "strategy-none":
        got = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, strategy="none")
    else:
        empty = forced_logits([[], [], []], TINY_GRID)
        got = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, roi_logits=empty)
    assert torch.equal(got, expected)


def test_batch_equals_each_sample_alone(tiny, engine, batch):
    """Tokens and every step's logits: a row that read a few wrong tokens (another row's RoI slots,
    say) can keep its tokens on a tiny model, not its logits."""
    processor = tiny[1]
    inputs, images = batch
    roi_logits = forced_logits(ROI_BOXES, TINY_GRID)
    together = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, roi_logits=roi_logits,
                               output_logits=True)
    prompt_length = inputs["input_ids"].shape[1]
    for index in range(3):
        single, image = _row(inputs, images, index, processor)
        alone = engine.generate(**single, images=image, max_new_tokens=NEW_TOKENS,
                                roi_logits=roi_logits[index:index + 1], output_logits=True)
        generated = alone.sequences[0, single["input_ids"].shape[1]:]
        assert torch.equal(together.sequences[index, prompt_length:prompt_length + generated.shape[0]], generated)
        _assert_logits_close([step[index:index + 1] for step in together.logits[:len(alone.logits)]], alone.logits)


# -- entry points ----------------------------------------------------------------------------------


def test_predict_roi(tiny, batch):
    _, _, engine = tiny
    inputs, images = batch
    prediction = engine.predict_roi(**inputs, images=images, roi_logits=forced_logits(ROI_BOXES, TINY_GRID))
    assert prediction.prob.shape == (3, *TINY_GRID) and prediction.mask.dtype == torch.bool
    assert prediction.counts.tolist() == [1, 2, 0]
    assert prediction.boxes[0, 0].tolist() == [2, 2, 6, 5]
    # The crop of sample 0 is its grid box in source pixels, truncated to whole pixels as the
    # authors' get_bbox4src does (LLaVA/llava/ana_utils.py ~736-740).
    transform = engine.adapter.geometry.transform(images[0].size)
    x0, y0, x1, y1 = transform.grid_to_source((2, 2, 6, 5), TINY_GRID)
    assert prediction.crops[0].tolist() == [int(x0), int(y0), int(x1), int(y1)]


def test_answer_returns_strings(tiny):
    _, processor, engine = tiny
    images = _images()[:2]
    answers = engine.answer(images, QUESTIONS[:2], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    inputs = processor(images=images, text=[tiny_prompt(q) for q in QUESTIONS[:2]], return_tensors="pt",
                       padding=True)
    sequences = engine.generate(**inputs, images=images, max_new_tokens=4)
    expected = processor.batch_decode(sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answers == [text.strip() for text in expected]


def test_rpn_from_disk_gives_identical_maps(tiny, batch, tmp_path):
    model, processor, engine = tiny
    inputs, images = batch
    engine.rpn.save_pretrained(tmp_path)
    loaded = SDRPN(model, tmp_path, processor)
    assert torch.equal(loaded.predict_roi(**inputs).prob, engine.predict_roi(**inputs).prob)


def test_checkpoint_loaded_from_disk(tmp_path, batch):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    directory = save_tiny_llava(tmp_path / "model")
    model = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    engine = SDRPN(model, RPN.from_model(model, K, T), processor)
    inputs, images = batch
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, strategy="none"), expected)
    assert len(engine.answer(images[:1], QUESTIONS[:1], max_new_tokens=3)) == 1


def test_eager_attention(batch):
    model, processor = tiny_llava(attn_implementation="eager")
    engine = SDRPN(model, RPN.from_model(model, K, T), processor)
    inputs, images = batch
    roi_logits = forced_logits(ROI_BOXES, TINY_GRID)
    fast = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, roi_logits=roi_logits)
    reference = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, roi_logits=roi_logits,
                                method="sdrpn-reference")
    assert torch.equal(fast, reference)
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, method="baseline"), expected)


def test_bad_calls_are_refused(tiny, batch):
    _, _, engine = tiny
    inputs, images = batch
    with pytest.raises(ValueError, match="one image per prompt"):
        engine.generate(**inputs, images=images[:2], max_new_tokens=2)
    with pytest.raises(ValueError, match="images"):
        engine.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown method"):
        engine.generate(**inputs, images=images, method="magic")
    with pytest.raises(ValueError, match="beam search"):
        engine.generate(**inputs, images=images, num_beams=2)
    with pytest.raises(ValueError, match="unsupported generation options"):
        engine.generate(**inputs, images=images, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="strategy"):
        engine.generate(**inputs, images=images, strategy="zoom")
    broken = inputs["input_ids"].clone()
    broken[broken == engine.adapter.image_token_id] = 5
    with pytest.raises(ValueError, match="image tokens"):
        engine.generate(input_ids=broken, pixel_values=inputs["pixel_values"], images=images)


@pytest.mark.filterwarnings("error:.*lru_cache:UserWarning")  # dynamo traces what stage 1 calls as it is
def test_compiled_stage1_gives_the_same_result(tiny, batch):
    model, processor, engine = tiny
    inputs, images = batch
    compiled = SDRPN(model, engine.rpn, processor, compile=True)
    roi_logits = forced_logits(ROI_BOXES, TINY_GRID)
    expected = engine.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, roi_logits=roi_logits)
    assert torch.equal(compiled.generate(**inputs, images=images, max_new_tokens=NEW_TOKENS, roi_logits=roi_logits),
                       expected)
    torch.testing.assert_close(compiled.predict_roi(**inputs).prob, engine.predict_roi(**inputs).prob)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_regions", [None, 1], ids=["all-regions", "strongest-region"])
def test_nothing_between_the_stages_synchronises_on_cuda(batch, max_regions):
    import sdrpn.ops
    from sdrpn.engine.layout import PromptLayout
    from sdrpn.engine.stage1 import run_stage1
    from sdrpn.engine.stage2 import roi_tokens, run_stage2
    from sdrpn.roi import SourceImages

    if "cuda" not in sdrpn.ops.backends():
        pytest.skip("the CUDA kernels of sdrpn.ops are not built (the reference labelling reads back)")
    model, processor = tiny_llava()
    model = model.cuda()
    engine = SDRPN(model, RPN.from_model(model, K, T), processor, sync_free=True,
                   roi_options=RoIOptions(max_regions=max_regions))
    inputs, images = batch
    adapter = engine.adapter
    roi_logits = forced_logits(ROI_BOXES, TINY_GRID, device="cuda")

    def two_stages():
        layout = PromptLayout.build(inputs["input_ids"], inputs["attention_mask"], adapter.image_token_id,
                                    adapter.image_length, 3).to("cuda")
        sources = SourceImages.from_pil(images, adapter.geometry, "cuda")
        pixel_values = inputs["pixel_values"].cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stage1 = run_stage1(adapter, engine.rpn, layout, pixel_values, engine.options, roi_logits)
            tokens = roi_tokens(adapter, stage1, sources, sync_free=True)
            return run_stage2(adapter, stage1, layout, tokens, K, sync_free=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with torch.inference_mode():
        two_stages()  # warm-up (lazy initialisations may synchronise once)
        prefill = two_stages()
    assert prefill.logits.shape[0] == 3
