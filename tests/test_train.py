"""RPN training on self-distilled labels: the recipe's pieces, learning, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch

from sdrpn import RPN
from sdrpn.distill.labels import IGNORE_INDEX, assign_labels
from sdrpn.distill.train import (
    CALIBRATION_THRESHOLDS,
    CHECKPOINT_NAME,
    LabelSet,
    TrainOptions,
    TrainSample,
    bce_sum,
    calibrated_threshold,
    epoch_order,
    keep_sink_labels,
    lr_factor,
    read_label_set,
    roi_iou_sums,
    roi_statistics,
    split_held_out,
    train_rpn,
    training_samples,
    training_target,
)
from sdrpn.errors import UserError
from sdrpn.roi import RoIOptions, propose
from test_label_job import Labeller, label_options, read_records, run_label_job, sharpened_tiny_llava, \
    write_images, write_plain_jsonl

# A 6-layer tiny model labelled from layer 1: the RPN replaces layers 1 (block) and 2 (q/k head).
OPTIONS = dict(start_layer=1, num_blocks=2, lr=2e-3, batch_size=8, eval_samples=8, log_every=1000,
               save_every=1000)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 100, 0.03) for step in range(100)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[51] == pytest.approx(0.5, abs=0.02) and factors[-1] < 1e-3


def test_bce_and_iou_skip_ignored_cells():
    logits = torch.tensor([[5.0, -5.0, 5.0, 100.0], [-5.0, 5.0, -5.0, -100.0]])
    labels = torch.tensor([[1, 0, 0, IGNORE_INDEX], [0, 1, 1, IGNORE_INDEX]])
    loss, cells = bce_sum(logits, labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, -5.0]), torch.tensor([1.0, 0, 0, 0, 1, 1]), reduction="sum")
    assert cells == 6 and float(loss) == pytest.approx(float(expected))
    stats = roi_statistics(logits, labels, 0.5)
    # predicted fg: (0,0), (0,2), (1,1); labelled fg: (0,0), (1,1), (1,2); the ignored 100.0 does not count.
    assert stats["intersection"] == 2 and stats["union"] == 4


def test_roi_ious_score_the_cells_the_engines_second_view_shows():

    grid = (4, 4)
    logits = torch.randn(3, 16) * 3
    labels = torch.randint(0, 2, (3, 16))
    labels[:, ::5] = IGNORE_INDEX
    thresholds = (0.1, 0.5, 0.9)
    sums = roi_iou_sums(logits, labels, grid, thresholds)
    keep = labels != IGNORE_INDEX
    for row, threshold in enumerate(thresholds):
        shown = propose(logits.view(3, *grid), grid, RoIOptions(threshold=threshold)).cells.flatten(1) & keep
        ious = [float((m & (l == 1)).sum()) / max(float((m | (l == 1)).sum()), 1.0) for m, l in zip(shown, labels)]
        assert float(sums[row]) == pytest.approx(sum(ious))


def test_calibration_picks_the_best_overlap_and_the_largest_on_a_tie():
    # A sure 2x2 foreground block in a 6x6 grid. Blurred, the block stays at 0.527, its edge
    # neighbours fall to 0.199 and its corner neighbours to 0.075: every threshold from 0.2 to 0.5
    # gives the block exactly; lower ones add neighbours, one component whose box (4x4) the
    # engine's box upscaling shows.
    labels = torch.zeros(1, 36, dtype=torch.long)
    block = [14, 15, 20, 21]
    labels[0, block] = 1
    logits = torch.full((1, 36), -12.0)
    logits[0, block] = 12.0
    means = roi_iou_sums(logits, labels, (6, 6)).tolist()  # one sample: the sums are the means
    ious = dict(zip(CALIBRATION_THRESHOLDS, means))
    assert [ious[t] for t in (0.2, 0.3, 0.4, 0.5)] == [1.0] * 4
    assert ious[0.15] == pytest.approx(4 / 16) and ious[0.05] == pytest.approx(4 / 16)
    assert calibrated_threshold(means) == 0.5  # the largest of the tied best
    assert calibrated_threshold([0.5, 0.75, 0.0], (0.1, 0.2, 0.3)) == 0.2
    # Qwen's engine always shows the mask itself (masked upscaling): the 12 cells, not their box.
    masked = roi_iou_sums(logits, labels, (6, 6), roi_options=RoIOptions(strategy="masked")).tolist()
    assert dict(zip(CALIBRATION_THRESHOLDS, masked))[0.15] == pytest.approx(4 / 12)


def test_calibration_scores_a_lone_cell_as_no_roi():
    # One sure cell, labelled foreground. Blurred it reads 0.204, its edge neighbours 0.124 and its
    # corner ones 0.075. At 0.2 the mask is that cell alone, a component of area 1 that the engine
    # drops as noise: no RoI, IoU 0 (a plain mask IoU would say 1). At 0.1 the cell and its four
    # edge neighbours make one component; the engine shows its 3x3 box: IoU 1/9.
    labels = torch.zeros(1, 36, dtype=torch.long)
    labels[0, 14] = 1
    logits = torch.full((1, 36), -12.0)
    logits[0, 14] = 12.0
    ious = dict(zip(CALIBRATION_THRESHOLDS, roi_iou_sums(logits, labels, (6, 6)).tolist()))
    assert ious[0.2] == 0.0 and ious[0.1] == pytest.approx(1 / 9)
    assert calibrated_threshold(list(ious.values())) == 0.1


def test_a_threshold_on_an_end_of_the_search_range_is_warned_about():
    from sdrpn.distill.train import _range_edge_warning

    low, middle, high = CALIBRATION_THRESHOLDS[0], CALIBRATION_THRESHOLDS[5], CALIBRATION_THRESHOLDS[-1]
    assert _range_edge_warning(middle, 0.3) is None
    assert f"{low:g} is the lowest of the search range {low:g} .. {high:g}" in _range_edge_warning(low, 0.3)
    assert f"{high:g} is the highest of the search range" in _range_edge_warning(high, 0.3)
    assert "IoU 0 at every one" in _range_edge_warning(high, 0.0)


# The label rules of a hand-built 4x4 label run (assign_labels' defaults).
RULES = dict(tau_fg=0.2, tau_bg=0.1, max_box_frac=0.5, min_peak=0.0, blur_box=False)


def hand_built_sample(grounding: dict[int, float], sinks: Sequence[int]) -> TrainSample:
    """A 4x4 sample labelled as `sdrpn label` does: 0.01 grounding except on the flat cells of
    ``grounding``, sink tokens at ``sinks``."""
    values = torch.full((16,), 0.01)
    values[list(grounding)] = torch.tensor(list(grounding.values()))
    sink = torch.zeros(16, dtype=torch.bool)
    sink[list(sinks)] = True
    stored = values.half()
    labels = assign_labels(stored.float(), sink, (4, 4), **RULES).to(torch.int8)
    return TrainSample(0, "q", "image.png", labels, stored, sink)


def hand_built_set(*samples: TrainSample) -> LabelSet:
    return LabelSet(list(samples), {"options": {"heads": [[1, 2]], **RULES}}, Path("."))


def test_attention_target_is_the_grounding_over_its_peak_without_sinks():
    sample = hand_built_sample({0: 0.8, 5: 0.4, 6: 0.2}, sinks=[0])  # the sink has the max
    grounding = sample.grounding.float()
    expected = grounding.clone()
    expected[0] = 0.0
    expected /= grounding[5]
    torch.testing.assert_close(training_target(sample, "attention"), expected)
    assert training_target(sample, "labels").tolist() == sample.labels.flatten().float().tolist()

    # With the sinks kept the target keeps the sink's value: it is the peak.
    (kept,) = training_samples(hand_built_set(sample), keep_sinks=True)
    torch.testing.assert_close(training_target(kept, "attention"), grounding / grounding[0])


def test_keep_sinks_recomputes_the_labels_without_sink_removal(labelled):
    peak_on_sink = hand_built_sample({0: 0.8, 5: 0.4, 6: 0.2}, sinks=[0])
    # Two sinks in opposite corners: with them kept the foreground box covers the grid.
    spread_by_sinks = hand_built_sample({0: 0.9, 15: 0.9, 5: 0.4}, sinks=[0, 15])
    label_set = hand_built_set(peak_on_sink, spread_by_sinks)
    (kept,) = training_samples(label_set, keep_sinks=True)  # the second became invalid and is dropped
    no_sink = torch.zeros(16, dtype=torch.bool)
    assert torch.equal(kept.labels.long(), assign_labels(peak_on_sink.grounding.float(), no_sink, (4, 4), **RULES))
    assert not torch.equal(kept.labels, peak_on_sink.labels) and not kept.sink.any()
    assert len(training_samples(label_set, keep_sinks=False)) == 2

    # On a real label run: the rules are read from its run.json.
    label_set = read_label_set(labelled)
    relabelled = keep_sink_labels(label_set.samples, label_set.settings)
    grounding = torch.stack([sample.grounding for sample in label_set.samples]).float()
    rules = {key: label_set.settings["options"][key] for key in RULES}
    expected = assign_labels(grounding, torch.zeros_like(grounding, dtype=torch.bool), (12, 12), **rules)
    assert torch.equal(torch.stack([sample.labels for sample in relabelled]).long(), expected)
    with pytest.raises(UserError, match="lacks tau_fg"):
        keep_sink_labels(label_set.samples, {"options": {}})


def test_split_and_order_are_deterministic():
    train, held = split_held_out(list(range(20)), 4, seed=3)
    assert len(held) == 4 and sorted(train + held) == list(range(20))
    assert (train, held) == split_held_out(list(range(20)), 4, seed=3)
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """48 tiny-model samples labelled in process; about 40 have valid labels."""
    root = tmp_path_factory.mktemp("labelled")
    data = write_plain_jsonl(root / "q.jsonl", write_images(root / "images", 48, seed=1))
    model, processor = sharpened_tiny_llava()
    records, _ = read_records(data)
    labeller = Labeller(model, processor, label_options(batch_size=8, shard_size=16))
    run_label_job(labeller, records, root / "images", root / "labels",
                  {"model": "tiny", "image_root": str(root / "images")}, progress=False)
    return root / "labels"


def test_training_lowers_the_loss_and_beats_the_untrained_rpn(labelled, tmp_path):
    label_set = read_label_set(labelled)
    assert len(label_set.samples) >= 32
    model, processor = sharpened_tiny_llava()
    result = train_rpn(model, processor, label_set, tmp_path / "rpn", TrainOptions(**OPTIONS, epochs=12),
                       cache_dir=tmp_path / "cache", progress=False)
    losses = [entry["loss"] for entry in result.history]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses
    before, after = result.evaluations[0], result.evaluations[-1]
    assert after["held_out_iou"] > before["held_out_iou"] + 0.1, (before, after)
    assert after["held_out_bce"] < before["held_out_bce"]
    assert any((tmp_path / "cache").glob("*.safetensors"))

    # The saved RPN is the trained one and loads onto the model.
    loaded = RPN.from_pretrained(tmp_path / "rpn", model)
    for name, tensor in result.rpn.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].float(), tensor.float())
    assert loaded.config["labels"]["heads"] == [[1, 2]]
    assert loaded.config["labels"]["target"] == "labels" and loaded.config["labels"]["keep_sinks"] is False
    # Its default RoI threshold is the authors' 0.15; the calibrated one, beside it, is the best mean
    # held-out IoU of the final evaluation.
    ious = after["roi_iou_by_threshold"]
    assert loaded.threshold == 0.15 and loaded.config["threshold"] == 0.15
    assert loaded.calibrated_threshold == calibrated_threshold(ious) and loaded.calibrated_threshold in CALIBRATION_THRESHOLDS
    assert len(ious) == len(CALIBRATION_THRESHOLDS) and all(0.0 <= iou <= 1.0 for iou in ious)
    assert after["held_out_samples"] == 8  # what the summed IoUs were divided by


def test_attention_target_trains_is_recorded_and_does_not_resume_as_labels(labelled, tmp_path):
    label_set = read_label_set(labelled)
    options = dict(**OPTIONS, epochs=6, keep_sinks=True)
    result = train_rpn(*sharpened_tiny_llava(), label_set, tmp_path / "rpn",
                       TrainOptions(**options, target="attention", threshold=0.25), progress=False)
    losses = [entry["loss"] for entry in result.history]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # The held-out metrics are still those of the 3-valued labels, on the same samples.
    before, after = result.evaluations[0], result.evaluations[-1]
    assert after["held_out_samples"] == 8 and after["held_out_bce"] < before["held_out_bce"]

    loaded = RPN.from_pretrained(tmp_path / "rpn", sharpened_tiny_llava()[0])
    config = loaded.config
    assert config["labels"]["target"] == "attention" and config["labels"]["keep_sinks"] is True
    assert loaded.threshold == 0.25  # asked for; the calibrated one is still recorded beside it
    assert loaded.calibrated_threshold in CALIBRATION_THRESHOLDS
    with pytest.raises(UserError, match="other settings"):
        train_rpn(*sharpened_tiny_llava(), label_set, tmp_path / "rpn", TrainOptions(**options, target="labels"),
                  progress=False)


def test_resume_continues_exactly(labelled, tmp_path):
    label_set = read_label_set(labelled)
    options = TrainOptions(**{**OPTIONS, "save_every": 2}, max_steps=7)

    straight = train_rpn(*sharpened_tiny_llava(), label_set, tmp_path / "straight", options, progress=False)

    class Preempted(Exception):
        pass

    def stop_after_five(entry):
        if entry.get("kind") == "train" and entry["step"] == 5:
            raise Preempted

    with pytest.raises(Preempted):
        train_rpn(*sharpened_tiny_llava(), label_set, tmp_path / "resumed", options, progress=False,
                  callback=stop_after_five)
    assert (tmp_path / "resumed" / CHECKPOINT_NAME).exists()  # written at step 4
    resumed = train_rpn(*sharpened_tiny_llava(), label_set, tmp_path / "resumed", options, progress=False)
    assert [entry["step"] for entry in resumed.history] == [5, 6, 7]
    for got, want in zip(resumed.history, straight.history[4:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["lr"] == pytest.approx(want["lr"])
    for name, tensor in straight.rpn.state_dict().items():
        torch.testing.assert_close(resumed.rpn.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    logged = [line for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(logged) == 7  # the steps logged after the checkpoint and before the stop are not repeated

    with pytest.raises(UserError, match="other settings"):
        train_rpn(*sharpened_tiny_llava(), label_set, tmp_path / "resumed",
                  TrainOptions(**{**OPTIONS, "lr": 1e-3}, max_steps=7), progress=False)


def test_options_are_checked(labelled, tmp_path):
    label_set = read_label_set(labelled)
    with pytest.raises(UserError, match="must lie in the model's 6 layers"):
        train_rpn(*sharpened_tiny_llava(), label_set, tmp_path, TrainOptions(start_layer=5, num_blocks=2),
                  progress=False)
    with pytest.raises(UserError, match="expected one of labels, attention"):
        train_rpn(*sharpened_tiny_llava(), label_set, tmp_path, TrainOptions(**OPTIONS, target="raw"),
                  progress=False)
    with pytest.raises(UserError, match="--threshold 1.5: expected a probability"):
        train_rpn(*sharpened_tiny_llava(), label_set, tmp_path, TrainOptions(**OPTIONS, threshold=1.5),
                  progress=False)
    with pytest.raises(UserError, match="do not fill one batch"):
        train_rpn(*sharpened_tiny_llava(), label_set, tmp_path, TrainOptions(**{**OPTIONS, "batch_size": 512}),
                  progress=False)


def test_feature_cache_returns_what_the_backbone_computes(labelled, tmp_path):
    from sdrpn.distill.train import Backbone
    from sdrpn.models import adapter_for

    label_set = read_label_set(labelled)
    model, processor = sharpened_tiny_llava()
    adapter = adapter_for(model, processor)
    samples = label_set.samples[:3]
    fresh_backbone = Backbone(model, processor, adapter, 2, label_set.image_root)
    fresh = fresh_backbone(samples, torch.device("cpu"))
    cached = Backbone(model, processor, adapter, 2, label_set.image_root, tmp_path)
    first = cached(samples[:2], torch.device("cpu"))      # computes and stores two samples
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    again = cached(samples, torch.device("cpu"))          # two from the cache, one computed
    torch.testing.assert_close(again.hidden, fresh.hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(again.attention_mask, fresh.attention_mask)
    assert torch.equal(again.image_start, fresh.image_start) and torch.equal(again.labels, fresh.labels)
    assert first.hidden.shape[0] == 2 and len(list(tmp_path.glob("*.safetensors"))) == 3

    # They are the states entering layer K of the model itself, over the prompt up to the query.
    from PIL import Image

    image = Image.open(label_set.image_root / samples[0].image).convert("RGB")
    prompt = fresh_backbone.template.render(samples[0].question, processor)
    encoded = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(fresh.hidden[0][fresh.attention_mask[0]], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="another model, K, dtype, prompt template or geometry"):
        Backbone(model, processor, adapter, 3, label_set.image_root, tmp_path)
    with pytest.raises(UserError, match="another model, K, dtype, prompt template or geometry"):
        Backbone(model, processor, adapter, 2, label_set.image_root, tmp_path, prompt="plain")


def test_max_samples_keeps_the_first_usable_samples(labelled, tmp_path):
    from sdrpn.distill.train import Trainer, training_samples

    label_set = read_label_set(labelled)
    usable = training_samples(label_set, keep_sinks=False)
    count = OPTIONS["batch_size"] + 2
    assert len(usable) > count  # the fixture must leave samples out for this to test anything
    trainer = Trainer(*sharpened_tiny_llava(), label_set, tmp_path, TrainOptions(**OPTIONS, max_samples=count))
    chosen = sorted(sample.record for sample in [*trainer.train_samples, *trainer.held_out])
    assert chosen == sorted(sample.record for sample in usable[:count])
