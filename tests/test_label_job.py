"""Record readers, shards and the `sdrpn label` pipeline: bad records, resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.tiny_models import tiny_llava
from sdrpn.distill.heads import HeadSelection
from sdrpn.distill.label_job import LabelOptions, Labeller, run_label_job
from sdrpn.distill.labels import IGNORE_INDEX, assign_labels
from sdrpn.distill.records import RecordProblem, open_rgb_image, read_records
from sdrpn.distill.shards import (
    ShardError,
    completed_records,
    read_index,
    read_shard,
    shard_paths,
    write_shard,
)
from sdrpn.distill.sinks import SinkSpec
from sdrpn.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GROUNDING_HEADS = "1:2"
# The sharpened head below is sharp for the tiny model's own chat template (the labelling tests'
# prompts); LLaVA's default, vicuna_v1, adds a system sentence of unknown words it was not made for.
PROMPT = "processor"
QUESTIONS = ["what color is the sign ?", "where is the car ?", "what is written on the board ?",
             "how many dogs are there ?", "which letter is on the left ?"]


# ------------------------------------------------------------------------------------------------
# Shared with test_train.py and test_distill_torchrun.py
# ------------------------------------------------------------------------------------------------


def sharpened_tiny_llava(seed: int = 0):
    """The tiny LLaVA with layer 1 head 2 made sharp (q and k scaled), so that its attention gives
    valid labels; random tiny models attend almost uniformly and every sample would be ignored."""
    model, processor = tiny_llava(seed=seed)
    attention = model.model.language_model.layers[1].self_attn
    head_dim = attention.head_dim
    with torch.no_grad():
        attention.q_proj.weight[2 * head_dim:3 * head_dim] *= 6.0
        attention.k_proj.weight[2 * head_dim:3 * head_dim] *= 6.0
    return model, processor


def save_labelling_model(directory: Path) -> Path:
    model, processor = sharpened_tiny_llava()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_images(root: Path, count: int, seed: int = 0) -> list[str]:
    """Dark pictures with one bright square each, at random places and sizes."""
    root.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    names = []
    for index in range(count):
        height, width = generator.integers(80, 160, size=2)
        pixels = np.full((height, width, 3), 30, dtype=np.uint8)
        side = int(generator.integers(16, 40))
        top, left = generator.integers(0, height - side), generator.integers(0, width - side)
        pixels[top:top + side, left:left + side] = generator.integers(150, 255, size=3)
        names.append(f"img{index:03d}.png")
        Image.fromarray(pixels).save(root / names[-1])
    return names


def write_plain_jsonl(path: Path, images: list[str]) -> Path:
    lines = [json.dumps({"question_id": f"q{i}", "image": name, "text": QUESTIONS[i % len(QUESTIONS)]})
             for i, name in enumerate(images)]
    path.write_text("\n".join(lines) + "\n")
    return path


def label_options(**overrides) -> LabelOptions:
    options = dict(heads=HeadSelection.parse(GROUNDING_HEADS), sink=SinkSpec.create("none"), max_new_tokens=6,
                   batch_size=3, shard_size=4, prompt=PROMPT)
    options.update(overrides)
    return LabelOptions(**options)


def label_cli(*arguments) -> list[str]:
    return [sys.executable, "-m", "sdrpn", "label", *map(str, arguments)]


def comparable(directory: Path) -> list[dict]:
    """The index of a labelling output, each row with its tensors, without shard placement."""
    rows = []
    for row in read_index(directory):
        tensors, _ = read_shard(directory / row["shard"])
        rows.append({**{k: v for k, v in row.items() if k not in ("shard", "row")},
                     **{name: tensor[row["row"]] for name, tensor in tensors.items()}})
    return rows


def assert_same_labels(found: list[dict], expected: list[dict]) -> None:
    assert [row["record"] for row in found] == [row["record"] for row in expected]
    for got, want in zip(found, expected):
        assert {k: v for k, v in got.items() if not isinstance(v, torch.Tensor)} == \
               {k: v for k, v in want.items() if not isinstance(v, torch.Tensor)}
        torch.testing.assert_close(got["grounding"], want["grounding"], atol=1e-3, rtol=1e-2)
        assert torch.equal(got["labels"], want["labels"]) and torch.equal(got["sink"], want["sink"])


# ------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------


def test_llava_json_array_with_line_numbers(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text("""[
  {"id": "a1", "image": "coco/1.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]},
  {"id": "a2", "conversations": [{"from": "human", "value": "No image here"}]},
  {"id": "a3", "image": "2.jpg", "conversations": [{"from": "gpt", "value": "hi"}]},
  {"id": "a4", "image": "3.jpg", "conversations": [{"from": "human", "value": "<image>\\n  "}]},
  7,
  {"id": 5, "image": ["4.jpg"], "conversations": [{"from": "human", "value": "Read it.\\n<image>"}]},
  {"id": "a6", "image": "5.jpg", "conversations": [{"from": "human" "value": "broken"}]},
  {"id": "a7", "image": "6.jpg", "conversations": [{"from": "human", "value": "never read"}]}
]""")
    records, issues = read_records(path)
    assert [(r.question_id, r.image, r.question, r.line, r.index) for r in records] == [
        ("a1", "coco/1.jpg", "What is it?", 2, 0), ("5", "4.jpg", "Read it.", 8, 1)]
    assert [(issue.line, issue.question_id) for issue in issues] == [
        (4, "a2"), (5, "a3"), (6, "a4"), (7, None), (9, None)]
    reasons = [issue.reason for issue in issues]
    assert "no image" in reasons[0] and "no human turn" in reasons[1] and "empty question" in reasons[2]
    assert "JSON object" in reasons[3] and "rest of the array is skipped" in reasons[4]
    assert all(issue.file == str(path) and issue.action == "skipped" for issue in issues)


def test_jsonl_plain_and_llava_records(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"question_id": 1, "image": "a.png", "text": "What color?"}),
        "",
        "{not json",
        json.dumps({"id": "x", "image": "b.png", "conversations": [{"from": "human", "value": "<image>\nWhere?"}]}),
        json.dumps({"question_id": 3, "image": "c.png", "text": ""}),
        json.dumps({"question_id": 4, "image": "d.png", "prompt": "wrong key"}),
    ]))
    records, issues = read_records(path)
    assert [(r.question_id, r.question, r.line) for r in records] == [("1", "What color?", 1), ("x", "Where?", 4)]
    assert [(i.line, i.reason.split(":")[0]) for i in issues] == [
        (3, "unreadable line"), (5, "empty question"),
        (6, "neither a LLaVA record (with 'conversations') nor a plain record (with 'text')")]


def test_open_rgb_image(tmp_path):
    path = tmp_path / "q.jsonl"
    Image.new("L", (20, 10), 128).save(tmp_path / "gray.png")
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "rgb.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    full = (tmp_path / "rgb.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[:len(full) // 2])
    path.write_text("\n".join(json.dumps({"question_id": n, "image": f"{n}.png", "text": "q"})
                              for n in ["gray", "rgb", "bad", "cut", "gone"]))
    records, _ = read_records(path)
    image, mode = open_rgb_image(tmp_path, records[0].image)
    assert image.mode == "RGB" and mode == "L" and image.getpixel((0, 0)) == (128, 128, 128)
    image, mode = open_rgb_image(tmp_path, records[1].image)
    assert image.mode == "RGB" and mode == "RGB"
    for record, message in zip(records[2:], ["corrupt", "corrupt", "not found"]):
        with pytest.raises(RecordProblem, match=message):
            open_rgb_image(tmp_path, record.image)


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


def _tensors(count, grid=(2, 3)):
    return {"grounding": torch.rand(count, *grid), "sink": torch.zeros(count, *grid, dtype=torch.bool),
            "labels": torch.full((count, *grid), IGNORE_INDEX)}


def test_shard_round_trip_and_completed_records(tmp_path):
    write_shard(tmp_path / "shard-r000-000000.safetensors", _tensors(2), [{"record": 0}, {"record": 3}])
    write_shard(tmp_path / "shard-r001-000000.safetensors", _tensors(1), [{"record": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-r000-000000.safetensors",
                                                          "shard-r001-000000.safetensors"]
    tensors, rows = read_shard(tmp_path / "shard-r000-000000.safetensors")
    assert {k: v.dtype for k, v in tensors.items()} == {"grounding": torch.float16, "sink": torch.bool,
                                                       "labels": torch.int8}
    assert rows == [{"record": 0}, {"record": 3}] and tensors["labels"].eq(IGNORE_INDEX).all()
    done = completed_records(tmp_path)
    assert sorted(done) == [0, 1, 3]
    assert done[3] == {"record": 3, "shard": "shard-r000-000000.safetensors", "row": 1}
    write_shard(tmp_path / "shard-r001-000001.safetensors", _tensors(1), [{"record": 3}])
    with pytest.raises(ShardError, match="record 3 is in both"):
        completed_records(tmp_path)


def test_shard_rejects_mismatched_rows(tmp_path):
    with pytest.raises(ValueError, match="2 samples for 1 index rows"):
        write_shard(tmp_path / "s.safetensors", _tensors(2), [{"record": 0}])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# The pipeline in process
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Nine good records and one of each kind of bad record, in plain JSONL."""
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    names = write_images(images, 9)
    Image.open(images / names[4]).convert("L").save(images / "gray.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    lines = [json.dumps({"question_id": f"q{i}", "image": name, "text": QUESTIONS[i % len(QUESTIONS)]})
             for i, name in enumerate(names)]
    lines[2:2] = [json.dumps({"question_id": "missing", "image": "nowhere.png", "text": "what ?"})]
    lines[5:5] = ["{\"question_id\": \"cut"]
    lines += [json.dumps({"question_id": "corrupt", "image": "corrupt.png", "text": "what ?"}),
              json.dumps({"question_id": "gray", "image": "gray.png", "text": "what color ?"}),
              json.dumps({"question_id": "empty", "image": names[0], "text": "  "})]
    data = root / "questions.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, images


def _run(labeller, data, images, out):
    records, issues = read_records(data)
    return run_label_job(labeller, records, images, out, {"model": "tiny"}, parse_issues=issues, progress=False)


def test_label_job_writes_consistent_shards_and_reports_every_bad_record(dataset, tmp_path):
    data, images = dataset
    model, processor = sharpened_tiny_llava()
    labeller = Labeller(model, processor, label_options())
    summary = _run(labeller, data, images, tmp_path)

    index = read_index(tmp_path)
    assert [row["question_id"] for row in index] == [f"q{i}" for i in range(9)] + ["gray"]
    assert summary.labelled == summary.total_samples == 10
    assert 0 < summary.total_valid == sum(row["valid"] for row in index) < 10  # some samples are ignored
    assert len(shard_paths(tmp_path)) == 3  # 10 samples, 4 per shard
    for row in index:
        tensors, rows = read_shard(tmp_path / row["shard"])
        assert rows[row["row"]]["record"] == row["record"]
        grounding = tensors["grounding"][row["row"]].float()
        labels = tensors["labels"][row["row"]].long()
        expected = assign_labels(grounding.flatten(), tensors["sink"][row["row"]].flatten(), grounding.shape)
        # Labels are made from the fp32 map; the stored fp16 map gives the same ones away from the thresholds.
        assert (labels == expected).float().mean() > 0.95
        assert row["valid"] == bool((labels != IGNORE_INDEX).any())
        assert isinstance(row["answer"], str) and row["image_mode"] == ("L" if row["question_id"] == "gray" else "RGB")

    issues = [json.loads(line) for line in (tmp_path / "issues.jsonl").read_text().splitlines()]
    found = {(issue["line"], issue["action"], issue["reason"].split(":")[0]) for issue in issues}
    assert found == {(3, "skipped", "image not found"), (6, "skipped", "unreadable line"),
                     (12, "skipped", "corrupt or unreadable image"),
                     (13, "converted", "L image converted to RGB"), (14, "skipped", "empty question")}
    assert all(issue["file"] == str(data) for issue in issues)
    report = summary.report()
    assert "skipped 4 records" in report and "converted 1 non-RGB" in report

    # A second run finds everything done, writes nothing new and keeps the same output.
    before = comparable(tmp_path)
    again = _run(labeller, data, images, tmp_path)
    assert again.labelled == 0 and again.already_done == 10 and len(shard_paths(tmp_path)) == 3
    assert_same_labels(comparable(tmp_path), before)


def test_ctrl_c_saves_the_labelled_samples_and_says_how_to_resume(dataset, tmp_path, capsys, monkeypatch):
    from sdrpn.cli import INTERRUPTED_EXIT, main
    from sdrpn.errors import Interrupted

    data, images = dataset
    model, processor = sharpened_tiny_llava()
    labeller = Labeller(model, processor, label_options(shard_size=100))  # no shard would be full yet
    label, batches = labeller.label, []

    def interrupted_at_the_third_batch(*args):
        batches.append(1)
        if len(batches) == 3:
            raise KeyboardInterrupt
        return label(*args)

    labeller.label = interrupted_at_the_third_batch
    with pytest.raises(Interrupted) as stopped:
        _run(labeller, data, images, tmp_path)
    saved = len(completed_records(tmp_path))
    assert saved == 5  # the two batches labelled before Ctrl-C (one record skipped), written on the way out
    assert str(stopped.value) == (f"{saved} labelled samples are saved in {tmp_path} (5 of them in this run); "
                                  f"rerun the same command to resume")

    from sdrpn.commands import label as command

    def interrupted_command(args):
        raise stopped.value

    monkeypatch.setattr(command, "run", interrupted_command)
    capsys.readouterr()
    status = main(["label", "--model", ".", "--data", str(data), "--image-root", str(images), "--out", "x"])
    assert status == INTERRUPTED_EXIT
    assert capsys.readouterr().err == f"sdrpn label: interrupted; {stopped.value}\n"

    labeller.label = label  # the rerun labels the rest only
    summary = _run(labeller, data, images, tmp_path)
    assert summary.already_done == 5 and summary.total_samples == 10


def test_shards_are_written_on_time_as_well_as_by_size(dataset, tmp_path):
    data, images = dataset
    model, processor = sharpened_tiny_llava()
    # Every batch of 3 waits longer than no time at all: each becomes a shard of its own (fewer samples
    # where a record was skipped), never a full one of 100.
    labeller = Labeller(model, processor, label_options(shard_size=100, flush_seconds=0.0))
    _run(labeller, data, images, tmp_path)
    assert [len(read_shard(path)[1]) for path in shard_paths(tmp_path)] == [2, 3, 3, 2]


def test_label_job_refuses_to_mix_settings(dataset, tmp_path):
    data, images = dataset
    model, processor = sharpened_tiny_llava()
    _run(Labeller(model, processor, label_options()), data, images, tmp_path)
    with pytest.raises(UserError, match="changed: options"):
        _run(Labeller(model, processor, label_options(tau_fg=0.3)), data, images, tmp_path)


def test_labeller_rejects_heads_the_model_does_not_have():
    model, processor = sharpened_tiny_llava()
    with pytest.raises(UserError, match="do not exist"):
        Labeller(model, processor, label_options(heads=HeadSelection.parse("14:13,24,26")))


# ------------------------------------------------------------------------------------------------
# The real command, killed with SIGKILL and resumed
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_labelling_model(tmp_path_factory.mktemp("model"))


def test_sdrpn_label_resumes_after_sigkill(checkpoint, tmp_path):
    images = tmp_path / "images"
    data = write_plain_jsonl(tmp_path / "q.jsonl", write_images(images, 24))
    common = ["--model", checkpoint, "--device", "cpu", "--data", data, "--image-root", images,
              "--heads", GROUNDING_HEADS, "--sink", "none", "--max-new-tokens", 6, "--batch-size", 1,
              "--shard-size", 1, "--prompt", PROMPT, "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    killed = tmp_path / "killed"
    process = subprocess.Popen(label_cli(*common, "--out", killed), env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if killed.is_dir() and len(shard_paths(killed)) >= 3:
            break
        time.sleep(0.005)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(shard_paths(killed))
    assert 3 <= written < 24 and not (killed / "index.jsonl").exists()

    resumed = subprocess.run(label_cli(*common, "--out", killed), env=environment, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} were already done" in resumed.stdout
    assert not [path for path in killed.iterdir() if ".tmp-" in path.name]

    # The same records labelled in one uninterrupted run (in process, from the same checkpoint).
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    labeller = Labeller(model, AutoProcessor.from_pretrained(checkpoint), label_options(batch_size=1, shard_size=1))
    _run(labeller, data, images, tmp_path / "clean")
    assert len(read_index(killed)) == 24
    assert_same_labels(comparable(killed), comparable(tmp_path / "clean"))


# ------------------------------------------------------------------------------------------------
# Grounding heads
# ------------------------------------------------------------------------------------------------


def test_head_selection_parsing(tmp_path):
    assert HeadSelection.parse("14:13,24,26").pairs == ((14, 13), (14, 24), (14, 26))
    assert HeadSelection.parse("llava-1.5-7b") == HeadSelection.parse("14:26,13,24")
    two = HeadSelection.parse("16:7,1; 19:17")
    assert two.by_layer == {16: (1, 7), 19: (17,)} and str(two) == "16:1,7;19:17"
    two.save(tmp_path / "heads.json", scores=[{"layer": 16, "head": 1, "score": 0.5}])
    assert HeadSelection.parse(str(tmp_path / "heads.json")) == two
    for bad in ["14", "a:b", "", "14:-1"]:
        with pytest.raises(ValueError):
            HeadSelection.parse(bad)
    (tmp_path / "other.json").write_text('{"heads": [[1, 2]]}')
    with pytest.raises(ValueError, match="not a head selection file"):
        HeadSelection.parse(str(tmp_path / "other.json"))


def test_head_scorer_prefers_concentrated_image_attention_that_moves_with_the_question():
    from sdrpn.distill.heads import HeadScorer

    tokens = 16
    rows = torch.zeros(2, 5, 3, tokens)            # 2 samples, 5 heads, 3 queries
    rows[0, 0, :, 5] = 0.9                         # head 0: focused on the image, a different token per sample
    rows[1, 0, :, 9] = 0.9
    rows[:, 1] = 0.9 / tokens                      # head 1: spread evenly over the image
    rows[:, 2, :, 0] = 0.9                         # head 2: everything on the sink token 0
    rows[:, 2, :, 1:] = 0.001
    rows[0, 3, :, 7] = 0.05                        # head 3: focused and moving, but mostly reading text
    rows[1, 3, :, 2] = 0.05
    rows[:, 4, :, 11] = 0.9                        # head 4: focused on the same token every time, a sink the
    sink = torch.zeros(2, tokens, dtype=torch.bool)  # detector missed
    sink[:, 0] = True
    scorer = HeadScorer([3], num_heads=5)
    scorer.update(3, rows[:1], torch.ones(1, 3, dtype=torch.bool), sink[:1])  # two batches add up
    scorer.update(3, rows[1:], torch.ones(1, 3, dtype=torch.bool), sink[1:])
    table = scorer.table()
    assert [entry["head"] for entry in table[:2]] == [0, 3]
    assert all(entry["score"] < 1e-4 for entry in table[2:])  # diffuse, or always in the same place
    by_head = {entry["head"]: entry for entry in table}
    # Two samples on disjoint single tokens: the divergence is log 2, normalised by log 16.
    assert by_head[0]["specificity"] == pytest.approx(math.log(2) / math.log(tokens))
    assert by_head[0]["score"] == pytest.approx(0.9 * math.log(2) / math.log(tokens))
    assert by_head[4]["concentration"] == pytest.approx(1.0) and by_head[4]["specificity"] == pytest.approx(0.0, abs=1e-6)
    assert by_head[1]["concentration"] == pytest.approx(0.0, abs=1e-5)
    assert by_head[0]["image_share"] == pytest.approx(0.9)
    assert scorer.select(1).pairs == ((3, 0),) and scorer.samples == 2
    # Head 3 scores 0.05 / 0.9 of head 0: kept by a ratio below that, left out above it.
    assert scorer.select(2, min_score_ratio=0.05).pairs == ((3, 0), (3, 3))
    assert scorer.select(3, min_score_ratio=0.5).pairs == ((3, 0),)
    with pytest.raises(ValueError, match="same number of image tokens"):
        scorer.update(3, rows[:, :, :, :8], torch.ones(2, 3, dtype=torch.bool), sink[:, :8])


def test_one_calibration_sample_selects_nothing():
    from sdrpn.distill.heads import HeadScorer

    rows = torch.zeros(1, 2, 3, 16)
    rows[0, 0, :, 5] = 0.9  # sharp, but with one sample no head can show it moves with the question
    scorer = HeadScorer([3], num_heads=2)
    scorer.update(3, rows, torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"every head scores 0 over the 1 usable calibration sample\(s\)"):
        scorer.select(3)


def test_a_sink_detector_that_takes_every_token_is_named_as_the_reason():
    from sdrpn.distill.heads import HeadScorer

    rows = torch.rand(2, 2, 3, 16, generator=torch.Generator().manual_seed(0))
    scorer = HeadScorer([3], num_heads=2)
    scorer.update(3, rows, torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="the sink detector marked every image token of every sample as a sink"):
        scorer.select(3)


def test_sdrpn_heads_finds_the_sharp_head_and_label_reads_the_file(dataset, checkpoint, tmp_path, capsys):
    from sdrpn.cli import main

    data, images = dataset
    out = tmp_path / "heads.json"
    status = main(["heads", "--model", str(checkpoint), "--device", "cpu", "--data", str(data), "--image-root", str(images),
                   "--layers", "1-3", "--top", "1", "--sink", "none", "--max-new-tokens", "4",
                   "--prompt", PROMPT, "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert HeadSelection.parse(str(out)).pairs == ((1, 2),)  # the head made sharp
    assert json.loads(out.read_text())["prompt"]["name"] == PROMPT  # the template the heads were scored with
    assert "rank  layer  head" in captured.out and "selected 1:2" in captured.out
    assert "image not found" in captured.err  # the bad records are reported, not fatal
    assert "skipped 4 records: " in captured.out
    assert "warning: only 10 usable calibration samples were scored; below 32" in captured.err
    status = main(["label", "--model", str(checkpoint), "--device", "cpu", "--data", str(data), "--image-root", str(images),
                   "--heads", str(out), "--sink", "none", "--max-new-tokens", "4", "--max-samples", "2",
                   "--prompt", PROMPT, "--out", str(tmp_path / "labels"), "--no-progress"])
    assert status == 0 and len(read_index(tmp_path / "labels")) == 2


def test_labels_stuck_on_one_cell_are_flagged(tmp_path):
    from sdrpn.distill.label_job import STUCK_MIN_VALID, stuck_foreground_warning
    from sdrpn.distill.shards import completed_records, shard_name, write_shard

    def shard(name: str, first_record: int, foreground) -> None:
        count = len(foreground)
        labels = torch.zeros(count, 4, 6, dtype=torch.int64)
        for index, (row, col) in enumerate(foreground):
            labels[index, row, col] = 1
        rows = [{"record": first_record + i, "question_id": str(first_record + i), "valid": True} for i in range(count)]
        rows[-1]["valid"] = False  # an invalid label never counts
        labels[-1] = 1 if name == "stuck" else 0
        write_shard(tmp_path / name / shard_name(0, first_record),
                    {"grounding": torch.rand(count, 24), "sink": torch.zeros(count, 24, dtype=torch.bool),
                     "labels": labels}, rows)

    (tmp_path / "stuck").mkdir()
    (tmp_path / "moving").mkdir()
    half = STUCK_MIN_VALID // 2 + 1
    for first in (0, half):  # two shards each
        shard("stuck", first, [(1, 2)] * half)
        shard("moving", first, [(index % 4, index % 6) for index in range(half)])
    stuck = stuck_foreground_warning(tmp_path / "stuck", list(completed_records(tmp_path / "stuck").values()))
    assert stuck is not None and "(row 1, column 2)" in stuck and f"100% of the {2 * half - 2} valid" in stuck
    assert stuck_foreground_warning(tmp_path / "moving", list(completed_records(tmp_path / "moving").values())) is None
    few = [row for row in completed_records(tmp_path / "stuck").values() if row["record"] < 3]
    assert stuck_foreground_warning(tmp_path / "stuck", few) is None  # too few labels to tell
