"""The evaluation runner with stand-in methods: scoring, resume after a crash, refusal to mix
settings, likelihood ranking, and sharding over two torchrun processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdrpn.errors import UserError
from sdrpn.eval import runner
from sdrpn.eval.datasets import load_benchmark
from sdrpn.eval.runner import Prediction, RunSettings, read_predictions
from sdrpn.prompts import TEMPLATES

REPO = Path(__file__).resolve().parents[1]


def write_questions(root: Path, count: int, options: bool = False) -> Path:
    """A generic JSONL benchmark: question i shows a digit i % 10 and its answer is that digit."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        Image.new("RGB", (16, 12), (index * 20 % 256, 0, 0)).save(root / "images" / f"q{index}.png")
        record = {"question_id": f"q{index}", "image": f"images/q{index}.png",
                  "question": f"Which digit is shown in picture {index}?", "answers": [str(index % 10)],
                  "subset": "even" if index % 2 == 0 else "odd"}
        if options:
            record.update(options=["red", "green", "blue"], answers=["green"])
        lines.append(json.dumps(record))
    path = root / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class ScriptedMethod:
    """Answers the right digit except for the questions listed in ``wrong``; counts its calls."""

    method = "scripted"

    def __init__(self, wrong=(), fail_after_batches=None):
        self.wrong = set(wrong)
        self.fail_after_batches = fail_after_batches
        self.answered: list[str] = []
        self.batch_sizes: list[int] = []

    def answer(self, images, prompts):
        if self.fail_after_batches is not None and len(self.batch_sizes) >= self.fail_after_batches:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        self.batch_sizes.append(len(prompts))
        assert all(image.mode == "RGB" for image in images)
        predictions = []
        for prompt in prompts:
            index = int(prompt.split("picture ")[1].split("?")[0])
            self.answered.append(f"q{index}")
            digit = "x" if f"q{index}" in self.wrong else str(index % 10)
            predictions.append(Prediction(text=f"{digit}.", boxes=[[0.0, 0.0, 4.0, 4.0]] if index % 3 == 0 else [],
                                          visual_tokens=576 + (100 if index % 3 == 0 else 0)))
        return predictions


SETTINGS = RunSettings(method="scripted", benchmark="jsonl", metric="exact", choice_scoring="generate",
                       options={"threshold": 0.15})


def test_run_scores_and_writes_every_prediction(tmp_path):
    samples = load_benchmark("jsonl", write_questions(tmp_path, 6))
    method = ScriptedMethod(wrong={"q1", "q4"})
    out = tmp_path / "results.scripted.jsonl"
    summary = runner.run(samples, method, SETTINGS, out, batch_size=4, progress=False)
    assert method.batch_sizes == [4, 2]
    assert summary["score"] == pytest.approx(4 / 6)
    assert summary["subsets"] == {"even": pytest.approx(2 / 3), "odd": pytest.approx(2 / 3)}
    assert summary["num_samples"] == 6
    assert summary["mean_visual_tokens"] == pytest.approx(576 + 100 * 2 / 6)  # q0 and q3 have a RoI
    assert summary["with_roi"] == pytest.approx(2 / 6)
    assert summary["samples_per_s"] > 0
    settings, records = read_predictions(out)
    assert settings == SETTINGS.as_dict()
    assert [r["question_id"] for r in records] == [f"q{i}" for i in range(6)]
    first = records[0]
    assert first["prediction"] == "0." and first["score"] == 1.0 and first["answers"] == ["0"]
    assert first["boxes"] == [[0.0, 0.0, 4.0, 4.0]] and first["visual_tokens"] == 676
    assert first["prompt"].endswith("Answer the question using a single word or phrase.")
    assert first["batch_size"] == 4 and first["latency_s"] >= 0


def test_resume_after_interruption_skips_finished_questions(tmp_path):
    samples = load_benchmark("jsonl", write_questions(tmp_path, 7))
    out = tmp_path / "predictions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        runner.run(samples, ScriptedMethod(fail_after_batches=2), SETTINGS, out, batch_size=2, progress=False)
    _, done = read_predictions(out)
    assert [r["question_id"] for r in done] == ["q0", "q1", "q2", "q3"]
    # a write cut short by a hard kill leaves an unterminated line behind
    with open(out, "a") as handle:
        handle.write('{"question_id": "q4", "predic')
    method = ScriptedMethod()
    summary = runner.run(samples, method, SETTINGS, out, batch_size=2, progress=False)
    assert method.answered == ["q4", "q5", "q6"]
    _, records = read_predictions(out)
    assert sorted(r["question_id"] for r in records) == [f"q{i}" for i in range(7)]
    assert summary["num_samples"] == 7 and summary["score"] == 1.0
    # a complete run does nothing the second time
    idle = ScriptedMethod()
    assert runner.run(samples, idle, SETTINGS, out, progress=False)["score"] == 1.0
    assert idle.answered == []


def test_summary_covers_only_the_requested_questions(tmp_path):
    samples = load_benchmark("jsonl", write_questions(tmp_path, 6))
    out = tmp_path / "predictions.jsonl"
    runner.run(samples, ScriptedMethod(wrong={"q5"}), SETTINGS, out, progress=False)
    summary = runner.run(samples[:3], ScriptedMethod(), SETTINGS, out, progress=False)  # like --limit 3
    assert summary["num_samples"] == 3 and summary["score"] == 1.0


def test_other_settings_are_refused(tmp_path):
    samples = load_benchmark("jsonl", write_questions(tmp_path, 2))
    out = tmp_path / "predictions.jsonl"
    runner.run(samples, ScriptedMethod(), SETTINGS, out, progress=False)
    other = RunSettings(method="scripted", benchmark="jsonl", metric="exact", choice_scoring="generate",
                        options={"threshold": 0.1})
    with pytest.raises(UserError, match=r"other settings \(threshold: 0.15 -> 0.1\); delete it"):
        runner.run(samples, ScriptedMethod(), other, out, progress=False)


def test_foreign_file_is_refused(tmp_path):
    samples = load_benchmark("jsonl", write_questions(tmp_path, 2))
    out = tmp_path / "predictions.jsonl"
    out.write_text("hello\nworld\n")
    with pytest.raises(UserError, match="line 1 is not a prediction record"):
        runner.run(samples, ScriptedMethod(), SETTINGS, out, progress=False)


class LikelihoodMethod:
    method = "likelihood"

    def __init__(self):
        self.prompts = []

    def rank_options(self, images, prompts, options):
        self.prompts += prompts
        # "green" (correct) is most likely for even pictures, "blue" for odd ones
        return [Prediction(text="", option_scores=[-9.0, -1.0, -2.0] if i % 2 == 0 else [-9.0, -3.0, -2.0],
                           option_tokens=[1, 1, 1], visual_tokens=576)
                for i in range(len(prompts))]


def test_multiple_choice_by_likelihood(tmp_path):
    samples = load_benchmark("jsonl", write_questions(tmp_path, 4, options=True))
    settings = RunSettings(method="likelihood", benchmark="jsonl", metric="exact", choice_scoring="likelihood",
                           options={})
    method = LikelihoodMethod()
    summary = runner.run(samples, method, settings, tmp_path / "ll.jsonl", batch_size=4, progress=False)
    assert summary["score"] == 0.5  # "green" wins for the 1st and 3rd question of the batch
    assert method.prompts[0] == samples[0].prompt  # the prompt lists the lettered options
    _, records = read_predictions(tmp_path / "ll.jsonl")
    assert records[0]["prediction"] == "green" and records[0]["choice"] == 1
    assert records[0]["option_scores"] == [-9.0, -1.0, -2.0]
    with pytest.raises(UserError, match="cannot rank options by likelihood"):
        runner.run(samples, ScriptedMethod(), settings, tmp_path / "other.jsonl", progress=False)


class LetterMethod:
    method = "letters"

    def answer(self, images, prompts):
        assert all("\nA. red\nB. green\nC. blue\n" in prompt for prompt in prompts)
        return [Prediction(text=text) for text in ["B", "(C) blue", "green", "It is red."][:len(prompts)]]


def test_multiple_choice_by_generation(tmp_path):
    samples = load_benchmark("jsonl", write_questions(tmp_path, 4, options=True))
    settings = RunSettings(method="letters", benchmark="jsonl", metric="exact", choice_scoring="generate",
                           options={})
    summary = runner.run(samples, LetterMethod(), settings, tmp_path / "gen.jsonl", batch_size=4, progress=False)
    _, records = read_predictions(tmp_path / "gen.jsonl")
    assert [r["choice"] for r in records] == [1, 2, 1, 0]
    assert summary["score"] == 0.5


TORCHRUN_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_eval_runner import SETTINGS, ScriptedMethod
from sdrpn import distributed
from sdrpn.eval import runner
from sdrpn.eval.datasets import load_benchmark

root = Path({root!r})
samples = load_benchmark("jsonl", root / "test.jsonl")
method = ScriptedMethod(wrong={{"q2"}})
with distributed.process_group() as context:
    rank, world = context.rank, context.world_size
    summary = runner.run(samples, method, SETTINGS, root / "out" / "predictions.jsonl", batch_size=2,
                         progress=False)
(root / f"answered.{{rank}}.json").write_text(json.dumps({{"world": world, "answered": method.answered}}))
if summary is not None:
    (root / "summary.json").write_text(json.dumps(summary))
"""


def test_torchrun_two_processes_shard_and_merge(tmp_path):
    write_questions(tmp_path, 9)
    script = tmp_path / "run_eval.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(REPO / "tests"), root=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = [json.loads((tmp_path / f"answered.{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["world"] for s in shards] == [2, 2]
    assert shards[0]["answered"] == ["q0", "q2", "q4", "q6", "q8"]
    assert shards[1]["answered"] == ["q1", "q3", "q5", "q7"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl"]  # parts merged and removed
    _, records = read_predictions(out / "predictions.jsonl")
    assert sorted(r["question_id"] for r in records) == sorted(f"q{i}" for i in range(9))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_samples"] == 9 and summary["score"] == pytest.approx(8 / 9)
    # the merged file equals a single-process run's predictions
    single = tmp_path / "single.jsonl"
    runner.run(load_benchmark("jsonl", tmp_path / "test.jsonl"), ScriptedMethod(wrong={"q2"}), SETTINGS, single,
               progress=False)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("latency_s", "batch_size")}  # noqa: E731
    single_records = read_predictions(single)[1]
    assert sorted(map(json.dumps, map(strip, records))) == sorted(map(json.dumps, map(strip, single_records)))


class FirstTokenEngine:
    """Stands in for sdrpn.SDRPN: one generation step whose logits favour a chosen token per row."""

    def __init__(self, processor, favourite_tokens):
        import torch

        self.processor = processor
        self.favourite_tokens = favourite_tokens
        self.adapter = type("Adapter", (), {"device": torch.device("cpu")})()
        self.options = type("Options", (), {"threshold": 0.15, "strategy": "mask"})()
        self.prompt_template = TEMPLATES["plain"]
        self.calls = []

    def prompt(self, question):
        return self.prompt_template.render(question, self.processor)

    def generate(self, input_ids, images, **kwargs):
        import torch

        self.calls.append(kwargs)
        logits = torch.zeros(input_ids.shape[0], len(self.processor.tokenizer))
        for row, token in enumerate(self.favourite_tokens):
            logits[row, token] = 5.0
        return type("Output", (), {"sequences": input_ids, "logits": [logits], "roi": None,
                                   "visual_tokens": torch.full((input_ids.shape[0],), 144)})()


def test_engine_predictor_ranks_option_letters_by_first_token_likelihood(tmp_path):
    import torch

    from helpers.tiny_models import tiny_processor
    from sdrpn.eval.predictors import EnginePredictor

    processor = tiny_processor()
    processor.tokenizer.add_tokens(["A", "B", "C"])
    letter = {name: processor.tokenizer.convert_tokens_to_ids(name) for name in "ABC"}
    engine = FirstTokenEngine(processor, [letter["B"], letter["A"]])
    predictor = EnginePredictor(engine, "sdrpn", threshold=0.2)
    images = [Image.new("RGB", (40, 30)), Image.new("RGB", (30, 40))]
    predictions = predictor.rank_options(images, ["which?\nA. red\nB. green\nC. blue", "which?\nA. x\nB. y"],
                                         [("red", "green", "blue"), ("x", "y")])
    assert engine.calls[0]["max_new_tokens"] == 1 and engine.calls[0]["output_logits"] is True
    assert engine.calls[0]["threshold"] == 0.2 and engine.calls[0]["do_sample"] is False
    vocabulary = len(processor.tokenizer)
    favourite = 5.0 - torch.logsumexp(torch.tensor([5.0] + [0.0] * (vocabulary - 1)), 0).item()
    other = -torch.logsumexp(torch.tensor([5.0] + [0.0] * (vocabulary - 1)), 0).item()
    assert predictions[0].option_scores == pytest.approx([other, favourite, other], abs=1e-5)
    assert predictions[1].option_scores == pytest.approx([favourite, other], abs=1e-5)
    assert predictions[0].option_tokens == [1, 1, 1] and predictions[0].visual_tokens == 144


def test_engine_predictor_refuses_likelihood_without_letter_tokens():
    from helpers.tiny_models import tiny_processor
    from sdrpn.eval.predictors import EnginePredictor

    engine = FirstTokenEngine(tiny_processor(), [0])  # the word-level vocabulary has no "A", "B"
    with pytest.raises(UserError, match="no distinct token for each option letter"):
        EnginePredictor(engine, "baseline").rank_options([Image.new("RGB", (8, 8))], ["q"], [("x", "y")])


def test_a_crop_given_as_source_squares_is_the_questions_roi():
    """ViCrop's crop, given as the (B, 4) squares ``[x0, y0, side, side]`` it cut from the source
    images, counts as each question's RoI, in source pixels ``[x0, y0, x1, y1)``."""
    import torch

    from sdrpn.eval.predictors import roi_boxes

    squares = torch.tensor([[10, 20, 96, 96], [0, 5, 40, 40]])
    images = [Image.new("RGB", (200, 150)), Image.new("RGB", (50, 60))]
    assert roi_boxes(None, squares, images) == [[[10.0, 20.0, 106.0, 116.0]], [[0.0, 5.0, 40.0, 45.0]]]
    assert roi_boxes(None, None, images) == [[], []]


def test_throughput_counts_the_questions_answered_in_this_run_only():
    records = [{"question_id": "earlier", "latency_s": 4.0, "batch_size": 1, "score": 1.0, "visual_tokens": 144,
                "boxes": [], "subset": ""},
               {"question_id": "now", "latency_s": 0.5, "batch_size": 1, "score": 0.0, "visual_tokens": 144,
                "boxes": [], "subset": ""}]
    summary = runner.summarize_records(SETTINGS, records, Path("p.jsonl"), timed={"now"})
    assert summary["samples_per_s"] == pytest.approx(2.0) and summary["timed_samples"] == 1
    assert summary["num_samples"] == 2 and summary["score"] == 0.5
    resumed = runner.summarize_records(SETTINGS, records, Path("p.jsonl"), timed=set())  # nothing new: all
    assert resumed["samples_per_s"] == pytest.approx(2 / 4.5) and resumed["timed_samples"] == 2
