"""``sdrpn demo`` on an untrained testbed-sized LLaVA saved by the test, and without the shipped assets."""

from __future__ import annotations

import pytest

from sdrpn.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The testbed's tiny LLaVA (untrained) and an RPN at K = 4, T = 3, saved like the shipped ones."""
    from sdrpn import RPN
    from sdrpn.testbed.tiny_model import build_model, build_processor

    root = tmp_path_factory.mktemp("demo")
    model = build_model()
    model.save_pretrained(root / "model")
    build_processor().save_pretrained(root / "model")
    RPN.from_model(model, 4, 3).save_pretrained(root / "rpn")
    return root


def test_demo_prints_the_table_and_writes_the_pictures(capsys, checkpoint, tmp_path):
    from PIL import Image

    from sdrpn.data.synthetic import split_sample
    from sdrpn.viz import figure_size

    out = tmp_path / "demo"
    status = main(["demo", "--model", str(checkpoint / "model"), "--rpn", str(checkpoint / "rpn"),
                   "--questions", "2", "--out", str(out), "--device", "cpu", "--max-new-tokens", "3"])
    printed, err = capsys.readouterr()
    print(printed)  # the demo's output, for `pytest -s`
    assert status == 0, err
    lines = printed.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("#  question"))
    assert "baseline" in lines[header] and "SD-RPN" in lines[header] and "latency ms" in lines[header]
    for index in range(2):
        sample = split_sample(0, "test", index)
        row = lines[header + 1 + index]
        assert row.startswith(f"{index}  {sample.question}") and f"  {sample.answer}  " in row
        assert row.count("(right)") + row.count("(wrong)") == 2  # both methods' answers, marked
        assert "144 / " in row  # the baseline reads the 12 x 12 grid only
    summary = next(line for line in lines if line.startswith("baseline "))
    assert "/2 right" in summary and "SD-RPN " in summary and "mean latency" in summary
    with Image.open(out / "roi.png") as picture:
        assert picture.format == "PNG" and picture.size == figure_size(512)
    for index in range(2):
        with Image.open(out / "images" / f"{index}.png") as image:
            assert image.size == split_sample(0, "test", index).image.size


def _demo_row(capsys, arguments) -> tuple[str, str]:
    """The header line and question 0's row of a one-question demo."""
    status = main(["demo", "--questions", "1", "--device", "cpu", "--max-new-tokens", "3", *arguments])
    printed, err = capsys.readouterr()
    assert status == 0, err
    lines = printed.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("#  question"))
    return lines[0], lines[header + 1]


def test_demo_asks_the_questions_of_the_design_the_model_was_trained_on(capsys, checkpoint, tmp_path):
    import json
    import shutil

    from sdrpn.data.synthetic import DESIGNS, manifest_config, split_sample

    model = tmp_path / "model"
    shutil.copytree(checkpoint / "model", model)
    (model / "training.json").write_text(json.dumps({"data": {"seed": 0, "config": manifest_config(
        DESIGNS["one-detail"])}}))
    one_detail, classic = split_sample(0, "test", 0, DESIGNS["one-detail"]), split_sample(0, "test", 0)
    assert (one_detail.question, one_detail.answer) != (classic.question, classic.answer)
    paths = ["--model", str(model), "--rpn", str(checkpoint / "rpn"), "--out", str(tmp_path / "out")]

    first, row = _demo_row(capsys, paths)
    assert "(one-detail design, seed 0)" in first
    assert row.startswith(f"0  {one_detail.question}") and f"  {one_detail.answer}  " in row
    first, row = _demo_row(capsys, [*paths, "--design", "classic"])  # the flag wins
    assert "(classic design, seed 0)" in first
    assert row.startswith(f"0  {classic.question}") and f"  {classic.answer}  " in row


def test_the_trained_design_comes_from_training_json(tmp_path):
    import json

    from sdrpn.data.synthetic import DESIGNS, manifest_config
    from sdrpn.errors import UserError
    from sdrpn.testbed.train_model import trained_design

    assert trained_design(tmp_path) is None  # no training.json
    summary = tmp_path / "training.json"
    for name, config in DESIGNS.items():
        summary.write_text(json.dumps({"data": {"config": manifest_config(config)}}))
        assert trained_design(tmp_path) == name
    summary.write_text(json.dumps({"data": {"seed": 0}}))  # a manifest from before designs existed
    assert trained_design(tmp_path) == "classic"
    summary.write_text(json.dumps({"data": {"config": {"digit_scale": 9}}}))
    assert trained_design(tmp_path) is None  # no design names it
    summary.write_text("{")
    with pytest.raises(UserError, match="training.json: not a training summary"):
        trained_design(tmp_path)


def test_missing_shipped_assets_are_a_one_line_error(capsys, monkeypatch, tmp_path):
    from sdrpn.testbed import shipped

    monkeypatch.setattr(shipped, "SHIPPED_MODEL", tmp_path / "tiny-llava")
    monkeypatch.setattr(shipped, "SHIPPED_RPN", tmp_path / "tiny-llava-rpn")
    status = main(["demo", "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("sdrpn demo: error: the shipped tiny model is missing")
    assert str(tmp_path / "tiny-llava") in err and "sdrpn testbed train-model" in err
    assert not (tmp_path / "out").exists()  # nothing is written before the model loads

    (tmp_path / "tiny-llava").mkdir()
    main(["demo"])
    _, err = capsys.readouterr()
    assert "the shipped tiny model's RPN is missing" in err and "sdrpn testbed run" in err


def test_shipped_paths_live_in_the_package():
    from pathlib import Path

    import sdrpn
    from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN

    package = Path(sdrpn.__file__).resolve().parent
    assert SHIPPED_MODEL.is_relative_to(package) and SHIPPED_RPN.is_relative_to(package)
    assert SHIPPED_MODEL.parts[-3:] == ("testbed", "assets", "tiny-llava")
    assert SHIPPED_RPN.parts[-3:] == ("testbed", "assets", "tiny-llava-rpn")


def test_shipped_assets_load_and_fit_the_budget():
    """The shipped tiny LLaVA and RPN: safetensors only, at most 20 MB, a model card, and they load
    through the standard classes and ``RPN.from_pretrained`` (which checks they belong together)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sdrpn import RPN
    from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN

    files = [path for directory in (SHIPPED_MODEL, SHIPPED_RPN) for path in directory.iterdir()]
    assert sum(path.stat().st_size for path in files) <= 20 * 2**20
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".pth", ".pkl")]
    card = (SHIPPED_MODEL / "README.md").read_text()
    assert "## Training" in card and "min on" in card and "## Validation accuracy" in card
    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL)
    AutoProcessor.from_pretrained(SHIPPED_MODEL)
    rpn = RPN.from_pretrained(SHIPPED_RPN, model)
    assert 0.0 < rpn.threshold < 1.0 and rpn.config["labels"]["heads"]


def test_demo_runs_on_the_shipped_assets(capsys, tmp_path):
    import json

    from sdrpn.testbed.shipped import SHIPPED_RPN

    status = main(["demo", "--questions", "2", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    printed, err = capsys.readouterr()
    assert status == 0, err
    threshold = json.loads((SHIPPED_RPN / "config.json").read_text())["threshold"]
    assert f"threshold {threshold:g}" in printed and "/2 right" in printed
    assert (tmp_path / "demo" / "roi.png").is_file()
