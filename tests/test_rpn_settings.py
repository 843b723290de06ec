"""What an RPN records besides its weights and how the engine and the commands follow it: the RoI
thresholds (the authors' default and the calibrated one) and the base view geometry."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from PIL import Image

from helpers.tiny_models import save_tiny_llava, tiny_llava, tiny_processor
from sdrpn import RPN, SDRPN
from sdrpn.models.geometry import ImageGeometry
from sdrpn.rpn import DEFAULT_THRESHOLD
from sdrpn.testbed.loop import FINE_DETAIL_THRESHOLD
from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN
from test_cli import run_cli, write_jsonl_benchmark

# ------------------------------------------------------------------------------------------------
# Thresholds
# ------------------------------------------------------------------------------------------------


def test_the_default_threshold_is_the_authors_and_the_calibrated_one_is_kept_beside_it(tmp_path):
    model = tiny_llava()[0]
    assert DEFAULT_THRESHOLD == 0.15
    plain = RPN.from_model(model, 2, 2)
    assert plain.threshold == 0.15 and plain.calibrated_threshold is None
    RPN.from_model(model, 2, 2, calibrated_threshold=0.05).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["threshold"] == 0.15 and config["calibrated_threshold"] == 0.05
    loaded = RPN.from_pretrained(tmp_path, model)
    assert (loaded.threshold, loaded.calibrated_threshold) == (0.15, 0.05)
    assert loaded.resolve_threshold(None) == 0.15 and loaded.resolve_threshold("calibrated") == 0.05
    assert loaded.resolve_threshold(0.3) == 0.3
    with pytest.raises(ValueError, match="records no calibrated threshold"):
        plain.resolve_threshold("calibrated")
    with pytest.raises(ValueError, match="a number or 'calibrated'"):
        plain.resolve_threshold("lowest")
    with pytest.raises(ValueError, match=r"calibrated_threshold must be in \[0, 1\]"):
        RPN.from_model(model, 2, 2, calibrated_threshold=2.0)


def test_an_old_config_holds_the_calibrated_threshold_as_threshold(tmp_path):
    model = tiny_llava()[0]
    RPN.from_model(model, 2, 2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("calibrated_threshold", "prompt", "image_start", "geometry"):
        del config[key]
    config["threshold"] = 0.07
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RPN.from_pretrained(tmp_path, model)
    assert (loaded.threshold, loaded.calibrated_threshold) == (0.15, 0.07)
    assert loaded.geometry is None and loaded.prompt_template.name == "processor"


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(SHIPPED_MODEL)


def test_the_engine_uses_the_default_threshold_unless_asked_for_the_calibrated_one(shipped):
    model, processor = shipped
    rpn = RPN.from_pretrained(SHIPPED_RPN, model)
    # The testbed loop saves its RPNs with the authors' fine-detail threshold and calibrates another.
    assert rpn.threshold == FINE_DETAIL_THRESHOLD and rpn.calibrated_threshold == 0.15
    assert SDRPN(model, rpn, processor).options.threshold == FINE_DETAIL_THRESHOLD
    engine = SDRPN(model, rpn, processor, threshold="calibrated")
    assert engine.options.threshold == 0.15
    inputs = processor(images=[Image.new("RGB", (96, 96))], text=[engine.prompt("q?")], return_tensors="pt")
    assert SDRPN(model, rpn, processor)._options("calibrated", None).threshold == 0.15  # per call, too
    prediction = SDRPN(model, rpn, processor).predict_roi(**inputs, threshold="calibrated")
    torch.testing.assert_close(prediction.mask, engine.predict_roi(**inputs).mask)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaVA on disk, with RPNs: one calibrated (0.12), one not, one for pad-to-square views."""
    root = tmp_path_factory.mktemp("settings")
    save_tiny_llava(root / "model")
    model = tiny_llava()[0]
    RPN.from_model(model, 2, 2, calibrated_threshold=0.12, geometry="crop").save_pretrained(root / "calibrated")
    RPN.from_model(model, 2, 2).save_pretrained(root / "uncalibrated")
    RPN.from_model(model, 2, 2, geometry="pad").save_pretrained(root / "pad")
    Image.new("RGB", (160, 120), (90, 120, 160)).save(root / "sign.png")
    return root


def generate(capsys, root, rpn, *extra):
    return run_cli(capsys, "generate", "--model", root / "model", "--rpn", root / rpn, "--device", "cpu", "--image",
                   root / "sign.png", "--question", "what color is the sign?", "--max-new-tokens", "2", "--json",
                   *extra)


def test_threshold_calibrated_on_the_command_line(capsys, saved):
    status, out, err = generate(capsys, saved, "calibrated")
    assert status == 0, err
    assert json.loads(out)["threshold"] == 0.15
    status, out, err = generate(capsys, saved, "calibrated", "--threshold", "calibrated")
    assert status == 0, err
    assert json.loads(out)["threshold"] == 0.12
    status, _, err = generate(capsys, saved, "uncalibrated", "--threshold", "calibrated")
    assert status == 2 and "--threshold calibrated: this RPN records no calibrated threshold" in err
    status, _, err = generate(capsys, saved, "calibrated", "--threshold", "lowest")
    assert status == 2 and "expected a number between 0 and 1 or 'calibrated', got 'lowest'" in err


def test_eval_thresholds_preset_default_and_calibrated(capsys, saved, tmp_path):
    data = write_jsonl_benchmark(tmp_path / "data", count=1)
    common = ["eval", "--model", saved / "model", "--rpn", saved / "calibrated", "--device", "cpu", "--benchmark",
              "jsonl", "--data", data, "--method", "sdrpn", "--max-new-tokens", "2", "--no-progress"]
    for extra, expected in (((), 0.15), (("--threshold", "calibrated"), 0.12)):
        out = tmp_path / f"{len(extra)}.json"
        status, _, err = run_cli(capsys, *common, *extra, "--out", out)
        assert status == 0, err
        settings = json.loads(out.read_text())["methods"]["sdrpn"]["settings"]
        assert settings["threshold"] == expected and settings["prompt"] == "processor"


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


def test_a_processor_of_another_geometry_than_the_rpns_warns():
    model, processor = tiny_llava()  # resize and centre-crop
    with pytest.warns(UserWarning, match="trained on 'pad' base views but the processor makes 'crop' views"):
        SDRPN(model, RPN.from_model(model, 2, 2, geometry="pad"), processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SDRPN(model, RPN.from_model(model, 2, 2, geometry="pad"), tiny_processor(pad_to_square=True))
        SDRPN(model, RPN.from_model(model, 2, 2, geometry="crop"), processor)
        SDRPN(model, RPN.from_model(model, 2, 2), processor)  # not recorded: nothing to compare


def _load(model_dir, rpn_dir):
    from sdrpn.commands.common import load_model

    return load_model(argparse.Namespace(model=model_dir, rpn=rpn_dir, device="cpu", dtype="auto",
                                         attn_implementation="sdpa"))


def test_the_commands_build_the_processor_the_rpn_was_trained_with(saved, capsys):
    _, processor = _load(saved / "model", saved / "pad")
    assert processor.image_processor.do_pad is True
    assert ImageGeometry.from_processor(processor, (96, 96)).mode == "pad"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on 'pad' base views" in err and "do_pad = True" in err
    _, processor = _load(saved / "model", saved / "calibrated")  # crop, as the processor already does
    assert not processor.image_processor.do_pad and capsys.readouterr().err == ""
    _, processor = _load(saved / "model", None)
    assert not processor.image_processor.do_pad and capsys.readouterr().err == ""


def test_a_clip_image_processor_is_replaced_to_pad_to_a_square(shipped, tmp_path, capsys):
    model, processor = shipped
    assert type(processor.image_processor).__name__.startswith("CLIPImageProcessor")
    RPN.from_model(model, 4, 3, geometry="pad").save_pretrained(tmp_path)
    _, padded = _load(SHIPPED_MODEL, tmp_path)
    assert type(padded.image_processor).__name__.startswith("LlavaImageProcessor")
    assert ImageGeometry.from_processor(padded, (96, 96)).mode == "pad"
    assert "pads images to a square" in capsys.readouterr().err
    wide = Image.new("RGB", (200, 100), (250, 10, 10))
    pixels = padded.image_processor(wide, return_tensors="pt")["pixel_values"][0]
    # The top rows are the padding, in the mean colour (0 after normalisation); the middle is the image.
    assert pixels[:, 0].abs().max() < 0.02 and pixels[0, 48].min() > 1.5
    for setting in ("size", "crop_size", "resample", "image_mean", "image_std"):  # otherwise the same processor
        assert getattr(padded.image_processor, setting) == getattr(processor.image_processor, setting)
