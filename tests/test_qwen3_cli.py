"""The sdrpn command on a local Qwen3-VL checkpoint the test writes (helpers.tiny_qwen3_checkpoint:
the tiny random model, Qwen's special tokens, Qwen3-VL's chat template and preprocessor config).

The processor loads without torchvision and is Qwen3-VL's own; generate's baseline equals
model.generate and its sdrpn equals sdrpn-reference; show, eval and demo run. Self-distillation runs
in order: label asks for heads from `sdrpn heads` (none were released), heads writes them, label
reads them, train refuses a K inside the deepstack layers, trains at the given depth, and generate
answers with the trained RPN as the reference does. Without --K, train takes the depth chosen for
Qwen3-VL's sizes."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from helpers.cli import error_line, run_sdrpn
from helpers.tiny_qwen import qwen_images
from helpers.tiny_qwen3 import tiny_qwen3_vl
from helpers.tiny_qwen3_checkpoint import MAX_PIXELS, MIN_PIXELS, save_tiny_qwen3_checkpoint
from sdrpn.commands import common
from sdrpn.models import processors

QUESTION = "what color is the sign ?"
SIZE = (320, 224)  # a 6 x 9 token grid of 32-pixel cells at the checkpoint's pixel budget
GRID_TOKENS = 54
# The seeded RPN's saved threshold: its map keeps two regions of the image there.
RPN_THRESHOLD = 0.6
LABELLED_SIZES = [(400, 300), (300, 400)]  # both padded to the labelling view's grey square


def save_seeded_rpn(directory) -> None:
    """An RPN past the deepstack layers (K=3, T=2) whose map has structure: the tiny model's own q/k
    give logits near 0 everywhere, so random ones take their place."""
    from sdrpn import RPN

    rpn = RPN.from_model(tiny_qwen3_vl(), 3, 2, threshold=RPN_THRESHOLD)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        rpn.q_proj.weight.copy_(torch.randn(rpn.q_proj.weight.shape, generator=generator))
        rpn.k_proj.weight.copy_(torch.randn(rpn.k_proj.weight.shape, generator=generator))
        rpn.k_norm.weight.mul_(4)  # q and k are normed per head: a larger k norm sharpens the map
    rpn.save_pretrained(directory)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The checkpoint, the seeded RPN, an image, and questions about images to label."""
    root = tmp_path_factory.mktemp("qwen3_cli")
    save_tiny_qwen3_checkpoint(root / "model")
    save_seeded_rpn(root / "rpn")
    qwen_images([SIZE], seed=3)[0].save(root / "image.png")
    (root / "images").mkdir()
    lines = []
    for index, size in enumerate(LABELLED_SIZES):
        qwen_images([size], seed=index)[0].save(root / "images" / f"{index}.png")
        lines.append(json.dumps({"question_id": f"q{index}", "image": f"images/{index}.png", "text": QUESTION}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def model_args(root, rpn="rpn") -> list:
    return ["--model", root / "model", *(["--rpn", root / rpn] if rpn else []), "--device", "cpu"]


def data_args(root) -> list:
    return ["--data", root / "questions.jsonl", "--image-root", root, "--max-new-tokens", "2", "--no-progress"]


def chat_prompt(processor, question: str = QUESTION) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def generate_json(root, *argv) -> dict:
    status, out, err = run_sdrpn("generate", *argv, "--image", root / "image.png", "--question", QUESTION, "--json")
    assert status == 0, err
    return json.loads(out)


def fast_and_reference(root, rpn: str) -> tuple[dict, dict]:
    """generate's reports with ``rpn``, by the fast path and by the reference."""
    return tuple(generate_json(root, *model_args(root, rpn), "--method", method, "--max-new-tokens", "4")
                 for method in ("sdrpn", "sdrpn-reference"))


# ------------------------------------------------------------------------------------------------
# The processor
# ------------------------------------------------------------------------------------------------


def test_the_processor_built_without_torchvision_is_qwen3s(root):
    from PIL import Image
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    build = processors.TORCHVISION_FREE_PROCESSORS["qwen3_vl"]
    assert processors.TORCHVISION_FREE_PROCESSORS["qwen3_vl_moe"] is build  # the MoE checkpoints name it too
    processor = build(root / "model")
    assert type(processor) is Qwen3VLProcessor and type(processor.image_processor) is Qwen2VLImageProcessorPil
    image_processor = processor.image_processor
    assert (image_processor.patch_size, list(image_processor.image_mean)) == (16, [0.5] * 3)
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)
    prompt = chat_prompt(processor)  # Qwen3-VL's template: no system prompt of its own
    assert prompt == (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
                      "<|im_start|>assistant\n")
    images = qwen_images([SIZE, (300, 120)], seed=1)
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt", padding=True, padding_side="left")
    vision = Qwen2VLImageProcessorPil.from_pretrained(root / "model")(images=images, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], vision["pixel_values"])
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 18], [1, 8, 18]]
    # the placeholder expanded to each image's token count: the tokenizer's ids of the expanded prompt
    for row, tokens in zip(inputs["input_ids"], (GRID_TOKENS, 36)):
        expanded = processor.tokenizer(prompt.replace("<|image_pad|>", "<|image_pad|>" * tokens))["input_ids"]
        assert row[-len(expanded):].tolist() == expanded
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == processor.image_token_id)
    with pytest.raises(ImportError, match="torchvision"):
        processor.video_processor([Image.new("RGB", (32, 32))])


def test_load_processor_falls_back_on_qwen3s_torchvision_error(root, monkeypatch):
    """Without torchvision, AutoProcessor raises a ValueError for Qwen3-VL (an ImportError for Qwen2.5-VL)."""
    import transformers
    import transformers.utils

    from sdrpn.errors import UserError

    def refuse(path, **kwargs):
        raise ValueError(f"{path} requires `torchvision` to be installed. Please install `torchvision` and try again.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)
    for model_type in ("qwen3_vl", "qwen3_vl_moe"):
        assert type(common.load_processor(root / "model", model_type)).__name__ == "Qwen3VLProcessor"
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)  # installed, yet failing
    with pytest.raises(UserError, match="cannot load the processor"):
        common.load_processor(root / "model", "qwen3_vl")


def test_with_torchvision_it_tokenizes_as_autoprocessor(root):
    """Where torchvision is installed (the GPU machine), the same tokens as AutoProcessor's (whose
    torchvision image backend resizes a little differently from the PIL one)."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("torchvision is not installed")
    import transformers

    auto = transformers.AutoProcessor.from_pretrained(root / "model", local_files_only=True)
    ours = processors.TORCHVISION_FREE_PROCESSORS["qwen3_vl"](root / "model")
    images = qwen_images([SIZE, (200, 300), (1000, 37)], seed=5)
    a, b = (processor(images=images, text=[chat_prompt(processor)] * 3, return_tensors="pt", padding=True)
            for processor in (auto, ours))
    assert sorted(a) == sorted(b)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(a[name], b[name]), name
    assert (a["pixel_values"] - b["pixel_values"]).abs().mean() < 1e-2


# ------------------------------------------------------------------------------------------------
# generate, show, eval, demo
# ------------------------------------------------------------------------------------------------


def test_generate_baseline_equals_model_generate(root):
    from PIL import Image

    report = generate_json(root, *model_args(root), "--method", "baseline", "--max-new-tokens", "6")
    assert report["boxes"] == [] and report["visual_tokens"] == GRID_TOKENS
    model, processor = common.load_model(argparse.Namespace(
        model=root / "model", rpn=None, device="cpu", dtype="auto", attn_implementation="sdpa"))
    inputs = processor(images=[Image.open(root / "image.png")], text=[chat_prompt(processor)], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = expected[:, inputs["input_ids"].shape[1]:]
    assert new_tokens.shape[1] > 1
    assert report["answer"] == processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


def test_the_rpn_free_methods_run_without_an_rpn(root):
    baseline = generate_json(root, *model_args(root, rpn=None), "--method", "baseline", "--max-new-tokens", "2")
    assert baseline["visual_tokens"] == GRID_TOKENS
    scaled = generate_json(root, *model_args(root, rpn=None), "--method", "res-scaling", "--max-new-tokens", "2")
    assert scaled["visual_tokens"] > 3 * GRID_TOKENS
    vicrop = generate_json(root, *model_args(root, rpn=None), "--method", "vicrop", "--max-new-tokens", "2")
    assert len(vicrop["boxes"]) == 1 and vicrop["visual_tokens"] > GRID_TOKENS


def test_an_rpn_below_the_deepstack_layers_is_refused_in_one_line(root, tmp_path):
    from sdrpn import RPN

    RPN.from_model(tiny_qwen3_vl(), 2, 2).save_pretrained(tmp_path / "shallow")
    status, _, err = run_sdrpn("generate", "--model", root / "model", "--rpn", tmp_path / "shallow", "--device", "cpu",
                               "--image", root / "image.png", "--question", QUESTION)
    assert status == 2 and "K >= 3" in error_line(err)


def test_generate_sdrpn_equals_sdrpn_reference(root):
    fast, reference = fast_and_reference(root, "rpn")
    for key in ("answer", "boxes", "visual_tokens", "threshold", "strategy"):
        assert fast[key] == reference[key], key
    # the RPN's threshold and the family's rule (Qwen2.5-VL's masked upscaling); a RoI inside the image
    assert fast["threshold"] == RPN_THRESHOLD and fast["strategy"] == "masked"
    width, height = SIZE
    assert fast["boxes"] and all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for x0, y0, x1, y1 in fast["boxes"])
    assert fast["boxes"] != [[0, 0, width, height]] and fast["visual_tokens"] > GRID_TOKENS


def test_show_writes_the_picture(root, tmp_path):
    from PIL import Image

    from sdrpn.viz import figure_size

    picture = tmp_path / "roi.png"
    status, out, err = run_sdrpn("show", *model_args(root), "--image", root / "image.png", "--question", QUESTION,
                                 "--size", "200", "--max-new-tokens", "2", "--out", picture)
    assert status == 0, err
    assert f"wrote {picture}" in out and "with SD-RPN:" in out and "without:" in out
    with Image.open(picture) as drawn:
        assert drawn.format == "PNG" and drawn.size == figure_size(200)


def test_eval_answers_by_the_fast_path_as_the_reference(root, tmp_path):
    (tmp_path / "images").mkdir()
    lines = []
    for index, size in enumerate([SIZE, (300, 120)]):  # grids 6 x 9 and 4 x 9 in one batch
        qwen_images([size], seed=index)[0].save(tmp_path / "images" / f"{index}.png")
        lines.append(json.dumps({"question_id": f"q{index}", "image": f"images/{index}.png", "question": QUESTION,
                                 "answers": ["red"]}))
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results" / "qwen3.json"
    status, _, err = run_sdrpn("eval", *model_args(root), "--benchmark", "jsonl", "--data", data, "--method",
                               "baseline", "sdrpn", "sdrpn-reference", "--batch-size", "2", "--max-new-tokens", "3",
                               "--no-progress", "--out", out)
    assert status == 0, err
    results = json.loads(out.read_text())
    assert results["num_samples"] == 2 and results["prompts"]["template"] == "processor"
    records = {}
    for method in ("baseline", "sdrpn", "sdrpn-reference"):
        written = [json.loads(line) for line in (out.parent / f"qwen3.{method}.jsonl").read_text().splitlines()]
        records[method] = {record["question_id"]: record for record in written[1:]}
    assert [records["baseline"][f"q{index}"]["visual_tokens"] for index in range(2)] == [GRID_TOKENS, 36]
    for question, fast in records["sdrpn"].items():  # the batched fast path against each question alone
        reference = records["sdrpn-reference"][question]
        assert (fast["prediction"], fast["boxes"], fast["visual_tokens"]) == \
            (reference["prediction"], reference["boxes"], reference["visual_tokens"]), question
    assert any(record["boxes"] for record in records["sdrpn"].values())


def test_demo_runs_the_checkpoint(root, tmp_path):
    status, out, err = run_sdrpn("demo", *model_args(root), "--questions", "1", "--max-new-tokens", "2",
                                 "--out", tmp_path / "demo")
    assert status == 0, err
    assert f"threshold {RPN_THRESHOLD}" in out and "(visual tokens and latency: baseline / SD-RPN)" in out
    assert (tmp_path / "demo" / "roi.png").is_file()


# ------------------------------------------------------------------------------------------------
# heads, label, train
# ------------------------------------------------------------------------------------------------


def test_label_asks_for_heads_from_sdrpn_heads(root, tmp_path):
    status, _, err = run_sdrpn("label", *model_args(root, rpn=None), *data_args(root), "--out", tmp_path / "labels")
    error = error_line(err)
    assert status != 0 and "--heads is needed for a qwen3_vl model, and none were released for it" in error
    assert "run `sdrpn heads`" in error and "qwen2.5-vl" not in error  # no other family's presets offered


@pytest.fixture(scope="module")
def labels(root):
    """`sdrpn heads`, then `sdrpn label` with its selection; the peak floor and box limit relaxed for
    the tiny random model's flat attention."""
    status, _, err = run_sdrpn("heads", *model_args(root, rpn=None), *data_args(root), "--out", root / "heads.json")
    assert status == 0, err
    status, out, err = run_sdrpn("label", *model_args(root, rpn=None), *data_args(root), "--heads",
                                 root / "heads.json", "--min-peak", "0", "--max-box-frac", "1", "--out",
                                 root / "labels")
    assert status == 0, err
    return root / "labels", out


def test_label_reads_the_heads_sdrpn_heads_chose(root, labels):
    directory, out = labels
    options = json.loads((directory / "run.json").read_text())["options"]
    assert options["heads"] == json.loads((root / "heads.json").read_text())["heads"]
    assert options["padding_is_background"] and options["blur_box"]  # Qwen2.5-VL's rules as a start
    assert f"output: {len(LABELLED_SIZES)} samples, {len(LABELLED_SIZES)} with valid labels" in out


def train(root, labels, out, *depth) -> tuple[int, str, str]:
    return run_sdrpn("train", *model_args(root, rpn=None), "--labels", labels, "--out", out, *depth,
                     "--max-steps", "2", "--batch-size", "2", "--eval-samples", "0", "--no-progress")


def test_train_refuses_a_k_inside_the_deepstack_layers(root, labels, tmp_path):
    status, _, err = train(root, labels[0], tmp_path / "rpn", "--K", "2", "--T", "2")
    assert status != 0 and error_line(err).endswith(
        "--K 2: qwen3_vl adds image features after layers [0, 1, 2], and SD-RPN reuses stage 1's cache only "
        "from K >= 3")
    assert not (tmp_path / "rpn").exists()


def test_the_trained_rpn_answers_as_the_reference(root, labels):
    status, _, err = train(root, labels[0], root / "trained", "--K", "3", "--T", "2")
    assert status == 0, err
    config = json.loads((root / "trained" / "config.json").read_text())
    assert config["family"] == "qwen3_vl" and (config["start_layer"], config["num_blocks"]) == (3, 2)
    assert config["threshold"] == 0.25  # the family's default: Qwen2.5-VL's
    fast, reference = fast_and_reference(root, "trained")
    for key in ("answer", "boxes", "visual_tokens", "threshold"):
        assert fast[key] == reference[key], key


def test_train_defaults_to_the_depth_chosen_for_qwen3_sizes(tmp_path):
    import transformers

    from sdrpn.commands.train import rpn_depth
    from sdrpn.distill.heads import RPN_DEPTH_PRESETS
    from sdrpn.errors import UserError
    from sdrpn.models.qwen3_vl import Qwen3VLAdapter

    def depth(layers, start_layer=None):
        directory = tmp_path / str(layers)
        transformers.Qwen3VLConfig(text_config={"num_hidden_layers": layers}).save_pretrained(directory)
        return rpn_depth(argparse.Namespace(model=directory, start_layer=start_layer, num_blocks=None))

    # 2B; 4B and 8B; 32B: K at the authors' Qwen2.5-VL relative depth (16 of 28, 21 of 36), T 3
    assert [depth(28), depth(36), depth(64)] == [(16, 3), (21, 3), (37, 3)]
    assert depth(36, start_layer=18) == (18, 3)
    with pytest.raises(UserError, match="give --K and --T"):
        depth(48)  # 30B-A3B: none chosen
    deepstack = len(transformers.Qwen3VLConfig().vision_config.deepstack_visual_indexes)
    assert all(RPN_DEPTH_PRESETS[name].start_layer >= deepstack for name in Qwen3VLAdapter.rpn_depth_presets.values())
