"""``--model sdrpn`` for lmms-eval: generate_until on hand-built requests, the model arguments, the
answerers on the shipped tiny model, the JSONL task writer and the entry point.

Without lmms-eval installed (the main environment), the two parts of it the plugin imports, the
``lmms`` base class and ``Collator``, are replaced by stubs that do what lmms-eval 0.7.3's do
(:mod:`helpers.lmms_eval_stubs`); in the lmms-eval environment (``make lmms-eval-test``) the same
tests run against the real ones.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers.lmms_eval_stubs import HAS_LMMS_EVAL, Request, plugin  # noqa: F401 (plugin: a fixture)
from sdrpn.errors import UserError
from sdrpn.eval.runner import Prediction
from sdrpn.integrations import answerers, lmms_task
from sdrpn.integrations.answerers import AnswerSettings, load_answerer
from sdrpn.integrations.lmms_model_args import parse_model_args
from sdrpn.integrations.lmms_requests import GenerationOptions, question_text
from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN


class FakeAnswerer:
    """Answers "<question> #<n>" with the question's number of visual tokens, and records each call."""

    method = "sdrpn"

    def __init__(self, answers=None):
        self.calls = []
        self.answers = answers or {}

    def answer(self, images, prompts, max_new_tokens):
        self.calls.append((list(prompts), max_new_tokens, [image.size for image in images]))
        return [Prediction(text=self.answers.get(prompt, f" {prompt} "), boxes=[[0.0, 0.0, 4.0, 4.0]],
                           visual_tokens=100 + len(prompt)) for prompt in prompts]


def make_model(plugin, monkeypatch, tmp_path, answerer=None, **model_args):
    fake = answerer or FakeAnswerer()
    monkeypatch.setattr(plugin, "load_answerer", lambda settings: fake)
    model = plugin.SDRPNLmms(pretrained=str(tmp_path), **model_args)
    return model, fake


def toy_requests(model, questions, gen_kwargs=None, images=1, task="toy", split="test"):
    """One request per question about a document holding ``images`` images of different sizes."""
    docs = {doc_id: {"images": [Image.new("RGB", (8 + doc_id, 8)) for _ in range(images)]}
            for doc_id in range(len(questions))}
    model.task_dict.setdefault(task, {})[split] = docs
    return [Request((question, dict(gen_kwargs or {}), lambda doc: doc["images"], doc_id, task, split), task)
            for doc_id, question in enumerate(questions)]


# ------------------------------------------------------------------------------------------------
# generate_until
# ------------------------------------------------------------------------------------------------


def test_answers_come_back_in_the_order_of_the_requests(plugin, monkeypatch, tmp_path):
    model, fake = make_model(plugin, monkeypatch, tmp_path, batch_size=2)
    questions = ["a", "ccc", "bb", "dddd", "e"]
    assert model.generate_until(toy_requests(model, questions)) == questions
    # longest first, two per batch, each with its own document's image
    assert [prompts for prompts, _, _ in fake.calls] == [["dddd", "ccc"], ["bb", "a"], ["e"]]
    assert [sizes for _, _, sizes in fake.calls][0] == [(11, 8), (9, 8)]


def test_requests_with_different_options_never_share_a_batch(plugin, monkeypatch, tmp_path):
    model, fake = make_model(plugin, monkeypatch, tmp_path, batch_size=8)
    short = toy_requests(model, ["q0", "q1", "q2"], {"max_new_tokens": 4})
    longer = toy_requests(model, ["r0", "r1"], {"max_new_tokens": 32}, task="other")
    requests = [short[0], longer[0], short[1], longer[1], short[2]]
    assert model.generate_until(requests) == ["q0", "r0", "q1", "r1", "q2"]
    assert sorted((sorted(prompts), limit) for prompts, limit, _ in fake.calls) == [
        (["q0", "q1", "q2"], 4), (["r0", "r1"], 32)]


def test_max_new_tokens_defaults_to_sdrpn_evals(plugin, monkeypatch, tmp_path):
    model, fake = make_model(plugin, monkeypatch, tmp_path)
    model.generate_until(toy_requests(model, ["q"]))
    assert fake.calls[0][1] == 128


@pytest.mark.parametrize("until, answer, expected", [
    (["\n\n"], "12\n\nThe number is 12.", "12"),
    ("ASSISTANT:", "12 ASSISTANT: more", "12"),
    (["USER:", "\n"], "twelve\nUSER: next", "twelve"),  # the first stop string in the text wins
    (["", "zzz"], "  12  ", "12"),  # empty stop strings are ignored; answers stay stripped
    ([], "12\n\nmore", "12\n\nmore"),
])
def test_stop_strings_cut_the_answer(plugin, monkeypatch, tmp_path, until, answer, expected):
    model, _ = make_model(plugin, monkeypatch, tmp_path, answerer=FakeAnswerer({"q": answer}))
    assert model.generate_until(toy_requests(model, ["q"], {"until": until})) == [expected]


def test_greedy_tasks_with_sampling_keys_are_answered(plugin, monkeypatch, tmp_path):
    model, _ = make_model(plugin, monkeypatch, tmp_path)
    greedy = {"temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    assert model.generate_until(toy_requests(model, ["q"], greedy)) == ["q"]
    # do_sample false wins over a temperature, as in transformers
    assert model.generate_until(toy_requests(model, ["q"], {"temperature": 0.7, "do_sample": False})) == ["q"]


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"num_beams": 4}, "beam search"),
    ({"temperature": 0.7}, "sampling"),
    ({"do_sample": True}, "sampling"),
])
def test_refuses_beams_and_sampling(plugin, monkeypatch, tmp_path, gen_kwargs, message):
    model, fake = make_model(plugin, monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=f"task toy asks for {message}"):
        model.generate_until(toy_requests(model, ["q"], gen_kwargs))
    assert fake.calls == []


@pytest.mark.parametrize("images, message", [(2, "gives 2 images"), (0, "gives 0 images")])
def test_refuses_anything_but_one_image(plugin, monkeypatch, tmp_path, images, message):
    model, _ = make_model(plugin, monkeypatch, tmp_path)
    with pytest.raises(ValueError, match=f"task toy {message} for document 0; sdrpn answers questions about "
                                         f"exactly one image"):
        model.generate_until(toy_requests(model, ["q"], images=images))


def test_refuses_a_path_instead_of_an_image(plugin, monkeypatch, tmp_path):
    model, _ = make_model(plugin, monkeypatch, tmp_path)
    model.task_dict["toy"] = {"test": {0: {"image": "images/0.png"}}}
    request = Request(("q", {}, lambda doc: [doc["image"]], 0, "toy", "test"))
    with pytest.raises(ValueError, match="gives a str .'images/0.png'. as the image of document 0; sdrpn needs "
                                         "a PIL image"):
        model.generate_until([request])


def test_refuses_loglikelihood_and_multi_round(plugin, monkeypatch, tmp_path):
    model, _ = make_model(plugin, monkeypatch, tmp_path)
    with pytest.raises(NotImplementedError, match="generation only; task mmbench scores log-likelihoods"):
        model.loglikelihood([Request(("ctx", " A"), task_name="mmbench")])
    with pytest.raises(NotImplementedError, match="one round"):
        model.generate_until_multi_round([])


def test_refuses_several_processes(plugin, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        make_model(plugin, monkeypatch, tmp_path)


def test_image_placeholder_of_the_task_is_dropped(plugin, monkeypatch, tmp_path):
    model, fake = make_model(plugin, monkeypatch, tmp_path)
    model.generate_until(toy_requests(model, ["<image>\nWhat is written?"]))
    assert fake.calls[0][0] == ["What is written?"]
    assert question_text("What is <b>written</b>?") == "What is <b>written</b>?"


def test_roi_log_has_one_line_per_answer_in_request_order(plugin, monkeypatch, tmp_path):
    log = tmp_path / "logs" / "rois.jsonl"
    model, _ = make_model(plugin, monkeypatch, tmp_path, batch_size=2, roi_log=str(log))
    model.generate_until(toy_requests(model, ["a", "ccc", "bb"], {"until": ["c"]}))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["doc_id"], r["prediction"], r["visual_tokens"]) for r in records] == [(0, "a", 101), (1, "", 103),
                                                                                     (2, "bb", 102)]
    assert records[0] == {"task": "toy", "split": "test", "doc_id": 0, "method": "sdrpn", "prediction": "a",
                          "visual_tokens": 101, "boxes": [[0.0, 0.0, 4.0, 4.0]]}


# ------------------------------------------------------------------------------------------------
# Model arguments and generation options
# ------------------------------------------------------------------------------------------------


def test_model_args_as_lmms_eval_parses_them(tmp_path):
    args = parse_model_args(pretrained=str(tmp_path), rpn=str(tmp_path), method="res-scaling", threshold=0.1,
                            strategy="box", max_regions=1, dtype="bf16", device="cpu", prompt="vicuna_v1",
                            batch_size="4", roi_log="out/rois.jsonl")
    assert args.answer == AnswerSettings(model=tmp_path, rpn=tmp_path, method="res-scaling", threshold=0.1,
                                         strategy="box", max_regions=1, dtype="bf16", device="cpu",
                                         prompt="vicuna_v1")
    assert (args.batch_size, args.roi_log) == (4, Path("out/rois.jsonl"))
    assert parse_model_args(pretrained=str(tmp_path), threshold="calibrated").answer.threshold == "calibrated"
    defaults = parse_model_args(pretrained=str(tmp_path))
    assert (defaults.answer.rpn, defaults.answer.method, defaults.batch_size, defaults.roi_log) == (None, "sdrpn",
                                                                                                   1, None)


@pytest.mark.parametrize("change, message", [
    ({"treshold": 0.1}, "does not take model_args treshold; it takes\n  pretrained: "),
    ({"pretrained": None}, "needs model_args pretrained=DIR"),
    ({"pretrained": "/no/such/dir"}, "pretrained=/no/such/dir: /no/such/dir: no such directory"),
    ({"threshold": 2}, "threshold=2: must be strictly between 0 and 1"),
    ({"threshold": "high"}, "threshold=high: expected a number between 0 and 1 or 'calibrated'"),
    ({"max_regions": 0}, "max_regions=0: must be at least 1"),
    ({"strategy": "none"}, "strategy=none: choose from mask, masked, box"),
    ({"dtype": "int8"}, "dtype=int8: choose from auto, "),
    ({"prompt": "chatml"}, "prompt=chatml: choose from plain, processor, vicuna_v1"),
    ({"batch_size": "auto"}, "fixed --batch_size N"),
    ({"batch_size": 0}, "batch_size=0: must be at least 1"),
])
def test_bad_model_args_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_model_args(**{"pretrained": str(tmp_path), **change})


def test_generation_options():
    options = GenerationOptions.from_gen_kwargs({"until": "\n", "max_new_tokens": 16, "image_aspect_ratio": "pad"},
                                                "docvqa_val")
    assert options == GenerationOptions(max_new_tokens=16, until=("\n",))
    with pytest.raises(ValueError, match="until must be a string or a list of strings"):
        GenerationOptions.from_gen_kwargs({"until": [3]}, "t")


# ------------------------------------------------------------------------------------------------
# Answerers on the shipped tiny model
# ------------------------------------------------------------------------------------------------


def synthetic_images():
    from sdrpn.data.synthetic import split_sample

    samples = [split_sample(0, "test", index) for index in range(3)]
    return [sample.image for sample in samples], [sample.question for sample in samples]


def test_baseline_without_an_rpn_answers_as_the_engine_baseline():
    images, questions = synthetic_images()
    plain = load_answerer(AnswerSettings(model=SHIPPED_MODEL, method="baseline", prompt="processor"))
    engine = load_answerer(AnswerSettings(model=SHIPPED_MODEL, rpn=SHIPPED_RPN, method="baseline"))
    assert isinstance(plain, answerers.PlainAnswerer) and isinstance(engine, answerers.EngineAnswerer)
    expected = engine.answer(images, questions, max_new_tokens=8)
    assert plain.answer(images, questions, max_new_tokens=8) == expected
    assert [p.visual_tokens for p in expected] == [144] * 3 and all(p.boxes == [] for p in expected)


def test_sdrpn_answerer_reports_rois():
    images, questions = synthetic_images()
    engine = load_answerer(AnswerSettings(model=SHIPPED_MODEL, rpn=SHIPPED_RPN, threshold="calibrated"))
    predictions = engine.answer(images, questions, max_new_tokens=8)
    assert engine.threshold == pytest.approx(0.15)  # the shipped RPN's calibrated one (its default is 0.1)
    assert all((p.visual_tokens > 144) == bool(p.boxes) for p in predictions)


def test_only_the_baseline_runs_without_an_rpn():
    with pytest.raises(UserError, match="method sdrpn needs an RPN"):
        load_answerer(AnswerSettings(model=SHIPPED_MODEL))
    with pytest.raises(UserError, match="unknown method 'zoom'"):
        load_answerer(AnswerSettings(model=SHIPPED_MODEL, rpn=SHIPPED_RPN, method="zoom"))


# ------------------------------------------------------------------------------------------------
# The JSONL task and the entry point
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from sdrpn.data.synthetic import generate_dataset

    data = tmp_path_factory.mktemp("synthetic")
    generate_dataset(data, 0, 0, 3, seed=0, progress=False)
    return data


def load_hooks(yaml_file: Path, task: str):
    spec = importlib.util.spec_from_file_location(f"{task}_hooks", yaml_file.with_name(f"{task}_hooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jsonl_task_prompts_images_and_scores_as_sdrpn_eval(synthetic_data, tmp_path):
    from sdrpn.eval.datasets import get_benchmark

    yaml_file = lmms_task.write_jsonl_task(synthetic_data, tmp_path / "tasks", task="toy", metric="relaxed")
    config = yaml.load(yaml_file.read_text(), Loader=yaml.BaseLoader)  # leaves the !function tags as text
    assert config["dataset_path"] == "json" and config["task"] == "toy"
    assert config["dataset_kwargs"]["data_files"]["test"] == str((synthetic_data / "test.jsonl").resolve())
    assert config["metric_list"][0]["metric"] == "relaxed_accuracy"
    hooks = load_hooks(yaml_file, "toy")
    sample = get_benchmark("jsonl").read(synthetic_data, "test", None)[1]
    doc = json.loads((synthetic_data / "test.jsonl").read_text().splitlines()[1])
    assert hooks.doc_to_text(doc) == sample.prompt
    assert hooks.doc_to_text(doc, {"pre_prompt": ""}) == sample.prompt
    (image,) = hooks.doc_to_visual(doc)
    assert image.mode == "RGB" and image.size == Image.open(sample.image).size
    answer = float(sample.answers[0])
    assert hooks.process_results(doc, [str(answer * 1.04)]) == {"relaxed_accuracy": 1.0}
    assert hooks.process_results(doc, [str(answer * 1.06)]) == {"relaxed_accuracy": 0.0}


def test_jsonl_task_writer_refuses_bad_input(synthetic_data, tmp_path, capsys):
    with pytest.raises(ValueError, match="task name 'my-task'"):
        lmms_task.write_jsonl_task(synthetic_data, tmp_path, task="my-task")
    assert lmms_task.main(["--data", str(synthetic_data), "--split", "val2", "--out", str(tmp_path)]) == 2
    assert "val2.jsonl" in capsys.readouterr().err
    assert lmms_task.main(["--data", str(synthetic_data), "--out", str(tmp_path / "t")]) == 0
    assert "--include_path" in capsys.readouterr().out and (tmp_path / "t" / "sdrpn_jsonl.yaml").is_file()


def test_entry_point_names_a_light_module():
    entries = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "sdrpn"]
    assert len(entries) == 1, "the installed sdrpn declares no lmms_eval.models entry point: reinstall (make build)"
    assert entries[0].value == "sdrpn.integrations.lmms_eval_registration:manifest"
    # lmms-eval imports the module while it builds its registry: nothing heavy may load with it.
    code = ("import sys, sdrpn.integrations.lmms_eval_registration; "
            "print(sorted(m for m in ('torch', 'transformers', 'lmms_eval') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (make lmms-eval-test installs it)")
def test_lmms_eval_finds_the_model():
    from lmms_eval.models import get_model, get_model_manifest

    assert get_model_manifest("sdrpn").simple_class_path == "sdrpn.integrations.lmms_eval.SDRPNLmms"
    assert get_model("sdrpn").__name__ == "SDRPNLmms"


def test_readme_task_template_is_what_the_writer_writes(synthetic_data, tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In lmms-eval", 1)[1].split("\n## ", 1)[0]
    shown = yaml.load(section.split("```yaml\n", 1)[1].split("```", 1)[0], Loader=yaml.BaseLoader)
    written = yaml.load(lmms_task.write_jsonl_task(synthetic_data, tmp_path, task=shown["task"]).read_text(),
                        Loader=yaml.BaseLoader)
    shown["dataset_kwargs"]["data_files"]["test"] = written["dataset_kwargs"]["data_files"]["test"]
    assert shown == written
