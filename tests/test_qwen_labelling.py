"""`sdrpn label` on a tiny random Qwen2.5-VL (CPU, fp32): attention rows with M-RoPE, the authors'
square labelling view and its padding cells, their label rules, recorded settings, and shards that
`sdrpn train` reads and trains on.

The references are computed independently of the labelling code: transformers' eager attention
(``output_attentions``) over the model's own positions, and the square view built here with PIL
and the image processor at the authors' budget.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.tiny_qwen import IMAGE, qwen_images, qwen_inputs, tiny_qwen2_5_vl
from helpers.tiny_qwen_checkpoint import CHAT_TEMPLATE, MAX_PIXELS, MIN_PIXELS, tiny_qwen_tokenizer
from sdrpn.distill.attention import AttentionReader, CaptureRequest, capture, teacher_forced_batch
from sdrpn.distill.heads import HeadSelection
from sdrpn.distill.label_job import LabelOptions, Labeller, run_label_job
from sdrpn.distill.labels import (ANSWER_FORMAT_SUFFIX, BOX_GROUNDING_INSTRUCTION, IGNORE_INDEX, LabelRules,
                                  assign_labels)
from sdrpn.distill.records import read_records
from sdrpn.distill.shards import read_index, read_shard, shard_paths
from sdrpn.distill.sinks import SinkSpec
from sdrpn.errors import UserError
from sdrpn.models import adapter_for
from sdrpn.models.qwen_geometry import square_padding_cells

BUDGET = 576 * 28 * 28            # the authors' labelling budget: min_pixels = max_pixels
GRID = (24, 24)
GROUNDING = "1:2"                 # the head sharpened below
SINKS = SinkSpec("attention", None, 1e-2, heads=((0, 1), (2, 3)))  # given sink heads, the Qwen threshold
QUESTIONS = ["what color is the sign ?", "where is the car ?", "what is written on the board ?",
             "how many dogs are there ?"]
# Labelled sizes (width x height): wide, tall, square; views of 24 x 24 tokens. 690 x 690 and 632 x 400
# make 23 x 23 and 25 x 25 views (smart_resize's float arithmetic at the budget).
LABELLED = [(300, 200), (200, 320), (250, 250), (400, 180), (260, 360), (330, 220), (180, 180), (420, 300)]
OFF_GRID = {(690, 690): (23, 23), (632, 400): (25, 25)}


# ------------------------------------------------------------------------------------------------
# A Qwen2.5-VL processor for the tiny model without torchvision (transformers' Qwen2_5_VLProcessor
# needs a video processor, which needs torchvision): the tiny tokenizer and chat template, the PIL
# image processor, and the image placeholder expanded to the image's token count as the real one does.
# ------------------------------------------------------------------------------------------------


class TinyQwenProcessor:
    def __init__(self):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = tiny_qwen_tokenizer()
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        self.chat_template = CHAT_TEMPLATE
        self.image_token = "<|image_pad|>"

    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=False, padding_side="left", **kwargs):
        vision = self.image_processor(images=list(images), return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        texts = [prompt.replace(self.image_token, self.image_token * (int(grid.prod()) // merge), 1)
                 for prompt, grid in zip(text, vision["image_grid_thw"])]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "mm_token_type_ids": (encoded["input_ids"] == IMAGE).int(), **vision}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def sharpened(attn_implementation: str = "sdpa", layer: int = 1, head: int = 2, scale: float = 12.0):
    """The tiny Qwen2.5-VL with one query head and its key head made sharp (q and k scaled, biases
    included): random tiny models attend almost uniformly, and every sample would be ignored."""
    model = tiny_qwen2_5_vl(attn_implementation=attn_implementation)
    attention = model.model.language_model.layers[layer].self_attn
    dim = attention.head_dim
    kv_head = head // (attention.config.num_attention_heads // attention.config.num_key_value_heads)
    with torch.no_grad():
        for projection, index in ((attention.q_proj, head), (attention.k_proj, kv_head)):
            projection.weight[index * dim:(index + 1) * dim] *= scale
            projection.bias[index * dim:(index + 1) * dim] *= scale
    return model


@pytest.fixture(scope="module")
def models():
    """The same sharpened weights with SDPA (ours) and eager attention (the reference)."""
    model, eager = sharpened(), sharpened("eager")
    eager.load_state_dict(model.state_dict())
    return model, eager


@pytest.fixture(scope="module")
def processor():
    return TinyQwenProcessor()


def pictures(sizes, seed=0):
    """Dark pictures with one bright square each."""
    generator = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        pixels = np.full((height, width, 3), 30, dtype=np.uint8)
        side = int(min(width, height) * 0.3)
        top, left = generator.integers(0, height - side), generator.integers(0, width - side)
        pixels[top:top + side, left:left + side] = generator.integers(150, 255, size=3)
        images.append(Image.fromarray(pixels))
    return images


def options(**overrides) -> LabelOptions:
    settings = dict(heads=HeadSelection.parse(GROUNDING), sink=SINKS, max_new_tokens=5, batch_size=4, shard_size=3,
                    prompt="processor", rules="qwen2.5-vl")
    settings.update(overrides)
    return LabelOptions(**settings)


def eager_rows(eager, input_ids, vision, answer, heads: dict, hidden_layer=None):
    """Per layer, (h, A, N) answer-to-image rows of eager attention over one unpadded prompt + the fed
    back answer tokens (the model's own positions), and the image tokens' states entering
    ``hidden_layer``."""
    full = torch.cat([input_ids, torch.tensor(answer[:-1], dtype=torch.int64)])[None]
    with torch.no_grad():
        output = eager(input_ids=full, mm_token_type_ids=(full == IMAGE).int(), output_attentions=True,
                       output_hidden_states=True, **vision)
    image = (input_ids == IMAGE).nonzero().flatten()
    start, count, prompt = int(image[0]), len(image), len(input_ids)
    rows = {layer: output.attentions[layer][0, list(layer_heads), prompt:, start:start + count]
            for layer, layer_heads in heads.items()}
    hidden = None if hidden_layer is None else output.hidden_states[hidden_layer][0, start:start + count]
    return rows, hidden


# ------------------------------------------------------------------------------------------------
# Attention capture with M-RoPE
# ------------------------------------------------------------------------------------------------

SIZES = [(400, 300), (200, 560), (330, 330)]  # grids of different sizes in one batch
TEXTS = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14]), ([15, 16], [17, 18, 19, 20, 21, 22])]
ANSWERS = [[40, 41, 42, 2], [2], [50, 51, 52, 53, 54, 55]]  # the second answers with EOS at once
REQUEST = CaptureRequest({1: (0, 3), 4: (1, 2)}, hidden_layers=(2,))  # GQA: 4 query heads, 2 key heads


def _check_rows(captured, inputs, answers, eager, adapter):
    lengths = captured.image_lengths.tolist()
    assert len(set(lengths)) == 3  # three grids: rows are read up to the largest, zeros beyond
    for sample, answer in enumerate(answers):
        prompt = inputs["input_ids"][sample][inputs["attention_mask"][sample].bool()]
        vision = adapter.select_view({"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]},
                                     sample)
        expected, hidden = eager_rows(eager, prompt, vision, answer, REQUEST.heads, hidden_layer=2)
        queries, count = len(answer) - 1, lengths[sample]
        assert int(captured.query_mask[sample].sum()) == queries
        for layer in REQUEST.heads:
            got = captured.rows[layer][sample, :, :queries]
            torch.testing.assert_close(got[..., :count], expected[layer], atol=1e-5, rtol=0)
            assert not got[..., count:].any()
        torch.testing.assert_close(captured.hidden[2][sample, :count], hidden, atol=1e-5, rtol=1e-5)


def test_rows_equal_eager_output_attentions_with_mrope_and_gqa(models):
    model, eager = models
    inputs = qwen_inputs(qwen_images(SIZES), TEXTS, 256)
    adapter = adapter_for(model)
    vision = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    embedded = adapter.embed(inputs["input_ids"], vision, inputs["attention_mask"])
    assert not embedded.attention_mask.all() and bool(embedded.rope_delta.ne(0).any())
    captured = capture(adapter, teacher_forced_batch(embedded, ANSWERS, pad_id=0), REQUEST)
    _check_rows(captured, inputs, ANSWERS, eager, adapter)


def test_reader_answers_like_generate_and_reads_the_same_rows(models):
    """The reader's prefill + decode (3-D positions, rope deltas) answers like model.generate, and
    its rows, whose prompt part comes from the prefill's cache, equal eager attention's."""
    model, eager = models
    inputs = qwen_inputs(qwen_images(SIZES), TEXTS, 256)
    reader = AttentionReader(model, None, max_new_tokens=5)
    vision = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    answers, captured = reader.read_encoded(inputs["input_ids"], inputs["attention_mask"], vision, REQUEST)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert answers == reader._cut(generated)
    assert any(len(answer) > 2 for answer in answers)
    _check_rows(captured, inputs, answers, eager, reader.adapter)


# ------------------------------------------------------------------------------------------------
# The labelling view
# ------------------------------------------------------------------------------------------------


def authors_square(image):
    """Their expand2square: the image centred on a grey (127) square along its short axis."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (127, 127, 127))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def budget_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=BUDGET, max_pixels=BUDGET)


def test_the_labelling_view_is_the_authors_square_at_their_budget(models, processor):
    adapter = adapter_for(models[0], processor)
    labelling = adapter.labelling_processor(processor)
    assert labelling is not processor and labelling.tokenizer is processor.tokenizer
    assert processor.image_processor.size["longest_edge"] == MAX_PIXELS  # the user's processor is left as it was
    sizes = [*LABELLED[:4], *OFF_GRID]
    for image, size in zip(pictures(sizes), sizes):
        view = adapter.labelling_view(image)
        assert np.array_equal(np.asarray(view.image), np.asarray(authors_square(image)))
        grid = labelling.image_processor(images=[view.image], return_tensors="pt")["image_grid_thw"][0]
        assert view.grid == (int(grid[1]) // 2, int(grid[2]) // 2) == OFF_GRID.get(size, GRID)
        reference = budget_processor()(images=[authors_square(image)], return_tensors="pt")
        assert torch.equal(reference["image_grid_thw"][0], grid)
        assert torch.equal(view.padding, square_padding_cells(size, view.grid[0]))
        assert view.padding.any() == (size[0] != size[1])
    assert adapter.labelling_settings() == {"view": "square", "pad_color": [127, 127, 127], "min_pixels": BUDGET,
                                            "max_pixels": BUDGET, "grid": [24, 24]}


def test_llava_labels_on_its_processors_view_without_padding_cells():
    from helpers.tiny_models import tiny_llava

    model, llava_processor = tiny_llava()
    adapter = adapter_for(model, llava_processor)
    image = pictures([(90, 70)])[0]
    view = adapter.labelling_view(image)
    assert view.image is image and view.padding is None and view.grid == tuple(adapter.image_grid)
    assert adapter.labelling_processor(llava_processor) is llava_processor and adapter.labelling_settings() is None


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------


def test_options_carry_the_rules_and_the_question_rewrite():
    heads = HeadSelection.parse(GROUNDING)
    qwen = LabelOptions(heads=heads, rules="qwen2.5-vl")
    assert qwen.label_rules == LabelRules.qwen2_5_vl() and qwen.min_peak == 5e-3 and qwen.blur_box
    assert LabelOptions(heads=heads, rules=LabelRules.qwen2_5_vl()) == qwen
    assert LabelOptions(heads=heads, rules="qwen2.5-vl", min_peak=5e-3) == qwen  # agreeing fields are fine
    with pytest.raises(ValueError, match="contradicts"):
        LabelOptions(heads=heads, rules="qwen2.5-vl", tau_fg=0.3)
    with pytest.raises(ValueError, match="unknown label rules"):
        LabelOptions(heads=heads, rules="qwen3")
    with pytest.raises(ValueError, match="unknown question rewrite"):
        LabelOptions(heads=heads, question_rewrite="boxes")
    settings = qwen.label_settings()
    assert settings["padding_is_background"] is True and "question_rewrite" not in settings
    natural = LabelOptions(heads=heads, rules="qwen2.5-vl", question_rewrite="qwen2.5-vl-natural").label_settings()
    assert natural["question_rewrite"] == {"old": ANSWER_FORMAT_SUFFIX, "new": BOX_GROUNDING_INSTRUCTION}
    # LLaVA's settings read as they always did.
    assert set(LabelOptions(heads=heads).label_settings()) == {"heads", "sink", "tau_fg", "tau_bg", "max_box_frac",
                                                               "min_peak", "blur_box", "max_new_tokens"}


def test_sink_heads_are_checked_against_the_model(models, processor):
    for heads in ("9:4,22", "1:7"):
        with pytest.raises(UserError, match="--sink-heads .* do not exist"):
            Labeller(models[0], processor, options(sink=SinkSpec.create("attention", heads=heads)))


def test_labels_are_the_authors_rules_on_eager_attention_of_the_square_view(models, processor):
    model, eager = models
    sizes = LABELLED[:4]
    images = pictures(sizes)
    labeller = Labeller(model, processor, options())
    results = labeller.label(images, QUESTIONS)
    tokenizer, budget = processor.tokenizer, budget_processor()
    rules = LabelRules.qwen2_5_vl().options()
    heads = HeadSelection.parse(GROUNDING).by_layer
    sink_heads = SINKS.heads_by_layer
    checked_padding = 0
    for image, size, question, result in zip(images, sizes, QUESTIONS, results):
        # The reference: their square, the processor at their budget, the model's own generate and
        # eager attention; labels by assign_labels with their rules and padding cells.
        vision = budget(images=[authors_square(image)], return_tensors="pt")
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True)
        tokens = int(vision["image_grid_thw"][0].prod()) // 4
        assert tokens == GRID[0] * GRID[1]
        input_ids = tokenizer(prompt.replace("<|image_pad|>", "<|image_pad|>" * tokens), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = eager.generate(input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE).int(),
                                       max_new_tokens=5, do_sample=False, **vision)[0, input_ids.shape[1]:].tolist()
        answer = generated[:next((i + 1 for i, t in enumerate(generated) if t == 2), len(generated))]
        assert result.answer == tokenizer.decode([t for t in answer if t != 2], skip_special_tokens=True).strip()
        rows, _ = eager_rows(eager, input_ids[0], vision, answer, {**heads, **sink_heads})
        grounding = torch.cat([rows[layer] for layer in heads]).mean(dim=0).mean(dim=0)
        sink = torch.cat([rows[layer] for layer in sink_heads]).mean(dim=0).mean(dim=0) >= SINKS.threshold
        padding = square_padding_cells(size, 24)
        expected = assign_labels(grounding, sink, GRID, **rules, known_background=padding)
        torch.testing.assert_close(result.grounding.flatten(), grounding, atol=1e-5, rtol=1e-4)
        assert torch.equal(result.sink.flatten(), sink)
        assert torch.equal(result.padding, padding)
        assert torch.equal(result.labels, expected)
        assert result.valid == bool((expected != IGNORE_INDEX).any())
        if result.valid:
            assert (result.labels[padding] == 0).all()
            checked_padding += int(padding.any())
    assert checked_padding >= 1, "no valid sample with padding cells: the test checks nothing of them"


# ------------------------------------------------------------------------------------------------
# The job, end to end, and training on its shards
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Labelled images (24 x 24 views) and two whose views are off the grid, with questions that end
    in the answer-format instruction the natural-image rewrite replaces."""
    root = tmp_path_factory.mktemp("qwen-data")
    images = root / "images"
    images.mkdir()
    sizes = [*LABELLED[:3], *OFF_GRID, *LABELLED[3:]]
    lines = []
    for index, (picture, size) in enumerate(zip(pictures(sizes, seed=1), sizes)):
        name = f"img{index:02d}-{size[0]}x{size[1]}.png"
        picture.save(images / name)
        question = f"{QUESTIONS[index % len(QUESTIONS)]}\n{ANSWER_FORMAT_SUFFIX}"
        lines.append(json.dumps({"question_id": f"q{index}", "image": name, "text": question}))
    data = root / "questions.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, images, sizes


def _run(labeller, data, images, out):
    records, issues = read_records(data)
    return run_label_job(labeller, records, images, out, {"model": "tiny-qwen"}, parse_issues=issues, progress=False)


@pytest.fixture(scope="module")
def labelled(models, processor, dataset, tmp_path_factory):
    data, images, _ = dataset
    out = tmp_path_factory.mktemp("qwen-labels")
    labeller = Labeller(models[0], processor, options(question_rewrite="qwen2.5-vl-natural"))
    summary = _run(labeller, data, images, out)
    return out, summary, labeller


def test_label_job_writes_the_authors_labels_and_skips_off_grid_views(labelled, dataset):
    out, summary, _ = labelled
    data, _, sizes = dataset
    assert summary.labelled == summary.total_samples == len(LABELLED)
    assert summary.total_valid >= 3, "too few valid labels to train on"

    issues = [json.loads(line) for line in (out / "issues.jsonl").read_text().splitlines()]
    assert [(issue["line"], issue["action"]) for issue in issues] == [(4, "skipped"), (5, "skipped")]
    for issue, (size, grid) in zip(issues, OFF_GRID.items()):
        assert f"{size[0]}x{size[1]} image is {grid[0]}x{grid[1]} tokens, not the 24x24 grid" in issue["reason"]
    assert "skipped 2 records" in summary.report()

    settings = json.loads((out / "run.json").read_text())
    assert settings["options"]["min_peak"] == 5e-3 and settings["options"]["blur_box"] is True
    assert settings["options"]["padding_is_background"] is True
    assert settings["options"]["sink"]["heads"] == [[0, 1], [2, 3]]
    assert settings["options"]["question_rewrite"] == {"old": ANSWER_FORMAT_SUFFIX, "new": BOX_GROUNDING_INSTRUCTION}
    assert settings["labelling_view"]["min_pixels"] == settings["labelling_view"]["max_pixels"] == BUDGET

    labelled_sizes = [size for size in sizes if size not in OFF_GRID]
    for row, size in zip(read_index(out), labelled_sizes):
        assert row["question"].endswith(ANSWER_FORMAT_SUFFIX)               # the record keeps its question
        assert row["asked"] == row["question"].replace(ANSWER_FORMAT_SUFFIX, BOX_GROUNDING_INSTRUCTION)
        tensors, _ = read_shard(out / row["shard"])
        padding = tensors["padding"][row["row"]]
        assert torch.equal(padding, square_padding_cells(size, 24))
        labels = tensors["labels"][row["row"]].long()
        grounding = tensors["grounding"][row["row"]].float().flatten()
        expected = assign_labels(grounding, tensors["sink"][row["row"]].flatten(), GRID,
                                 **LabelRules.qwen2_5_vl().options(), known_background=padding)
        # Labels are made from the fp32 map; the stored fp16 map gives the same ones away from the thresholds.
        assert (labels == expected).float().mean() > 0.95
        assert row["valid"] == bool((labels != IGNORE_INDEX).any())
        if row["valid"]:
            assert (labels[padding] == 0).all()


def test_a_resumed_run_with_other_rules_or_rewrite_is_refused(models, processor, labelled, dataset):
    out, _, labeller = labelled
    data, images, _ = dataset
    before = len(shard_paths(out))
    with pytest.raises(UserError, match="changed: .*options.blur_box.*options.padding_is_background"):
        _run(Labeller(models[0], processor, options(rules="llava-1.5", question_rewrite="qwen2.5-vl-natural")),
             data, images, out)
    with pytest.raises(UserError, match=r"changed: options.question_rewrite\)"):
        _run(Labeller(models[0], processor, options()), data, images, out)
    again = _run(labeller, data, images, out)
    assert again.labelled == 0 and again.already_done == len(LABELLED) and len(shard_paths(out)) == before


def test_keep_sinks_relabels_with_the_padding_cells(labelled):
    from sdrpn.distill.train import keep_sink_labels, read_label_set

    label_set = read_label_set(labelled[0])
    assert label_set.samples and all(sample.padding is not None for sample in label_set.samples)
    relabelled = keep_sink_labels(label_set.samples, label_set.settings)
    for sample, again in zip(label_set.samples, relabelled):
        expected = assign_labels(sample.grounding.float(), torch.zeros(GRID[0] * GRID[1], dtype=torch.bool), GRID,
                                 **LabelRules.qwen2_5_vl().options(),
                                 known_background=sample.padding.reshape(GRID)).to(torch.int8)
        assert torch.equal(again.labels, expected)
        if bool((again.labels != IGNORE_INDEX).any()):
            assert (again.labels.flatten()[sample.padding] == 0).all()
    from dataclasses import replace

    with pytest.raises(UserError, match="do not hold them"):
        keep_sink_labels([replace(sample, padding=None) for sample in label_set.samples], label_set.settings)


def test_train_reads_the_shards_and_trains_on_the_square_view(models, processor, labelled, dataset, tmp_path):
    from sdrpn import RPN
    from sdrpn.distill.train import Backbone, TrainOptions, read_label_set, train_rpn

    model = models[0]
    label_set = read_label_set(labelled[0], dataset[1])
    adapter = adapter_for(model, processor)

    # The backbone's features are the model's own states entering layer K on the square view, at the
    # model's own 3-D positions.
    backbone = Backbone(model, processor, adapter, 2, label_set.image_root, tmp_path / "cache")
    sample = label_set.samples[0]
    features = backbone([sample], torch.device("cpu"))
    cached = backbone([sample], torch.device("cpu"))
    torch.testing.assert_close(cached.hidden, features.hidden)
    assert features.rope_position_ids.shape[0] == 3
    assert torch.equal(cached.rope_position_ids, features.rope_position_ids)
    image = Image.open(label_set.image_root / sample.image).convert("RGB")
    vision = budget_processor()(images=[authors_square(image)], return_tensors="pt")
    prompt = backbone.template.render(sample.question, processor)
    input_ids = processor.tokenizer(prompt.replace("<|image_pad|>", "<|image_pad|>" * 576), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE).int(), output_hidden_states=True,
                         **vision).hidden_states[2][0]
    torch.testing.assert_close(features.hidden[0], expected, atol=1e-5, rtol=1e-5)
    assert int(features.image_start[0]) == int((input_ids[0] == IMAGE).nonzero()[0])

    train = TrainOptions(start_layer=2, num_blocks=2, lr=1e-3, batch_size=2, epochs=1, eval_samples=1,
                         save_every=100, log_every=100)
    result = train_rpn(model, processor, label_set, tmp_path / "rpn", train, progress=False)
    assert result.history and all(math.isfinite(entry["loss"]) for entry in result.history)
    loaded = RPN.from_pretrained(tmp_path / "rpn", model)
    assert loaded.image_grid == GRID and loaded.config["labels"]["padding_is_background"] is True


def test_heads_are_scored_on_the_labelling_view(models, processor, dataset):
    """`sdrpn heads` reads the same square view as `sdrpn label`, and skips the same records."""
    from sdrpn.distill.heads import calibrate_heads

    data, images, _ = dataset
    records, _ = read_records(data)
    scorer, skipped = calibrate_heads(models[0], processor, records, images, [1], SinkSpec.create("none"),
                                      batch_size=len(records), max_new_tokens=3, progress=False, prompt="processor")
    assert [issue.line for issue in skipped] == [4, 5] and all("24x24 grid" in issue.reason for issue in skipped)
    assert scorer._map_sum.shape[-1] == GRID[0] * GRID[1] and scorer.samples > 0
