"""Self-distillation with the sdrpn command on a local Qwen2.5-VL checkpoint (the tiny one of
:mod:`helpers.tiny_qwen_checkpoint`), end to end: ``sdrpn heads`` ranks heads with a sink detector
the tiny model has, ``sdrpn label`` labels with them, ``sdrpn train`` refuses to guess the depth of a
model the authors released none for and trains at the depth given, and ``generate`` and ``eval``
run the trained RPN, the fast path answering as the reference.

The tiny random model attends almost uniformly (about 1/600 on every image token of the 24 x 24
labelling view), so the sink threshold sits above that, and the label rules that need a peaked map
(a peak floor, a foreground box under half the grid) are relaxed: the labels then tell the image
from the grey padding of its square view.
"""

from __future__ import annotations

import json

import pytest

from helpers.cli import error_line, run_sdrpn
from helpers.tiny_qwen import qwen_images
from helpers.tiny_qwen_checkpoint import save_tiny_qwen_checkpoint

QUESTION = "what color is the sign ?"
# Three pad to the labelling view's grey square; the square one's foreground box is the whole grid.
SIZES = [(400, 300), (300, 400), (500, 380), (336, 336)]
RECORDS = 8
LAYERS = 6
SINK = ["--sink-heads", "1:0,3", "--sink-threshold", "0.01"]  # the shape of the authors' natural-image detector
RELAXED_RULES = ["--min-peak", "0", "--max-box-frac", "1"]
DEPTH = ["--K", "2", "--T", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The checkpoint and questions about images of four sizes."""
    root = tmp_path_factory.mktemp("qwen_distill")
    save_tiny_qwen_checkpoint(root / "model")
    (root / "images").mkdir()
    lines = []
    for index in range(RECORDS):
        qwen_images([SIZES[index % len(SIZES)]], seed=index)[0].save(root / "images" / f"{index}.png")
        lines.append(json.dumps({"question_id": f"q{index}", "image": f"images/{index}.png", "text": QUESTION}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def model_args(root, rpn: bool = False) -> list:
    return ["--model", root / "model", *(["--rpn", root / "rpn"] if rpn else []), "--device", "cpu"]


def data_args(root) -> list:
    return ["--data", root / "questions.jsonl", "--image-root", root, "--max-new-tokens", "2", "--no-progress"]


@pytest.fixture(scope="module")
def heads(root):
    status, out, err = run_sdrpn("heads", *model_args(root), *data_args(root), *SINK, "--out", root / "heads.json")
    assert status == 0, err
    return root / "heads.json", out


@pytest.fixture(scope="module")
def labels(root, heads):
    status, out, err = run_sdrpn("label", *model_args(root), *data_args(root), *SINK, *RELAXED_RULES,
                                 "--heads", heads[0], "--out", root / "labels")
    assert status == 0, err
    return root / "labels", out


@pytest.fixture(scope="module")
def rpn(root, labels):
    status, out, err = run_sdrpn("train", *model_args(root), "--labels", labels[0], "--out", root / "rpn", *DEPTH,
                                 "--max-steps", "2", "--batch-size", "4", "--eval-samples", "1", "--no-progress")
    assert status == 0, err
    return root / "rpn", out


# ------------------------------------------------------------------------------------------------
# heads and label
# ------------------------------------------------------------------------------------------------


def test_heads_selects_from_the_middle_layers_and_records_the_chat_template(heads):
    path, out = heads
    selection = json.loads(path.read_text())
    assert selection["format"] == "sdrpn-heads/1" and selection["prompt"]["name"] == "processor"
    # the default search: the middle third of the 6 layers
    assert selection["heads"] and {layer for layer, _ in selection["heads"]} <= {2, 3}
    scored = {(entry["layer"], entry["head"]) for entry in selection["scores"]}
    assert scored == {(layer, head) for layer in (2, 3) for head in range(4)}
    assert f"scored 2 layers x 4 heads over {RECORDS} samples" in out


@pytest.mark.parametrize("sink, message", [
    (["--sink-preset", "qwen2.5-vl-7b-natural"],
     "sink heads 9:4,22 (--sink-heads or --sink-preset): heads [(9, 4), (9, 22)] do not exist in a model with 6 "
     "layers of 4 heads"),
    (["--sink", "norm", "--sink-layer", str(LAYERS)], f"--sink-layer {LAYERS}: the model has 6 layers (0 .. 5)"),
    (["--sink", "attention", "--sink-layer", "1"],  # the default threshold, 1e-3, is under the uniform attention
     "the sink detector marked every image token of every sample as a sink, which leaves no map to score: raise "
     "--sink-threshold"),
], ids=["preset-of-a-larger-model", "layer-past-the-model", "every-token-a-sink"])
def test_heads_refuses_sink_detectors_the_model_cannot_run(root, tmp_path, sink, message):
    status, _, err = run_sdrpn("heads", *model_args(root), *data_args(root), "--max-samples", "2", *sink,
                               "--out", tmp_path / "heads.json")
    assert status != 0 and message in error_line(err)
    assert not (tmp_path / "heads.json").exists()


def test_label_reads_the_selected_heads_with_the_familys_rules(heads, labels):
    path, out = labels
    options = json.loads((path / "run.json").read_text())["options"]
    assert options["heads"] == json.loads(heads[0].read_text())["heads"]
    assert options["sink"] == {"method": "attention", "layer": None, "threshold": 0.01, "dims": None,
                               "heads": [[1, 0], [1, 3]]}
    assert options["padding_is_background"] and options["blur_box"] and options["min_peak"] == 0
    # the square image has no padding: its foreground box is the whole grid, which max-box-frac 1 still refuses
    assert f"output: {RECORDS} samples, 6 with valid labels" in out


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


def test_train_refuses_to_guess_the_depth_and_names_the_valid_range(root, labels, tmp_path):
    status, _, err = run_sdrpn("train", *model_args(root), "--labels", labels[0], "--out", tmp_path / "rpn")
    error = error_line(err)
    assert status != 0 and "no released RPN depth for a 6-layer model of this family; give --K and --T" in error
    assert "K must be 0 .. 5 and T 1 .. 6 - K (for example --K 3 --T 3)" in error
    status, _, err = run_sdrpn("train", *model_args(root), "--labels", labels[0], "--out", tmp_path / "rpn",
                               "--K", "5", "--T", "3")
    assert status != 0 and error_line(err).endswith("--K 5 --T 3: the RPN spans layers K .. K+T-1, and this model "
                                                    "has 6 layers (0 .. 5): K must be 0 .. 5 and T 1 .. 6 - K "
                                                    "(for example --K 3 --T 3)")
    assert not (tmp_path / "rpn").exists()


def test_train_writes_the_familys_rpn_at_the_given_depth(labels, rpn):
    path, out = rpn
    config = json.loads((path / "config.json").read_text())
    assert config["family"] == "qwen2_5_vl" and (config["start_layer"], config["num_blocks"]) == (2, 2)
    # the authors' Qwen2.5-VL head: M-RoPE, no final-norm copy; their threshold
    assert config["use_rope"] and not config["use_final_norm"] and config["threshold"] == 0.25
    assert config["prompt"]["name"] == "processor" and config["labels"]["heads"] == \
        json.loads((labels[0] / "run.json").read_text())["options"]["heads"]
    assert 0 < config["calibrated_threshold"] < 1
    assert f"trained 2 steps; wrote the RPN to {path}" in out


# ------------------------------------------------------------------------------------------------
# generate and eval with the trained RPN
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [[], ["--threshold", "calibrated"]], ids=["default", "calibrated"])
def test_generate_fast_path_answers_as_the_reference(root, rpn, threshold):
    reports = {}
    for method in ("sdrpn", "sdrpn-reference"):
        status, out, err = run_sdrpn("generate", *model_args(root, rpn=True), "--image", root / "images" / "0.png",
                                     "--question", QUESTION, "--method", method, *threshold, "--max-new-tokens", "4",
                                     "--json")
        assert status == 0, err
        reports[method] = json.loads(out)
    fast, reference = reports["sdrpn"], reports["sdrpn-reference"]
    for key in ("answer", "boxes", "visual_tokens", "threshold", "strategy"):
        assert fast[key] == reference[key], key
    assert fast["strategy"] == "masked"


def test_eval_runs_the_trained_rpn(root, rpn, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question_id": f"q{index}", "image": f"images/{index}.png",
                                        "question": QUESTION, "answers": ["red"]}) + "\n" for index in range(3)))
    out = tmp_path / "results.json"
    status, stdout, err = run_sdrpn("eval", *model_args(root, rpn=True), "--benchmark", "jsonl", "--data", data,
                                    "--image-root", root, "--method", "baseline", "sdrpn", "sdrpn-reference",
                                    "--batch-size", "2", "--max-new-tokens", "3", "--no-progress", "--out", out)
    assert status == 0, err
    results = json.loads(out.read_text())
    assert results["num_samples"] == 3 and results["prompts"]["template"] == "processor"
    records = {}
    for method in ("baseline", "sdrpn", "sdrpn-reference"):
        lines = [json.loads(line) for line in (tmp_path / f"results.{method}.jsonl").read_text().splitlines()]
        records[method] = {record["question_id"]: record for record in lines[1:]}
        if method != "baseline":
            settings = lines[0]["settings"]
            assert settings["threshold"] == 0.25 and settings["strategy"] == "masked"
            assert settings["rpn_weights"].startswith("sha256:")
    for question, fast in records["sdrpn"].items():
        reference = records["sdrpn-reference"][question]
        assert (fast["prediction"], fast["boxes"], fast["visual_tokens"]) == \
            (reference["prediction"], reference["boxes"], reference["visual_tokens"]), question
    # a RoI view adds tokens to the question's own
    assert any(fast["visual_tokens"] > records["baseline"][question]["visual_tokens"]
               for question, fast in records["sdrpn"].items() if fast["boxes"])
