"""Conversation templates: exact prompts, the family default, and the template recorded from labels
through training into the RPN and used (and checked) by the engine."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from helpers.tiny_models import CHAT_TEMPLATE, tiny_llava, tiny_processor
from sdrpn import RPN, SDRPN
from sdrpn.cli import main
from sdrpn.engine.pipeline import image_starts
from sdrpn.models import adapter_for
from sdrpn.prompts import TEMPLATES, PromptTemplate, template_for, template_named
from test_label_job import GROUNDING_HEADS, save_labelling_model, write_images, write_plain_jsonl

# YuHengsss/SD-RPN 00876ac, LLaVA/llava/conversation.py: conv_vicuna_v1 (system sentence, roles USER and
# ASSISTANT, SeparatorStyle.TWO with sep " "); get_prompt() of one user turn [<image>\n question] and
# an empty assistant turn is system + " " + "USER: " + message + " " + "ASSISTANT:".
VICUNA_V1_WHAT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat? ASSISTANT:")


def image_start_of(processor, prompt: str, image_token_id: int) -> int:
    encoded = processor(images=[Image.new("RGB", (96, 96))], text=[prompt], return_tensors="pt")
    return image_starts(encoded["input_ids"], None, image_token_id)[0]


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def test_vicuna_v1_is_the_authors_conversation_template():
    assert TEMPLATES["vicuna_v1"].render("What?") == VICUNA_V1_WHAT
    assert TEMPLATES["vicuna_v1"].render("What?", tiny_processor()) == VICUNA_V1_WHAT  # its <image> token


def chat(processor, question: str) -> str:
    """The processor's own chat template applied to one image and ``question``."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_plain_and_processor_templates():
    processor = tiny_processor()
    assert TEMPLATES["plain"].render("What?", processor) == "USER: <image>\nWhat? ASSISTANT:"
    assert TEMPLATES["processor"].render("What?", processor) == chat(processor, "What?")
    assert processor.chat_template == CHAT_TEMPLATE
    processor.chat_template = None  # no chat template: the plain format
    assert TEMPLATES["processor"].render("What?", processor) == "USER: <image>\nWhat? ASSISTANT:"


def test_templates_are_recorded_and_read_back():
    for template in TEMPLATES.values():
        assert template_named(json.loads(json.dumps(template.to_dict()))) == template
        assert template_named(template.name) is template and template_named(template) is template
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        template_named("chatml")
    with pytest.raises(ValueError, match="not a prompt template record"):
        PromptTemplate.from_dict({"name": "x", "colour": "red"})


def test_llava_defaults_to_vicuna_v1():
    adapter = adapter_for(tiny_llava()[0])
    assert adapter.default_prompt_template == "vicuna_v1"
    assert template_for(None, adapter) is TEMPLATES["vicuna_v1"]
    assert template_for("plain", adapter) is TEMPLATES["plain"]


# ------------------------------------------------------------------------------------------------
# Labels -> training -> RPN config
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelling(tmp_path_factory):
    """The sharpened tiny LLaVA saved to disk, and 16 plain-JSONL questions with their images."""
    root = tmp_path_factory.mktemp("prompts")
    images = root / "images"
    data = write_plain_jsonl(root / "q.jsonl", write_images(images, 16, seed=2))
    return save_labelling_model(root / "model"), data, images


def label(labelling, out, *extra) -> int:
    checkpoint, data, images = labelling
    return main(["label", "--model", str(checkpoint), "--device", "cpu", "--data", str(data), "--image-root",
                 str(images), "--out", str(out), "--heads", GROUNDING_HEADS, "--sink", "none", "--max-new-tokens", "3",
                 "--batch-size", "8", "--no-progress", *map(str, extra)])


def train(labelling, labels, out) -> int:
    return main(["train", "--model", str(labelling[0]), "--device", "cpu", "--labels", str(labels), "--out", str(out),
                 "--K", "1", "--T", "2", "--batch-size", "4", "--max-steps", "2", "--eval-samples", "2",
                 "--no-progress"])


def test_label_records_the_family_default_and_refuses_to_resume_with_another(labelling, tmp_path, capsys):
    out = tmp_path / "labels"
    assert label(labelling, out, "--max-samples", 2) == 0
    settings = json.loads((out / "run.json").read_text())
    assert settings["options"]["prompt"] == TEMPLATES["vicuna_v1"].to_dict()
    capsys.readouterr()
    assert label(labelling, out, "--max-samples", 2, "--prompt", "plain") == 2
    err = capsys.readouterr().err
    assert "holds labels made with other settings (changed: options.prompt)" in err
    assert label(labelling, out, "--max-samples", 2, "--prompt", "vicuna_v1") == 0  # the same one resumes


def test_labels_without_a_recorded_template_resume_as_the_processors(labelling, tmp_path):
    out = tmp_path / "labels"
    assert label(labelling, out, "--max-samples", 2, "--prompt", "processor") == 0
    settings = json.loads((out / "run.json").read_text())
    del settings["options"]["prompt"]  # as written before templates were recorded
    (out / "run.json").write_text(json.dumps(settings))
    assert label(labelling, out, "--max-samples", 2, "--prompt", "processor") == 0
    assert label(labelling, out, "--max-samples", 2, "--prompt", "plain") == 2


def test_the_labels_template_is_recorded_in_the_trained_rpn(labelling, tmp_path, capsys):
    labels = tmp_path / "labels"
    assert label(labelling, labels, "--prompt", "plain") == 0
    assert train(labelling, labels, tmp_path / "rpn") == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "rpn" / "config.json").read_text())
    processor = tiny_processor()
    model = tiny_llava()[0]
    assert config["prompt"] == TEMPLATES["plain"].to_dict()
    assert config["image_start"] == image_start_of(processor, TEMPLATES["plain"].render("q", processor),
                                                   model.config.image_token_id)
    assert config["geometry"] == "crop"  # the tiny processor's: resize and centre-crop
    assert config["threshold"] == 0.15 and config["calibrated_threshold"] is not None

    # Labels of a run that recorded no template were made with the processor's chat template.
    settings = json.loads((labels / "run.json").read_text())
    del settings["options"]["prompt"]
    (labels / "run.json").write_text(json.dumps(settings))
    assert train(labelling, labels, tmp_path / "legacy") == 0
    assert json.loads((tmp_path / "legacy" / "config.json").read_text())["prompt"]["name"] == "processor"


# ------------------------------------------------------------------------------------------------
# The engine uses, and checks, the RPN's template
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vicuna_engine():
    """An engine on the tiny LLaVA whose RPN records the vicuna_v1 template and its image start."""
    model, processor = tiny_llava()
    start = image_start_of(processor, TEMPLATES["vicuna_v1"].render("q", processor), model.config.image_token_id)
    rpn = RPN.from_model(model, 2, 2, prompt="vicuna_v1", image_start=start, geometry="crop")
    return SDRPN(model, rpn, processor), start


def _inputs(processor, prompts, side="left"):
    images = [Image.new("RGB", (96, 96), (200, 40, 40)) for _ in prompts]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side=side), images


def test_the_engine_prompts_in_the_rpns_template(vicuna_engine):
    engine, _ = vicuna_engine
    assert engine.prompt_template.name == "vicuna_v1"
    assert engine.prompt("What?") == VICUNA_V1_WHAT
    override = SDRPN(engine.model, engine.rpn, engine.processor, prompt="plain")
    assert override.prompt("What?") == "USER: <image>\nWhat? ASSISTANT:"


def test_no_warning_when_the_prompts_image_tokens_start_where_the_rpn_expects(vicuna_engine):
    engine, _ = vicuna_engine
    # Left padding and questions of different lengths do not move the start of the real tokens.
    inputs, images = _inputs(engine.processor, [engine.prompt("what ?"), engine.prompt("what color is the sign ?")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.generate(**inputs, images=images, max_new_tokens=1)
        engine.predict_roi(**inputs)


def test_a_mismatched_image_start_warns_once(vicuna_engine):
    trained = vicuna_engine[0]
    engine = SDRPN(trained.model, trained.rpn, trained.processor)  # a fresh engine: its own warning
    start = vicuna_engine[1]
    plain = TEMPLATES["plain"].render("what ?", engine.processor)
    found = image_start_of(engine.processor, plain, engine.adapter.image_token_id)
    inputs, images = _inputs(engine.processor, [plain])
    with pytest.warns(UserWarning) as caught:
        engine.generate(**inputs, images=images, max_new_tokens=1)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert f"start at index {found}" in messages[0] and f"trained with them at {start}" in messages[0]
    assert "'vicuna_v1'" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per engine
        engine.generate(**inputs, images=images, max_new_tokens=1)


def test_image_starts_ignore_left_padding():
    ids = torch.tensor([[0, 0, 5, 9, 9, 7], [5, 6, 9, 9, 7, 8], [5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert image_starts(ids, mask, 9) == [1, 2]  # the row without an image is left out
    assert image_starts(ids, None, 9) == [3, 2]


def test_the_shipped_rpn_keeps_the_processors_template_without_warnings():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN

    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(SHIPPED_MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        engine = SDRPN(model, SHIPPED_RPN, processor)
        assert engine.rpn.config["prompt"]["name"] == "processor" and engine.prompt_template.name == "processor"
        assert engine.prompt("q?") == chat(processor, "q?")  # the prompts it was trained with
        inputs = processor(images=[Image.new("RGB", (96, 96))], text=[TEMPLATES["plain"].render("q?", processor)],
                           return_tensors="pt")
        engine.generate(**inputs, images=[Image.new("RGB", (96, 96))], max_new_tokens=1)
