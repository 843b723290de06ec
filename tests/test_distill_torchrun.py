"""`torchrun` scale-out: 2 CPU processes (gloo) label and train like one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdrpn.cli import main
from sdrpn.distill.shards import read_index, shard_paths
from sdrpn.distributed import Context, shard
from test_label_job import (
    GROUNDING_HEADS,
    PROMPT,
    assert_same_labels,
    comparable,
    save_labelling_model,
    write_images,
    write_plain_jsonl,
)

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def torchrun(processes: int, *arguments) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), "-m", "sdrpn", *map(str, arguments)]


def test_shard_gives_every_process_every_world_size_th_item():
    items = list(range(11))
    assert [shard(items, Context(rank, 3)) for rank in range(3)] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert shard(items, Context()) == items


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_labelling_model(tmp_path_factory.mktemp("model"))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_label_with_two_processes_equals_one(checkpoint, tmp_path):
    images = tmp_path / "images"
    data = write_plain_jsonl(tmp_path / "q.jsonl", write_images(images, 7))
    common = ["label", "--model", checkpoint, "--device", "cpu", "--data", data, "--image-root", images, "--heads", GROUNDING_HEADS,
              "--sink", "none", "--max-new-tokens", 6, "--batch-size", 2, "--shard-size", 2, "--prompt", PROMPT,
              "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(torchrun(2, *common, "--out", tmp_path / "two"), env=environment,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert main([*map(str, common), "--out", str(tmp_path / "one")]) == 0  # one process, in this one

    names = [path.name for path in shard_paths(tmp_path / "two")]
    assert {name.split("-")[1] for name in names} == {"r000", "r001"}  # both ranks wrote shards
    assert len(read_index(tmp_path / "two")) == 7
    assert_same_labels(comparable(tmp_path / "two"), comparable(tmp_path / "one"))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_train_with_two_processes_follows_the_single_process_loss_curve(checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sdrpn.distill.label_job import Labeller, run_label_job
    from sdrpn.distill.records import read_records
    from test_label_job import label_options

    images = tmp_path / "images"
    records, _ = read_records(write_plain_jsonl(tmp_path / "q.jsonl", write_images(images, 24, seed=2)))
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    labeller = Labeller(model, AutoProcessor.from_pretrained(checkpoint), label_options(batch_size=8, shard_size=8))
    run_label_job(labeller, records, images, tmp_path / "labels",
                  {"model_config": labeller.adapter.config_fingerprint(), "image_root": str(images)}, progress=False)

    common = ["train", "--model", checkpoint, "--device", "cpu", "--labels", tmp_path / "labels", "--K", 1, "--T", 2, "--lr", 2e-3,
              "--batch-size", 4, "--max-steps", 4, "--eval-samples", 4, "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(torchrun(2, *common, "--out", tmp_path / "two"), env=environment,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert main([*map(str, common), "--out", str(tmp_path / "one")]) == 0

    def curve(directory):
        lines = (directory / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    two_curve, one_curve = curve(tmp_path / "two"), curve(tmp_path / "one")
    assert [e["kind"] for e in two_curve] == [e["kind"] for e in one_curve] == ["eval"] + ["train"] * 4 + ["eval"]
    for multi, single in zip(two_curve, one_curve):
        for key in ("loss", "held_out_bce", "held_out_iou"):
            if key in single:
                assert multi[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), (key, multi, single)
    assert one_curve[-2]["loss"] < one_curve[1]["loss"]
