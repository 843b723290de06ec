"""The sdrpn command end to end: help, version, errors (exit code, one-line message, no
traceback), bench, eval --plot; generate, show and eval on a tiny checkpoint saved by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdrpn import cli
from sdrpn.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Runs ``sdrpn argv`` in this process; returns (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's --help, --version and bad options
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_user_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


# ------------------------------------------------------------------------------------------------
# Dispatcher
# ------------------------------------------------------------------------------------------------


def test_help_lists_every_installed_subcommand(capsys):
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    for name, one_line in cli.available_subcommands().items():
        assert name in out
        assert one_line.split()[0] in out
    assert {"eval", "bench", "generate", "show"} <= set(cli.available_subcommands())


@pytest.mark.parametrize("name", sorted(cli.available_subcommands()))
def test_subcommand_help_has_examples_and_matches_the_listing(capsys, name):
    import importlib

    module = importlib.import_module(cli.command_module(name))
    assert module.HELP == SUBCOMMANDS[name]  # the listing shows the module's own line
    status, out, _ = run_cli(capsys, name, "--help")
    assert status == 0
    assert "examples:" in out and f"sdrpn {name}" in out
    assert "--debug" in out


def test_version(capsys):
    from sdrpn import __version__

    status, out, _ = run_cli(capsys, "--version")
    assert status == 0 and out.strip() == f"sdrpn {__version__}"


def test_no_command_prints_help(capsys):
    status, out, _ = run_cli(capsys)
    assert status == 2 and "commands:" in out


def test_unknown_command_and_bad_option_are_one_line(capsys):
    status, _, err = run_cli(capsys, "evaluate")
    assert_user_error(status, err, "invalid choice: 'evaluate'")
    status, _, err = run_cli(capsys, "eval", "--batch-size", "0")
    assert_user_error(status, err, "--batch-size: must be at least 1")


def test_ratio_and_count_options_take_their_bounds(capsys):
    from sdrpn.cli import build_parser

    for argv in (["heads", "--model", ".", "--data", __file__, "--image-root", ".", "--min-score-ratio", "0"],
                 ["testbed", "train-model", "--data", ".", "--out", "o", "--refine-steps", "0", "--vision-steps", "0"]):
        args = build_parser(argv)[0].parse_args(argv)
        assert getattr(args, "min_score_ratio", 0) == 0 and getattr(args, "refine_steps", 0) == 0
    status, _, err = run_cli(capsys, "heads", "--model", ".", "--data", __file__, "--image-root", ".",
                             "--min-score-ratio", "1.5")
    assert_user_error(status, err, "--min-score-ratio: must be between 0 and 1, got 1.5")
    status, _, err = run_cli(capsys, "testbed", "train-model", "--data", ".", "--out", "o", "--refine-steps", "-1")
    assert_user_error(status, err, "--refine-steps: must be at least 0, got -1")


@pytest.mark.parametrize("native", [True, False])
def test_train_model_precision_and_the_emulated_bfloat16_warning(capsys, monkeypatch, tmp_path, native):
    import torch

    from sdrpn.testbed import train_model as training

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    seen = []

    def fake_train(data, out, options, progress):
        seen.append(options.bf16)
        return {"final": {}, "train_seconds": 0.0}

    monkeypatch.setattr(training, "train_model", fake_train)
    base = ["testbed", "train-model", "--data", tmp_path, "--out", tmp_path / "o"]
    status, _, err = run_cli(capsys, *base)
    assert status == 0 and seen == [True]
    assert ("bfloat16 is emulated" in err and "--precision fp32 avoids it" in err) is not native
    status, _, err = run_cli(capsys, *base, "--precision", "fp32")
    assert status == 0 and seen == [True, False] and "emulated" not in err


def test_bfloat16_inference_on_an_emulating_cpu_warns(capsys, monkeypatch):
    import torch

    from sdrpn.commands.common import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert "--dtype bf16: this CPU has no bfloat16 instructions" in capsys.readouterr().err
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert capsys.readouterr().err == ""


def test_console_entry_point_runs_in_a_fresh_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "sdrpn", "eval", "--plot", str(tmp_path / "x.png"),
                             str(tmp_path / "missing.json")], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"sdrpn eval: error: argument RESULTS: {tmp_path / 'missing.json'}: "
                                     f"no such file (see sdrpn eval --help)")


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def test_bench_lists_and_runs_scripts(capsys, tmp_path, monkeypatch):
    (tmp_path / "bench_fast.py").write_text('"""Says hello."""\nimport sys\nprint("hello", sys.argv[1:])\n'
                                            'sys.exit(3)\n')
    monkeypatch.setenv("SDRPN_BENCHMARKS_DIR", str(tmp_path))
    status, out, _ = run_cli(capsys, "bench")
    assert status == 0 and out.split() == ["fast", "Says", "hello."]
    # the script runs in a child process with the remaining arguments; its exit status is ours
    result = subprocess.run([sys.executable, "-m", "sdrpn", "bench", "fast", "--json", "x.json"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 3 and result.stdout.strip() == "hello ['--json', 'x.json']"
    status, _, err = run_cli(capsys, "bench", "slow")
    assert_user_error(status, err, "unknown benchmark 'slow'; available: fast")


def test_bench_finds_the_repository_benchmarks(capsys, monkeypatch):
    monkeypatch.delenv("SDRPN_BENCHMARKS_DIR", raising=False)
    status, out, _ = run_cli(capsys, "bench")
    assert status == 0
    assert {line.split()[0] for line in out.splitlines()} == {
        path.stem.removeprefix("bench_") for path in (REPO / "benchmarks").glob("bench_*.py")}


# ------------------------------------------------------------------------------------------------
# eval without a model: argument errors and --plot
# ------------------------------------------------------------------------------------------------


def test_eval_argument_errors(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    status, _, err = run_cli(capsys, "eval", "--benchmark", "textvqa")
    assert_user_error(status, err, "missing --model, --data, --out")
    status, _, err = run_cli(capsys, "eval", "--model", model, "--benchmark", "textvqa", "--data", tmp_path / "nope",
                             "--out", tmp_path / "r.json")
    assert_user_error(status, err, "argument --data", "no such file or directory")
    status, _, err = run_cli(capsys, "eval", "--model", model, "--benchmark", "textvq", "--data", tmp_path,
                             "--out", tmp_path / "r.json")
    assert_user_error(status, err, "unknown benchmark 'textvq'; choose one of textvqa")
    status, _, err = run_cli(capsys, "eval", "--model", model, "--benchmark", "textvqa", "--data", tmp_path,
                             "--out", tmp_path / "r.json", "--threshold", "1.5")
    assert_user_error(status, err, "--threshold: must be strictly between 0 and 1, got 1.5")
    status, _, err = run_cli(capsys, "eval", "--model", model, "--benchmark", "textvqa", "--data", tmp_path,
                             "--out", tmp_path / "r.json")
    assert_user_error(status, err, "no TextVQA annotation file found")


def write_results(path: Path, benchmark: str, methods: dict) -> Path:
    from sdrpn.eval.report import update_results

    header = {"benchmark": benchmark, "metric": "VQA accuracy", "data": "/data", "split": None, "num_samples": 10}
    summaries = {name: {"score": score, "samples_per_s": speed, "mean_visual_tokens": tokens, "num_samples": 10,
                        "with_roi": 0.5, "subsets": {}}
                 for name, (score, speed, tokens) in methods.items()}
    update_results(path, header, summaries)
    return path


def test_eval_plot_writes_png_and_numbers(capsys, tmp_path):
    first = write_results(tmp_path / "textvqa.json", "textvqa", {"baseline": (0.46, 4.0, 576)})
    # a second run with the same --out adds its method and the comparison with the baseline
    write_results(first, "textvqa", {"sdrpn": (0.58, 2.5, 760)})
    second = write_results(tmp_path / "docvqa.json", "docvqa", {"baseline": (0.21, 3.0, 576),
                                                                "sdrpn": (0.33, 1.9, 700)})
    results = json.loads(first.read_text())
    assert set(results["methods"]) == {"baseline", "sdrpn"}
    assert results["comparison"]["sdrpn"]["score_delta"] == pytest.approx(0.12)
    assert results["comparison"]["sdrpn"]["throughput_ratio"] == pytest.approx(2.5 / 4.0)

    status, out, err = run_cli(capsys, "eval", "--plot", tmp_path / "plot.png", first, second)
    assert status == 0, err
    from PIL import Image

    with Image.open(tmp_path / "plot.png") as picture:
        assert picture.format == "PNG" and picture.width > picture.height  # two panels side by side
    rows = (tmp_path / "plot.csv").read_text().splitlines()
    assert rows[0].startswith("benchmark,method,metric,score,samples_per_s,throughput_vs_baseline")
    assert len(rows) == 5
    assert any(row.startswith("textvqa,sdrpn,VQA accuracy,0.58,2.5,0.625,760") for row in rows)


def test_eval_plot_titles_each_benchmark_with_its_model_and_labels_points_with_visual_tokens(
        capsys, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from sdrpn.eval.report import update_results

    header = {"benchmark": "jsonl", "metric": "exact match", "data": "/data", "split": None, "num_samples": 10}
    summaries = {name: {"score": score, "samples_per_s": 2.0, "mean_visual_tokens": tokens, "num_samples": 10,
                        "with_roi": 0.0, "subsets": {}, "settings": {"model": "/ckpt/tiny-llava"}}
                 for name, score, tokens in (("baseline", 0.2, 144), ("res-scaling", 0.3, 576))}
    update_results(tmp_path / "results.json", header, summaries)
    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: (drawn.append(figure), save(figure, *a, **k)))
    status, _, err = run_cli(capsys, "eval", "--plot", tmp_path / "plot.png", tmp_path / "results.json")
    assert status == 0, err
    (axis,) = drawn[0].axes
    assert axis.get_title() == "jsonl · tiny-llava"
    assert sorted(text.get_text() for text in axis.texts) == ["144 visual tokens", "576 visual tokens"]
    assert (tmp_path / "plot.csv").read_text().splitlines()[1].endswith(",tiny-llava")


def test_eval_plot_errors(capsys, tmp_path):
    status, _, err = run_cli(capsys, "eval", "--plot", tmp_path / "plot.png")
    assert_user_error(status, err, "--plot needs at least one results file")
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    status, _, err = run_cli(capsys, "eval", "--plot", tmp_path / "plot.png", bogus)
    assert_user_error(status, err, "bogus.json: not a results file of sdrpn eval")
    status, _, err = run_cli(capsys, "eval", "--plot", tmp_path / "plot.jpg", bogus)
    assert_user_error(status, err, "name it *.png")


def test_debug_shows_the_traceback(capsys, tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text("[")
    status, _, err = run_cli(capsys, "eval", "--plot", tmp_path / "plot.png", bogus, "--debug")
    assert status == 2
    assert "Traceback" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith("sdrpn eval: error:")


# ------------------------------------------------------------------------------------------------
# generate, show and eval on a tiny checkpoint saved by the test
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaVA saved with save_pretrained, RPNs for it and for another checkpoint, an image."""
    import torch
    from PIL import Image, ImageDraw

    from helpers.tiny_models import save_tiny_llava, tiny_llava
    from sdrpn import RPN

    root = tmp_path_factory.mktemp("cli")
    save_tiny_llava(root / "model")
    model, _ = tiny_llava()
    rpn = RPN.from_model(model, 2, 2)
    with torch.no_grad():  # a sharper random map: some cells above the threshold, most below
        rpn.q_proj.weight.mul_(3)
    rpn.save_pretrained(root / "rpn")
    RPN.from_model(tiny_llava(seed=1)[0], 2, 2).save_pretrained(root / "rpn_other")
    image = Image.new("RGB", (160, 120), (90, 120, 160))
    ImageDraw.Draw(image).rectangle([100, 20, 130, 50], fill=(220, 30, 30))
    image.save(root / "sign.png")
    return root


def model_args(root: Path, rpn: str = "rpn") -> list:
    return ["--model", root / "model", "--rpn", root / rpn, "--device", "cpu"]


def test_generate_prints_answer_boxes_tokens_latency(capsys, checkpoint):
    status, out, err = run_cli(capsys, "generate", *model_args(checkpoint), "--image", checkpoint / "sign.png",
                               "--question", "what color is the sign?", "--threshold", "0.17", "--max-new-tokens", "3")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("answer: ")
    assert lines[1].startswith("RoI boxes (source pixels): [")
    assert lines[2].startswith("visual tokens: ") and "144 original + " in lines[2]
    assert lines[3].startswith("latency: ") and "threshold 0.17" in lines[3]


def test_generate_json_matches_the_engine(capsys, checkpoint):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sdrpn import RPN, SDRPN

    status, out, err = run_cli(capsys, "generate", *model_args(checkpoint), "--image", checkpoint / "sign.png",
                               "--question", "what color is the sign?", "--threshold", "0.17", "--json",
                               "--max-new-tokens", "4")
    assert status == 0, err
    report = json.loads(out)
    assert report["method"] == "sdrpn" and report["threshold"] == 0.17 and report["latency_s"] > 0
    model = AutoModelForImageTextToText.from_pretrained(checkpoint / "model")
    processor = AutoProcessor.from_pretrained(checkpoint / "model")
    engine = SDRPN(model, RPN.from_pretrained(checkpoint / "rpn", model), processor, threshold=0.17)
    image = Image.open(checkpoint / "sign.png")
    assert report["answer"] == engine.answer([image], ["what color is the sign?"], max_new_tokens=4)[0]
    # every box lies inside the 160x120 image, and the RoI added visual tokens
    assert report["boxes"] and all(0 <= b[0] < b[2] <= 160 and 0 <= b[1] < b[3] <= 120 for b in report["boxes"])
    assert report["visual_tokens"] > 144
    status, out, _ = run_cli(capsys, "generate", *model_args(checkpoint), "--image", checkpoint / "sign.png",
                             "--question", "what color is the sign?", "--json", "--method", "baseline")
    baseline = json.loads(out)
    assert baseline["boxes"] == [] and baseline["visual_tokens"] == 144 and "threshold" not in baseline


def test_generate_with_the_strongest_region_only(capsys, checkpoint):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sdrpn import RPN, SDRPN
    from sdrpn.roi import RoIOptions

    question = ["--image", checkpoint / "sign.png", "--question", "what color is the sign?", "--threshold", "0.17",
                "--json", "--max-new-tokens", "4"]
    status, out, err = run_cli(capsys, "generate", *model_args(checkpoint), *question)
    assert status == 0, err
    assert len(json.loads(out)["boxes"]) > 1  # so that the cap below has something to choose from
    status, out, err = run_cli(capsys, "generate", *model_args(checkpoint), *question, "--max-regions", "1")
    assert status == 0, err
    report = json.loads(out)
    assert report["max_regions"] == 1 and len(report["boxes"]) == 1
    model = AutoModelForImageTextToText.from_pretrained(checkpoint / "model")
    processor = AutoProcessor.from_pretrained(checkpoint / "model")
    engine = SDRPN(model, RPN.from_pretrained(checkpoint / "rpn", model), processor, threshold=0.17,
                   roi_options=RoIOptions(max_regions=1))
    assert report["answer"] == engine.answer([Image.open(checkpoint / "sign.png")], ["what color is the sign?"],
                                             max_new_tokens=4)[0]


def test_show_writes_the_picture(capsys, checkpoint, tmp_path):
    from PIL import Image

    from sdrpn.viz import figure_size

    out_png = tmp_path / "pictures" / "roi.png"
    status, out, err = run_cli(capsys, "show", *model_args(checkpoint), "--image", checkpoint / "sign.png",
                               "--question", "what color is the sign?", "--threshold", "0.17", "--size", "200",
                               "--max-new-tokens", "3", "--out", out_png)
    assert status == 0, err
    assert f"wrote {out_png}" in out and "with SD-RPN:" in out and "without:" in out
    with Image.open(out_png) as picture:
        assert picture.format == "PNG" and picture.size == figure_size(200)
        drawn = picture.tobytes()
    status, out, err = run_cli(capsys, "show", *model_args(checkpoint), "--image", checkpoint / "sign.png",
                               "--question", "what color is the sign?", "--threshold", "0.17", "--size", "200",
                               "--max-new-tokens", "3", "--max-regions", "1", "--out", out_png)
    assert status == 0, err
    with Image.open(out_png) as picture:  # one box and its crop instead of two
        assert picture.size == figure_size(200) and picture.tobytes() != drawn


def write_jsonl_benchmark(root: Path, count: int = 4) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = []
    for index in range(count):
        Image.new("RGB", (120 + 10 * index, 100), (40 * index, 80, 160)).save(root / "images" / f"{index}.png")
        lines.append(json.dumps({"question_id": f"q{index}", "image": f"images/{index}.png",
                                 "question": "what color is the sign?", "answers": ["red"]}))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_eval_jsonl_baseline_and_sdrpn(capsys, checkpoint, tmp_path):
    data = write_jsonl_benchmark(tmp_path / "data")
    out = tmp_path / "results" / "tiny.json"
    status, stdout, err = run_cli(capsys, "eval", *model_args(checkpoint), "--benchmark", "jsonl", "--data", data,
                                  "--method", "baseline", "sdrpn", "--threshold", "0.17", "--batch-size", "3",
                                  "--max-new-tokens", "3", "--no-progress", "--out", out)
    assert status == 0, err
    results = json.loads(out.read_text())
    assert results["benchmark"] == "jsonl" and results["num_samples"] == 4
    assert results["prompts"]["example"].endswith("Answer the question using a single word or phrase.")
    assert set(results["methods"]) == {"baseline", "sdrpn"}
    baseline, sdrpn = results["methods"]["baseline"], results["methods"]["sdrpn"]
    assert baseline["mean_visual_tokens"] == 144 and sdrpn["mean_visual_tokens"] > 144
    assert sdrpn["settings"]["threshold"] == 0.17
    assert results["comparison"]["sdrpn"]["visual_tokens_ratio"] > 1
    for method in ("baseline", "sdrpn"):
        records = [json.loads(line) for line in (out.parent / f"tiny.{method}.jsonl").read_text().splitlines()]
        assert "settings" in records[0] and len(records) == 5
        assert {"question_id", "prediction", "score", "boxes", "visual_tokens", "latency_s"} <= set(records[1])
    assert "baseline" in stdout and "sdrpn" in stdout and "Δ baseline" in stdout
    # rerunning answers nothing new and reports the same numbers
    status, _, err = run_cli(capsys, "eval", *model_args(checkpoint), "--benchmark", "jsonl", "--data", data,
                             "--method", "sdrpn", "--threshold", "0.17", "--max-new-tokens", "3", "--no-progress",
                             "--out", out)
    assert status == 0, err
    assert json.loads(out.read_text())["methods"]["sdrpn"]["score"] == sdrpn["score"]


def test_eval_without_a_preset_uses_the_rpns_own_threshold(capsys, checkpoint, tmp_path):
    from helpers.tiny_models import tiny_llava
    from sdrpn import RPN

    RPN.from_model(tiny_llava()[0], 2, 2, threshold=0.07).save_pretrained(tmp_path / "rpn")
    data = write_jsonl_benchmark(tmp_path / "data", count=1)
    out = tmp_path / "results.json"
    status, _, err = run_cli(capsys, "eval", "--model", checkpoint / "model", "--rpn", tmp_path / "rpn",
                             "--device", "cpu", "--benchmark", "jsonl", "--data", data, "--method", "sdrpn",
                             "--max-new-tokens", "2",
                             "--no-progress", "--out", out)
    assert status == 0, err
    assert json.loads(out.read_text())["methods"]["sdrpn"]["settings"]["threshold"] == 0.07


@pytest.mark.parametrize(
    "case, argv, fragments",
    [
        ("missing image", ["generate", "--image", "{root}/nope.png", "--question", "q"],
         ["argument --image: {root}/nope.png: no such file"]),
        ("non-image file", ["generate", "--image", "{root}/notes.png", "--question", "q"],
         ["notes.png: not a readable image"]),
        ("RPN of another model", ["generate", "--rpn", "{root}/rpn_other", "--image", "{root}/sign.png",
                                  "--question", "q"], ["--rpn", "rpn_other", "another checkpoint"]),
        ("bad threshold", ["generate", "--image", "{root}/sign.png", "--question", "q", "--threshold", "0"],
         ["argument --threshold: must be strictly between 0 and 1, got 0"]),
        ("unknown method", ["generate", "--image", "{root}/sign.png", "--question", "q", "--method", "zoom"],
         ["unknown method 'zoom'; choose from baseline"]),
        ("unknown benchmark", ["eval", "--benchmark", "textvq", "--data", "{root}", "--out", "{root}/r.json"],
         ["unknown benchmark 'textvq'"]),
        ("not a checkpoint", ["generate", "--model", "{root}", "--image", "{root}/sign.png", "--question", "q"],
         ["not a Hugging Face checkpoint directory (no config.json)"]),
        ("missing GPU", ["generate", "--device", "cuda:7", "--image", "{root}/sign.png", "--question", "q"],
         ["--device cuda:7"]),
    ],
)
def test_user_errors_are_one_line_without_traceback(capsys, checkpoint, case, argv, fragments):
    (checkpoint / "notes.png").write_text("not an image")
    command, rest = argv[0], [a.format(root=checkpoint) for a in argv[1:]]
    defaults = {"--model": checkpoint / "model", "--rpn": checkpoint / "rpn", "--device": "cpu"}
    for option, value in defaults.items():  # the case's own options take precedence
        if option not in rest:
            rest += [option, str(value)]
    status, _, err = run_cli(capsys, command, *rest)
    assert_user_error(status, err, *[f.format(root=checkpoint) for f in fragments])


# ------------------------------------------------------------------------------------------------
# methods without an RPN, answers people can read, bad records
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["baseline", "res-scaling", "vicrop"])
def test_the_methods_that_read_no_rpn_need_no_rpn(capsys, checkpoint, method):
    plain = ["--model", checkpoint / "model", "--device", "cpu"]
    status, out, err = run_cli(capsys, "generate", *plain, "--image", checkpoint / "sign.png", "--question",
                               "what color is the sign?", "--method", method, "--max-new-tokens", "2", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["method"] == method and "threshold" not in report


def test_an_rpn_method_without_an_rpn_says_which_need_none(capsys, checkpoint, tmp_path):
    plain = ["--model", checkpoint / "model", "--device", "cpu"]
    status, _, err = run_cli(capsys, "generate", *plain, "--image", checkpoint / "sign.png", "--question", "q")
    assert_user_error(status, err, "--rpn is required for sdrpn", "baseline, res-scaling, vicrop need none")
    data = write_jsonl_benchmark(tmp_path / "data", count=1)
    status, _, err = run_cli(capsys, "eval", *plain, "--benchmark", "jsonl", "--data", data, "--method", "baseline",
                             "sdrpn-attention", "--out", tmp_path / "r.json")
    assert_user_error(status, err, "--rpn is required for sdrpn-attention")


def test_eval_without_an_rpn_runs_the_methods_that_need_none(capsys, checkpoint, tmp_path):
    data = write_jsonl_benchmark(tmp_path / "data", count=2)
    out = tmp_path / "results.json"
    status, _, err = run_cli(capsys, "eval", "--model", checkpoint / "model", "--device", "cpu", "--benchmark",
                             "jsonl", "--data", data, "--method", "baseline", "res-scaling", "--max-new-tokens", "2",
                             "--no-progress", "--out", out)
    assert status == 0, err
    results = json.loads(out.read_text())
    assert set(results["methods"]) == {"baseline", "res-scaling"}
    assert results["prompts"]["template"] == "vicuna_v1"  # LLaVA's, without an RPN to say otherwise
    assert all("rpn" not in summary and "rpn_weights" not in summary["settings"]
               for summary in results["methods"].values())


def test_an_empty_answer_is_shown_as_such(capsys, checkpoint, monkeypatch):
    from sdrpn.eval import predictors
    from sdrpn.eval.runner import EMPTY_ANSWER, Prediction

    def answer_nothing(self, images, prompts, output_logits=False):
        return predictors.EngineOutput([Prediction(text="", visual_tokens=144) for _ in images], None, 0.01)

    monkeypatch.setattr(predictors.EnginePredictor, "run", answer_nothing)
    status, out, err = run_cli(capsys, "generate", *model_args(checkpoint), "--image", checkpoint / "sign.png",
                               "--question", "what color is the sign?", "--method", "baseline")
    assert status == 0, err
    assert out.splitlines()[0] == f"answer: {EMPTY_ANSWER}" == "answer: (empty: the model stopped at once)"


def test_k_and_t_out_of_range_say_the_valid_range():
    from sdrpn.commands.common import check_rpn_layers
    from sdrpn.errors import UserError

    check_rpn_layers(4, 3, 8)
    check_rpn_layers(0, 8, 8)
    for start, blocks in ((15, 3), (6, 3), (-1, 2), (8, 1)):
        with pytest.raises(UserError, match=r"this model has 8 layers \(0 \.\. 7\): K must be 0 \.\. 7 and T "
                                            r"1 \.\. 8 - K \(for example --K 4 --T 3\)"):
            check_rpn_layers(start, blocks, 8)
    with pytest.raises(UserError, match="for example --K 15 --T 3"):
        check_rpn_layers(30, 3, 32)


def test_eval_reports_counts_and_skips_bad_records(capsys, checkpoint, tmp_path):
    data = write_jsonl_benchmark(tmp_path / "data", count=3)
    (data / "images" / "2.png").write_text("not an image")
    lines = (data / "test.jsonl").read_text().splitlines()
    lines.insert(1, '{"question_id": "broken", "image": ')
    lines.append(json.dumps({"question_id": "gone", "image": "images/gone.png", "question": "q", "answers": ["x"]}))
    lines.append(json.dumps({"question_id": "no-answer", "image": "images/0.png", "question": "q"}))
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.json"
    status, stdout, err = run_cli(capsys, "eval", *model_args(checkpoint), "--benchmark", "jsonl", "--data", data,
                                  "--method", "baseline", "sdrpn", "--threshold", "0.17", "--max-new-tokens", "2",
                                  "--no-progress", "--out", out)
    assert status == 0, err
    path = data / "test.jsonl"
    assert f"sdrpn eval: {path}:2: skipped: unreadable line: Expecting value at column 36" in err
    assert f"sdrpn eval: {path}:5 (question_id gone): skipped: image not found: {data / 'images/gone.png'}" in err
    assert f"sdrpn eval: {path}:6 (question_id no-answer): skipped: missing field 'answer'" in err
    assert f"sdrpn eval: {path}:4 (question_id q2): skipped: corrupt or unreadable image: " in err
    assert err.count("question_id q2") == 1  # found by the first method, not tried again
    assert ("skipped 4 records: 1 unreadable line, 1 missing field 'answer', 1 image not found, "
            "1 corrupt or unreadable image (each reported above)") in stdout
    assert stdout.startswith("jsonl: 2 questions (4 records skipped), metric exact match")
    results = json.loads(out.read_text())
    assert results["skipped"] == 4 and results["num_samples"] == 2
    assert [summary["num_samples"] for summary in results["methods"].values()] == [2, 2]


def test_eval_resumes_on_the_rpns_weights_not_its_path(capsys, checkpoint, tmp_path):
    import shutil

    from helpers.tiny_models import tiny_llava
    from sdrpn import RPN

    data = write_jsonl_benchmark(tmp_path / "data", count=2)
    out = tmp_path / "results.json"
    shutil.copytree(checkpoint / "rpn", tmp_path / "rpn")
    question = ["--benchmark", "jsonl", "--data", data, "--method", "sdrpn", "--threshold", "0.17",
                "--max-new-tokens", "2", "--no-progress", "--out", out]
    arguments = ["--model", checkpoint / "model", "--device", "cpu"]
    assert run_cli(capsys, "eval", *arguments, "--rpn", tmp_path / "rpn", *question)[0] == 0
    first = json.loads(out.read_text())["methods"]["sdrpn"]
    assert first["settings"]["rpn_weights"].startswith("sha256:") and first["rpn"] == str(tmp_path / "rpn")
    assert first["timed_samples"] == 2
    shutil.move(tmp_path / "rpn", tmp_path / "moved")  # the same RPN elsewhere: resumed, nothing to answer
    status, _, err = run_cli(capsys, "eval", *arguments, "--rpn", tmp_path / "moved", *question)
    assert status == 0, err
    again = json.loads(out.read_text())["methods"]["sdrpn"]
    assert again["rpn"] == str(tmp_path / "moved") and again["score"] == first["score"]
    shutil.rmtree(tmp_path / "moved")  # another RPN written where the first one was: not mixed with it
    RPN.from_model(tiny_llava()[0], 2, 2).save_pretrained(tmp_path / "moved")
    status, _, err = run_cli(capsys, "eval", *arguments, "--rpn", tmp_path / "moved", *question)
    assert status == 2 and "holds predictions made with other settings (rpn_weights:" in err
