"""The sdrpn command on a local Qwen2.5-VL checkpoint the test writes (tiny random model, word-level
tokenizer with Qwen's special tokens and chat template, preprocessor_config.json): the processor
loads with or without torchvision; generate's baseline equals model.generate on the same prompt,
its sdrpn equals sdrpn-reference; show draws the picture; eval writes its results on images of
different grids in one batch; demo --model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.tiny_qwen import qwen_images, tiny_qwen2_5_vl
from helpers.tiny_qwen_checkpoint import MAX_PIXELS, MIN_PIXELS, save_tiny_qwen_checkpoint
from helpers.tiny_qwen_rpn import save_structured_rpn
from sdrpn.cli import main
from sdrpn.commands import common
from sdrpn.models import processors

QUESTION = "what color is the sign ?"
SIZE = (280, 210)  # a 6 x 9 token grid at the checkpoint's pixel budget
GRID_TOKENS = 54


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint, an RPN for it whose random map keeps part of the image, and an image."""
    root = tmp_path_factory.mktemp("qwen_cli")
    save_tiny_qwen_checkpoint(root / "model")
    save_structured_rpn(root / "rpn")
    qwen_images([SIZE], seed=3)[0].save(root / "image.png")
    return root


def model_args(root: Path, rpn: bool = True) -> list:
    return ["--model", root / "model", *(["--rpn", root / "rpn"] if rpn else []), "--device", "cpu"]


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------
# The processor
# ------------------------------------------------------------------------------------------------


def test_the_processor_built_without_torchvision_is_qwens_processor(checkpoint):
    from PIL import Image
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = processors._qwen2_5_vl_processor_without_torchvision(checkpoint / "model")
    assert type(processor) is Qwen2_5_VLProcessor
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert processor.image_processor.size["shortest_edge"] == MIN_PIXELS
    assert processor.image_processor.size["longest_edge"] == MAX_PIXELS
    prompt = chat_prompt(processor, QUESTION)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    images = qwen_images([SIZE, (300, 120)], seed=1)
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt", padding=True, padding_side="left")
    # exactly the PIL image processor's view, and the placeholder expanded to each image's token count
    vision = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images=images, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], vision["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], vision["image_grid_thw"])
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = (inputs["input_ids"] == image_token).sum(dim=1).tolist()
    assert counts == (vision["image_grid_thw"].prod(dim=1) // 4).tolist() == [GRID_TOKENS, 44]
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == image_token)
    assert processor.batch_decode(inputs["input_ids"][:1], skip_special_tokens=True) == [
        "system You are a helpful assistant. user what color is the sign? assistant"]
    json.loads(processor.to_json_string())  # printable, as any processor
    with pytest.raises(ImportError, match="torchvision"):
        processor.video_processor([Image.new("RGB", (28, 28))])


def test_a_processor_config_with_nested_sub_processors_is_read(checkpoint, tmp_path):
    """transformers >= 5.2x saves the image processor's settings inside processor_config.json, with no
    preprocessor_config.json."""
    import shutil

    from helpers.tiny_qwen_checkpoint import preprocessor_config

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(checkpoint / "model" / name, tmp_path / name)
    nested = {"image_processor": preprocessor_config(min_pixels=8 * 28 * 28, max_pixels=32 * 28 * 28),
              "processor_class": "Qwen2_5_VLProcessor"}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    processor = processors._qwen2_5_vl_processor_without_torchvision(tmp_path)
    assert processor.image_processor.size["shortest_edge"] == 8 * 28 * 28
    assert processor.image_processor.size["longest_edge"] == 32 * 28 * 28
    assert processor.chat_template == (checkpoint / "model" / "chat_template.jinja").read_text()


def test_load_processor_falls_back_only_when_torchvision_is_missing(checkpoint, monkeypatch, capsys):
    import transformers
    import transformers.utils

    from sdrpn.errors import UserError

    message = ("\nQwen2VLVideoProcessor requires the Torchvision library but it was not found in your "
               "environment. Check out the instructions on the\ninstallation page: ...")

    def refuse(message):
        def from_pretrained(*args, **kwargs):
            raise ImportError(message)
        return from_pretrained

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse(message))
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)
    monkeypatch.setattr(common, "_SAID", set())
    for _ in range(2):
        processor = common.load_processor(checkpoint / "model", "qwen2_5_vl")
        assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    err = capsys.readouterr().err
    assert err.count("torchvision is not installed") == 1 and "Qwen2VLImageProcessorPil" in err  # said once
    # another family, another missing package, or a torchvision that is installed: the error, in one line
    for model_type, text, installed in (("llava", message, False), ("qwen2_5_vl", "flash_attn is missing", False),
                                        ("qwen2_5_vl", message, True)):
        monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse(text))
        monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda installed=installed: installed)
        with pytest.raises(UserError, match="cannot load the processor") as raised:
            common.load_processor(checkpoint / "model", model_type)
        assert "\n" not in str(raised.value)


def test_with_torchvision_the_processor_is_autoprocessors(checkpoint):
    """Where torchvision is installed (the GPU machine), AutoProcessor is used, and the processor
    built without it tokenizes the same way (the torchvision image backend resizes a little
    differently from the PIL one)."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("torchvision is not installed")
    import transformers

    processor = common.load_processor(checkpoint / "model", "qwen2_5_vl")
    auto = transformers.AutoProcessor.from_pretrained(checkpoint / "model", local_files_only=True)
    assert type(processor.image_processor) is type(auto.image_processor)
    ours = processors._qwen2_5_vl_processor_without_torchvision(checkpoint / "model")
    images = qwen_images([SIZE, (200, 300), (1000, 37)], seed=5)
    a = auto(images=images, text=[chat_prompt(auto, QUESTION)] * 3, return_tensors="pt", padding=True)
    b = ours(images=images, text=[chat_prompt(ours, QUESTION)] * 3, return_tensors="pt", padding=True)
    assert sorted(a) == sorted(b)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(a[name], b[name]), name
    assert (a["pixel_values"] - b["pixel_values"]).abs().mean() < 1e-2


# ------------------------------------------------------------------------------------------------
# generate, show, eval, demo
# ------------------------------------------------------------------------------------------------


def test_generate_baseline_equals_model_generate(capsys, checkpoint):
    import argparse

    from PIL import Image

    from sdrpn.eval.predictors import EnginePredictor, build_engine

    status, out, err = run_cli(capsys, "generate", *model_args(checkpoint, rpn=False), "--image",
                               checkpoint / "image.png", "--question", QUESTION, "--method", "baseline",
                               "--max-new-tokens", "6", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["boxes"] == [] and report["visual_tokens"] == GRID_TOKENS and "threshold" not in report

    model, processor = common.load_model(argparse.Namespace(
        model=checkpoint / "model", rpn=None, device="cpu", dtype="auto", attn_implementation="sdpa"))
    image = Image.open(checkpoint / "image.png")
    inputs = processor(images=[image], text=[chat_prompt(processor, QUESTION)], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = expected[:, inputs["input_ids"].shape[1]:]
    assert new_tokens.shape[1] > 1
    assert report["answer"] == processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
    # the command's own objects: the same prompt (the checkpoint's chat template) and the same tokens
    engine = build_engine(model, processor)
    assert engine.prompt_template.name == "processor" and engine.prompt(QUESTION) == chat_prompt(processor, QUESTION)
    result = EnginePredictor(engine, "baseline", max_new_tokens=6).run([image], [QUESTION])
    assert torch.equal(result.output.sequences, expected)


def test_generate_sdrpn_equals_sdrpn_reference(capsys, checkpoint):
    reports = {}
    for method in ("sdrpn", "sdrpn-reference"):
        status, out, err = run_cli(capsys, "generate", *model_args(checkpoint), "--image", checkpoint / "image.png",
                                   "--question", QUESTION, "--method", method, "--max-new-tokens", "5", "--json")
        assert status == 0, err
        reports[method] = json.loads(out)
    fast, reference = reports["sdrpn"], reports["sdrpn-reference"]
    for key in ("answer", "boxes", "visual_tokens", "threshold", "strategy"):
        assert fast[key] == reference[key], key
    # the family's rule and threshold (the authors' Qwen2.5-VL inference), a RoI inside the image
    assert fast["threshold"] == 0.25 and fast["strategy"] == "masked"
    width, height = SIZE
    assert fast["boxes"] and all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for x0, y0, x1, y1 in fast["boxes"])
    assert fast["boxes"] != [[0, 0, width, height]]
    assert fast["visual_tokens"] > GRID_TOKENS

    status, out, err = run_cli(capsys, "generate", *model_args(checkpoint), "--image", checkpoint / "image.png",
                               "--question", QUESTION, "--max-new-tokens", "5")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"answer: {fast['answer']}"
    roi_tokens = fast["visual_tokens"] - GRID_TOKENS
    assert lines[2] == f"visual tokens: {fast['visual_tokens']} ({GRID_TOKENS} original + {roi_tokens} RoI)"
    assert lines[3].startswith("latency: ") and "threshold 0.25" in lines[3]


def test_show_writes_the_picture(capsys, checkpoint, tmp_path):
    from PIL import Image

    from sdrpn.viz import figure_size

    picture = tmp_path / "roi.png"
    status, out, err = run_cli(capsys, "show", *model_args(checkpoint), "--image", checkpoint / "image.png",
                               "--question", QUESTION, "--size", "200", "--max-new-tokens", "3", "--out", picture)
    assert status == 0, err
    assert f"wrote {picture}" in out and "with SD-RPN:" in out and "without:" in out
    with Image.open(picture) as drawn:
        assert drawn.format == "PNG" and drawn.size == figure_size(200)


def test_the_figure_covers_the_view_grid(checkpoint):
    import argparse

    import numpy as np
    from PIL import Image

    from sdrpn.eval.predictors import EnginePredictor, build_engine
    from sdrpn.viz import roi_figure

    args = argparse.Namespace(model=checkpoint / "model", rpn=checkpoint / "rpn", device="cpu", dtype="auto",
                              attn_implementation="sdpa")
    model, processor = common.load_model(args)
    engine = build_engine(model, processor, common.load_rpn(args, model))
    image = Image.open(checkpoint / "image.png").convert("RGB")
    prediction = EnginePredictor(engine, "sdrpn", max_new_tokens=2).run([image], [QUESTION]).predictions[0]
    figure = roi_figure(engine, image, QUESTION, prediction, prediction, 0.25, 0.1)
    assert figure.probability.shape == figure.mask.shape == (6, 9)  # the image's own grid, not 24 x 24
    assert list(figure.grid_extent) == [0, 0, *SIZE]  # Qwen's view is the whole image, resized
    assert figure.mask.any() and not figure.mask.all() and figure.crop is not None
    # masked upscaling: the crop shows the mask's cells as they are, the others dimmed
    inputs = processor(images=[image], text=[engine.prompt(QUESTION)], return_tensors="pt")
    roi = engine.predict_roi(**inputs, images=[image])  # the processor's outputs, as for generate
    box = tuple(roi.crops[0].tolist())
    assert figure.crop.size == (box[2] - box[0], box[3] - box[1])
    dimmed = (np.asarray(figure.crop) != np.asarray(image.crop(box))).any(axis=2).mean()
    assert 0 < dimmed < 1


def write_benchmark(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for index, size in enumerate([SIZE, (300, 120), (150, 150)]):  # grids 6 x 9, 4 x 11, 5 x 5
        qwen_images([size], seed=index)[0].save(root / "images" / f"{index}.png")
        lines.append(json.dumps({"question_id": f"q{index}", "image": f"images/{index}.png", "question": QUESTION,
                                 "answers": ["red"]}))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    return root / "test.jsonl"


def test_eval_writes_its_results(capsys, checkpoint, tmp_path):
    data = write_benchmark(tmp_path / "data")
    out = tmp_path / "results" / "qwen.json"
    status, stdout, err = run_cli(capsys, "eval", *model_args(checkpoint), "--benchmark", "jsonl", "--data", data,
                                  "--method", "baseline", "sdrpn", "sdrpn-reference", "--batch-size", "2",
                                  "--max-new-tokens", "3", "--no-progress", "--out", out)
    assert status == 0, err
    results = json.loads(out.read_text())
    assert results["num_samples"] == 3 and set(results["methods"]) == {"baseline", "sdrpn", "sdrpn-reference"}
    assert results["prompts"]["template"] == "processor"
    grid_tokens = [GRID_TOKENS, 44, 25]
    assert results["methods"]["baseline"]["mean_visual_tokens"] == pytest.approx(sum(grid_tokens) / 3)
    records = {}
    for method in ("baseline", "sdrpn", "sdrpn-reference"):
        lines = [json.loads(line) for line in (out.parent / f"qwen.{method}.jsonl").read_text().splitlines()]
        records[method] = {record["question_id"]: record for record in lines[1:]}
        if method != "baseline":
            assert lines[0]["settings"]["threshold"] == 0.25 and lines[0]["settings"]["strategy"] == "masked"
    assert [records["baseline"][f"q{i}"]["visual_tokens"] for i in range(3)] == grid_tokens
    # the batched fast path answers as the reference answers each question alone
    for question, fast in records["sdrpn"].items():
        reference = records["sdrpn-reference"][question]
        assert (fast["prediction"], fast["boxes"], fast["visual_tokens"]) == \
            (reference["prediction"], reference["boxes"], reference["visual_tokens"]), question
    assert any(record["boxes"] for record in records["sdrpn"].values())
    assert "sdrpn-reference" in stdout and f"results: {out}" in stdout


def test_demo_runs_the_checkpoint(capsys, checkpoint, tmp_path):
    status, out, err = run_cli(capsys, "demo", *model_args(checkpoint), "--questions", "2", "--max-new-tokens", "2",
                               "--out", tmp_path / "demo")
    assert status == 0, err
    assert "threshold 0.25" in out and "(visual tokens and latency: baseline / SD-RPN)" in out
    assert (tmp_path / "demo" / "roi.png").is_file() and len(list((tmp_path / "demo" / "images").iterdir())) == 2


def test_the_peer_baselines_run_without_an_rpn(capsys, checkpoint):
    reports = {}
    for method in ("res-scaling", "vicrop"):
        status, out, err = run_cli(capsys, "generate", *model_args(checkpoint, rpn=False), "--image",
                                   checkpoint / "image.png", "--question", QUESTION, "--method", method,
                                   "--max-new-tokens", "3", "--json")
        assert status == 0, err
        reports[method] = json.loads(out)
    assert reports["res-scaling"]["boxes"] == [] and reports["res-scaling"]["visual_tokens"] > 3 * GRID_TOKENS
    # vicrop reports its crop, a second view after the image
    width, height = SIZE
    (x0, y0, x1, y1), = reports["vicrop"]["boxes"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert reports["vicrop"]["visual_tokens"] > GRID_TOKENS


def test_benchmark_threshold_presets_are_llavas():
    from sdrpn.commands.eval import benchmark_threshold
    from sdrpn.eval.datasets import get_benchmark
    from sdrpn.models.llava import LlavaAdapter
    from sdrpn.models.qwen2_5_vl import Qwen2_5_VLAdapter

    textvqa = get_benchmark("textvqa")
    assert benchmark_threshold(textvqa, LlavaAdapter) == 0.15
    assert benchmark_threshold(textvqa, Qwen2_5_VLAdapter) is None  # the RPN's 0.25


def test_label_uses_the_familys_rules_and_asks_for_heads(capsys, checkpoint, tmp_path):
    data = tmp_path / "questions.jsonl"
    (tmp_path / "images").mkdir()
    lines = []
    for index, size in enumerate([(400, 300), (300, 400)]):  # both padded to a square grey view
        qwen_images([size], seed=index)[0].save(tmp_path / "images" / f"{index}.png")
        lines.append(json.dumps({"question_id": f"q{index}", "image": f"images/{index}.png", "text": QUESTION}))
    data.write_text("\n".join(lines) + "\n")
    common_args = [*model_args(checkpoint, rpn=False), "--data", data, "--image-root", tmp_path,
                   "--max-new-tokens", "2", "--no-progress"]
    status, _, err = run_cli(capsys, "label", *common_args, "--out", tmp_path / "none")
    assert status != 0 and "--heads is needed" in err and "qwen2.5-vl-7b-text" in err
    status, _, err = run_cli(capsys, "label", *common_args, "--out", tmp_path / "labels", "--heads", "2:0,1;3:2")
    assert status == 0, err
    options = json.loads((tmp_path / "labels" / "run.json").read_text())["options"]
    assert options["padding_is_background"] and options["blur_box"] and options["min_peak"] == 5e-3
    assert options["sink"]["method"] == "none"  # the authors' text labels have no sink heads
    status, _, err = run_cli(capsys, "label", *common_args, "--out", tmp_path / "mixed", "--heads", "2:0",
                             "--sink-preset", "qwen2.5-vl-7b-natural", "--sink-layer", "3")
    assert status != 0 and "--sink-preset sets the whole detector" in err


def test_train_takes_the_authors_depth_for_known_models(tmp_path):
    import argparse

    from sdrpn.commands.train import rpn_depth
    from sdrpn.errors import UserError

    def depth(layers, **given):
        root = tmp_path / str(layers)
        if not root.exists():
            root.mkdir()
            tiny_qwen2_5_vl().config.save_pretrained(root)
            config = json.loads((root / "config.json").read_text())
            config["text_config"]["num_hidden_layers"] = layers
            config["text_config"].pop("layer_types", None)
            (root / "config.json").write_text(json.dumps(config))
        return rpn_depth(argparse.Namespace(model=root, start_layer=given.get("K"), num_blocks=given.get("T")))

    assert depth(28) == (16, 3) and depth(36) == (21, 3)  # Qwen2.5-VL-7B and 3B
    assert depth(28, T=2) == (16, 2) and depth(6, K=2, T=2) == (2, 2)
    with pytest.raises(UserError, match="give --K and --T"):
        depth(6)
