"""``--model sdrpn`` for lmms-eval on a local Qwen2.5-VL checkpoint (the tiny one of
:mod:`helpers.tiny_qwen_checkpoint`): the plugin loads the processor the sdrpn commands load
(without torchvision, the one built from the checkpoint's files), asks in the checkpoint's chat
template, upscales by the family's rule, and answers as ``sdrpn generate`` does, with the same RoI
boxes and visual tokens, on a batch of images of different grids.

lmms-eval is replaced by stand-ins where it is not installed (:mod:`helpers.lmms_eval_stubs`).
"""

from __future__ import annotations

import json

import pytest

from helpers.cli import run_sdrpn
from helpers.lmms_eval_stubs import Request, plugin  # noqa: F401 (plugin: a fixture)
from helpers.tiny_qwen import qwen_images
from helpers.tiny_qwen_checkpoint import save_tiny_qwen_checkpoint
from helpers.tiny_qwen_rpn import save_structured_rpn
from sdrpn.commands import common

QUESTION = "what color is the sign ?"
SIZES = [(280, 210), (300, 120)]  # grids 6 x 9 and 4 x 11 at the checkpoint's pixel budget
GRID_TOKENS = [54, 44]
MAX_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint, an RPN whose map keeps part of an image, and the images."""
    root = tmp_path_factory.mktemp("qwen_lmms")
    save_tiny_qwen_checkpoint(root / "model")
    save_structured_rpn(root / "rpn")
    for index, image in enumerate(qwen_images(SIZES, seed=3)):
        image.save(root / f"{index}.png")
    return root


def lmms_model(plugin, checkpoint, **model_args):
    """The plugin's model, with model_args as lmms-eval passes them."""
    return plugin.SDRPNLmms(pretrained=str(checkpoint / "model"), device="cpu", **model_args)


def chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_the_plugin_loads_the_commands_processor_chat_template_and_rule(plugin, checkpoint):
    from transformers.utils import is_torchvision_available

    answerer = lmms_model(plugin, checkpoint, rpn=str(checkpoint / "rpn")).answerer
    engine = answerer.engine
    expected = common.load_processor(checkpoint / "model", "qwen2_5_vl")
    assert type(engine.processor) is type(expected) and type(expected).__name__ == "Qwen2_5_VLProcessor"
    assert type(engine.processor.image_processor) is type(expected.image_processor)
    if not is_torchvision_available():
        assert type(expected.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert engine.prompt(QUESTION) == chat_prompt(engine.processor, QUESTION)
    # the authors' Qwen2.5-VL inference: masked upscaling at 0.25
    assert engine.options.strategy == "masked" and engine.options.threshold == 0.25 and answerer.threshold is None

    plain = lmms_model(plugin, checkpoint, method="baseline").answerer  # no RPN: the family's template
    assert plain.template.render(QUESTION, plain.processor) == chat_prompt(plain.processor, QUESTION)


def generate_reports(checkpoint, method: str, rpn: bool) -> list[dict]:
    """``sdrpn generate --json`` on each image alone."""
    reports = []
    for index in range(len(SIZES)):
        status, out, err = run_sdrpn(
            "generate", "--model", checkpoint / "model", *(["--rpn", checkpoint / "rpn"] if rpn else []),
            "--device", "cpu", "--image", checkpoint / f"{index}.png", "--question", QUESTION, "--method", method,
            "--max-new-tokens", MAX_NEW_TOKENS, "--json")
        assert status == 0, err
        reports.append(json.loads(out))
    return reports


@pytest.mark.parametrize("method, rpn", [("sdrpn", True), ("baseline", True), ("baseline", False)],
                         ids=["sdrpn", "baseline", "baseline-without-rpn"])
def test_answers_rois_and_visual_tokens_are_sdrpn_generates(plugin, checkpoint, tmp_path, method, rpn):
    from PIL import Image

    roi_log = tmp_path / "rois.jsonl"
    model = lmms_model(plugin, checkpoint, method=method, batch_size=2, roi_log=str(roi_log),
                       **({"rpn": str(checkpoint / "rpn")} if rpn else {}))
    docs = {index: Image.open(checkpoint / f"{index}.png") for index in range(len(SIZES))}
    model.task_dict["toy"] = {"test": docs}
    requests = [Request((QUESTION, {"max_new_tokens": MAX_NEW_TOKENS, "until": ["\n\n"]}, lambda doc: [doc], index,
                         "toy", "test")) for index in docs]
    answers = model.generate_until(requests)  # both images in one batch
    logged = [json.loads(line) for line in roi_log.read_text().splitlines()]

    reports = generate_reports(checkpoint, method, rpn)
    assert answers == [report["answer"] for report in reports]
    assert [(entry["boxes"], entry["visual_tokens"]) for entry in logged] == \
        [(report["boxes"], report["visual_tokens"]) for report in reports]
    if method == "sdrpn":  # a RoI from the map, zoomed in on
        assert any(report["boxes"] for report in reports)
        assert all(report["visual_tokens"] > tokens for report, tokens in zip(reports, GRID_TOKENS)
                   if report["boxes"])
    else:
        assert [report["visual_tokens"] for report in reports] == GRID_TOKENS
