"""The testbed loop's measurements: box IoU of labels and RoIs, the targets, the report, the model card."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from sdrpn.distill.labels import IGNORE_INDEX
from sdrpn.distill.shards import write_index, write_shard
from sdrpn.models.geometry import ImageGeometry
from sdrpn.testbed import localisation
from sdrpn.testbed.loop import format_report, targets, trained_steps
from sdrpn.testbed.model_card import model_card
from sdrpn.testbed.tiny_model import build_processor


def test_box_iou_on_hand_checked_boxes():
    assert localisation.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert localisation.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert localisation.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching: no overlap
    assert localisation.box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert localisation.box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0  # empty boxes


def test_a_roi_is_its_enclosing_box_and_no_roi_scores_zero():
    truths = {"a": (0, 0, 10, 10), "b": (0, 0, 10, 10)}
    records = [{"question_id": "a", "boxes": [[0, 0, 5, 10], [5, 0, 10, 10]]},
               {"question_id": "b", "boxes": []},
               {"question_id": "c", "boxes": [[0, 0, 1, 1]]}]  # no ground truth: left out
    assert localisation.prediction_ious(records, truths) == {"a": 1.0, "b": 0.0}
    assert localisation.enclosing_box([]) is None
    assert localisation.mean([]) is None and localisation.mean([0.5, 1.0]) == 0.75


def test_label_iou_maps_the_foreground_box_through_the_processor_geometry(tmp_path):
    # A 200 x 100 landscape image; the processor resizes the short side to 96 and centre-crops
    # 96 x 96, so the 12 x 12 grid covers source pixels x in [50, 150), y in [0, 100).
    Image.new("RGB", (200, 100)).save(tmp_path / "wide.png")
    labels = torch.full((2, 12, 12), IGNORE_INDEX, dtype=torch.int8)
    labels[0, 0:6, 0:6] = 1   # the top-left quarter of the view: x [50, 100), y [0, 50)
    labels[1] = 0             # no foreground
    tensors = {"labels": labels, "grounding": torch.zeros(2, 12, 12, dtype=torch.float16),
               "sink": torch.zeros(2, 12, 12, dtype=torch.bool)}
    write_shard(tmp_path / "shard.safetensors", tensors, [{}, {}])
    write_index(tmp_path, [
        {"record": 0, "question_id": "q0", "image": "wide.png", "valid": True, "shard": "shard.safetensors", "row": 0},
        {"record": 1, "question_id": "q1", "image": "wide.png", "valid": True, "shard": "shard.safetensors", "row": 1},
        {"record": 2, "question_id": "q2", "image": "wide.png", "valid": False, "shard": "shard.safetensors", "row": 1},
    ])
    geometry = ImageGeometry.from_processor(build_processor(), (96, 96))
    truths = {"q0": (50, 0, 100, 50), "q1": (0, 0, 10, 10), "q2": (0, 0, 10, 10)}
    ious = localisation.label_ious(tmp_path, geometry, truths, tmp_path)
    assert ious == {"q0": pytest.approx(1.0), "q1": 0.0}  # invalid samples are not scored


def _summary(sdrpn=0.6, baseline=0.2, scaling=0.65, sdrpn_tokens=180.0, rpn_iou=0.5, raw_iou=0.4, zoom_bound=0.1):
    def row(accuracy, tokens, iou=None):
        return {"accuracy": accuracy, "visual_tokens": tokens, "samples_per_s": 10.0, "with_roi": 1.0,
                "roi_iou": iou, "random_zoom_bound": None if iou is None else zoom_bound}

    return {"methods": {"baseline": row(baseline, 144), "sdrpn": row(sdrpn, sdrpn_tokens, rpn_iou),
                        "sdrpn-attention": row(0.4, 200, raw_iou), "res-scaling": row(scaling, 576),
                        "vicrop": row(0.3, 288)},
            "localisation": {"pseudo_labels_train": 0.45, "rpn_test": rpn_iou, "raw_attention_test": raw_iou},
            "data_efficiency": {"10%": {"samples": 10, **row(0.5, 170, 0.4)},
                                "100%": {"samples": 100, **row(sdrpn, sdrpn_tokens, rpn_iou)}},
            "ablation": [{"row": "+ masked upscaling", "strategy": "mask", **row(sdrpn, sdrpn_tokens, rpn_iou)}]}


def test_targets_follow_the_measured_numbers():
    met = targets(_summary())
    assert met["sdrpn_minus_baseline_points"] == 40.0 and met["sdrpn_at_least_25_points_above_baseline"]
    assert met["sdrpn_within_10_points_of_res_scaling"] and met["sdrpn_at_most_half_of_res_scaling_tokens"]
    assert met["rpn_iou_at_least_raw_attention_iou"] and met["sdrpn_gain_above_random_zoom_bound"]
    assert met["random_zoom_bound_points"] == 10.0 and met["sdrpn_minus_raw_attention_points"] == 20.0
    missed = targets(_summary(sdrpn=0.3, scaling=0.5, sdrpn_tokens=300.0, rpn_iou=0.3, zoom_bound=0.1))
    assert not any(missed[key] for key in ("sdrpn_at_least_25_points_above_baseline",
                                           "sdrpn_within_10_points_of_res_scaling",
                                           "sdrpn_at_most_half_of_res_scaling_tokens",
                                           "rpn_iou_at_least_raw_attention_iou", "sdrpn_gain_above_random_zoom_bound"))
    # 288 of res-scaling's 576 tokens is half; a gain equal to the bound does not beat it
    assert targets(_summary(sdrpn_tokens=288.0))["sdrpn_at_most_half_of_res_scaling_tokens"]
    assert not targets(_summary(zoom_bound=0.4))["sdrpn_gain_above_random_zoom_bound"]


def test_random_zoom_bound_on_hand_checked_boxes():
    # A 100-wide box in a 400 x 200 image covers a point for at most 100 of its 300 x positions; a
    # box at least half the height covers it at every y position it can take in the worst case.
    sizes = {"a": (400, 200), "b": (400, 200), "c": (400, 200)}
    records = [{"question_id": "a", "boxes": [[0, 0, 100, 50]]},          # 100/300 * 50/150
               {"question_id": "b", "boxes": [[0, 0, 50, 10], [50, 0, 100, 150]]},  # encloses 100 x 150
               {"question_id": "c", "boxes": []},                        # no zoom
               {"question_id": "x", "boxes": [[0, 0, 10, 10]]}]          # no size: left out
    expected = [(100 / 300) * (50 / 150), (100 / 300) * 1.0, 0.0]
    assert localisation.random_zoom_bound(records, sizes) == pytest.approx(sum(expected) / 3)
    assert localisation.random_zoom_bound([], sizes) is None


def test_report_has_a_row_per_method_and_experiment():
    report = format_report(_summary())
    assert "| sdrpn | 60.0 | 180 | 10.0 | 0.500 | 10.0 |" in report
    assert "| baseline | 20.0 | 144 | 10.0 | - | - |" in report
    assert "| RPN (test questions) | 0.500 |" in report
    assert "| 10% of the labels | 10 | 50.0 |" in report
    assert "| + masked upscaling | mask | 60.0 | 0.500 |" in report


def test_trained_steps_reads_the_last_step_of_the_log(tmp_path):
    lines = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 1}, {"kind": "train", "step": 2},
             {"kind": "eval", "step": 2}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert trained_steps(tmp_path) == 2


def test_model_card_states_the_recipe_time_and_accuracies():
    from dataclasses import asdict

    from sdrpn.testbed.tiny_model import TinyLlavaSpec
    from sdrpn.testbed.train_model import TrainModelOptions

    recipe = json.loads(json.dumps(TrainModelOptions(steps=50).recipe()))
    summary = {"recipe": recipe, "spec": asdict(TinyLlavaSpec()), "val_samples": 256, "train_seconds": 600,
               "data": {"seed": 0, "splits": {"train": 100, "val": 10, "test": 10}},
               "environment": {"threads": 1, "machine": "x86_64", "torch": "2.13", "transformers": "5.17"},
               "history": [{"step": 50, "train_loss": 1.25, "val": {"fine, one view": 0.125,
                                                                   "fine, ground-truth RoI": 0.75}}]}
    card = model_card(summary)
    assert "--seed 0 --steps 50`" in card and "differs" not in card  # only --steps left the defaults
    assert "10 min on 1 CPU thread(s)" in card
    assert "| 50 | 1.250 | 12.5% | 75.0% |" in card


def test_loop_runs_every_experiment_and_resumes(tmp_path):
    """The loop's plumbing on a small random model whose one sharp head gives valid labels (the
    numbers mean nothing; tests/test_testbed_run.py checks them on the trained model)."""
    from test_label_job import save_labelling_model

    from sdrpn.data.synthetic import generate_dataset
    from sdrpn.testbed.loop import (CALIBRATED, FINE_DETAIL_THRESHOLD, MAIN_METHODS, STRONGEST_REGION, LoopOptions,
                                    run_loop)

    model = save_labelling_model(tmp_path / "model")
    data = tmp_path / "data"
    generate_dataset(data, 40, 0, 6, seed=3, progress=False)
    options = LoopOptions(label_samples=40, test_samples=6, heads="1:2", start_layer=2, num_blocks=2,
                          rpn_batch_size=8, rpn_epochs=1, batch_size=8, fractions=(0.3,))
    work = tmp_path / "work"
    summary = run_loop(model, data, work, options, progress=False)

    assert set(summary["methods"]) == {*MAIN_METHODS, STRONGEST_REGION, CALIBRATED}
    # Every RPN keeps the fine-detail threshold as its default; one row uses the calibrated one.
    config = json.loads((work / "rpn" / "config.json").read_text())
    assert config["threshold"] == FINE_DETAIL_THRESHOLD
    calibrated = config["calibrated_threshold"]
    assert summary["methods"][CALIBRATED]["threshold"] == calibrated
    assert f"| {CALIBRATED} ({calibrated:g}) |" in format_report(summary)
    assert summary["methods"][STRONGEST_REGION]["roi_iou"] is not None
    strongest = (work / "eval" / "strongest-region.sdrpn.jsonl").read_text().splitlines()
    assert json.loads(strongest[0])["settings"]["max_regions"] == 1
    assert json.loads(strongest[0])["settings"]["threshold"] == FINE_DETAIL_THRESHOLD
    assert all(len(json.loads(line)["boxes"]) <= 1 for line in strongest[1:])
    assert summary["labels"]["labelled"] == 40 and summary["labels"]["valid"] >= 16
    for row in [*summary["methods"].values(), *summary["data_efficiency"].values(), *summary["ablation"]]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["roi_iou"] is None or 0.0 <= row["roi_iou"] <= 1.0
        assert (row["random_zoom_bound"] is None) == (row["roi_iou"] is None)
        assert row["random_zoom_bound"] is None or 0.0 <= row["random_zoom_bound"] <= 1.0
    assert summary["methods"]["baseline"]["roi_iou"] is None and summary["methods"]["sdrpn"]["roi_iou"] is not None
    assert 0.0 <= summary["localisation"]["pseudo_labels_train"] <= 1.0
    assert [row["row"] for row in summary["ablation"]] == [
        "raw attention as the RoI map", "RPN regressing raw attention", "+ 3-valued label assignment",
        "+ sink removal", "+ masked upscaling"]
    assert summary["ablation"][-1]["accuracy"] == summary["methods"]["sdrpn"]["accuracy"]
    assert set(summary["data_efficiency"]) == {"30%", "100%"}
    assert summary["data_efficiency"]["30%"]["samples"] < summary["data_efficiency"]["100%"]["samples"]
    assert set(summary["targets"]) >= {"sdrpn_at_least_25_points_above_baseline", "rpn_iou_at_least_raw_attention_iou"}
    assert json.loads((work / "testbed.json").read_text()) == summary

    # A rerun reuses every step's output: no RPN is trained again and the numbers are the same.
    weights = sorted(work.glob("rpn*/model.safetensors"))
    assert len(weights) == 4  # main, 30%, attention target, kept sinks
    stamps = [path.stat().st_mtime_ns for path in weights]
    again = run_loop(model, data, work, options, progress=False)
    assert [path.stat().st_mtime_ns for path in weights] == stamps
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in summary.items() if k != "seconds"}


def test_heads_scores_the_layers_the_options_name(tmp_path):
    from sdrpn.testbed.loop import Loop, LoopOptions

    calls = []
    for layers in (None, "1-3"):
        loop = Loop(tmp_path / "model", tmp_path / "data", tmp_path / f"work-{layers}",
                    LoopOptions(heads_layers=layers), progress=False)
        loop.command = lambda name, *arguments: calls.append((name, [str(a) for a in arguments]))
        assert loop.heads() == str(tmp_path / f"work-{layers}" / "heads.json")
    (name, default), (_, chosen) = calls
    assert name == "heads" and "--layers" not in default  # sdrpn heads' own default: the middle third
    assert chosen[chosen.index("--layers") + 1] == "1-3"



def test_run_command_passes_its_flags_to_the_loop(monkeypatch, tmp_path, capsys):
    from sdrpn.cli import main
    from sdrpn.testbed import loop

    seen = {}

    def fake_run_loop(model, data, work, options, progress):
        seen.update(model=model, options=options)
        return _summary()

    monkeypatch.setattr(loop, "run_loop", fake_run_loop)
    status = main(["testbed", "run", "--data", str(tmp_path), "--work", str(tmp_path / "work"), "--model",
                   str(tmp_path), "--heads-layers", "1-3", "--label-samples", "80", "--no-ablation",
                   "--no-data-efficiency"])
    assert status == 0, capsys.readouterr().err
    options = seen["options"]
    assert (options.heads_layers, options.label_samples, options.ablation, options.fractions) == ("1-3", 80, False, ())
    assert "| sdrpn | 60.0 |" in capsys.readouterr().out
