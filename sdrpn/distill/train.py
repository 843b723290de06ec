"""Train an RPN on the pseudo labels of ``sdrpn label`` (DESIGN section 2, "RPN").

Where the time goes, and what we do about it (DESIGN section 3.5):

* Layers ``0 .. K-1`` are frozen: they run once per sample without autograd (:class:`Backbone`),
  and with ``cache_dir`` their output is kept on disk and read back in later epochs and runs. The
  cache holds the whole prompt up to the query token, not only the query and image positions: the
  RPN's full decoder blocks attend over every prompt token, so the text tokens' states are needed
  too (they are a small fraction of a LLaVA prompt: ~60 of ~640 tokens).
* The vocabulary head and layers ``>= K`` of the model never run; only the RPN (T - 1 decoder
  blocks and a q/k head) gets gradients.

The recipe: BCE-with-logits averaged over the non-ignored cells of the (global) batch, AdamW
(0.9, 0.98), weight decay 0, cosine schedule with 3% linear warmup, gradient clipping, bf16
autocast on GPUs. The trainable weights are kept in fp32.

Two ablations of the paper's choices train on other targets made from the same shards:
``target="attention"`` regresses the grounding map itself (a soft target on every cell) instead of
the 3-valued labels, and ``keep_sinks`` recomputes the labels without zeroing the sink tokens. The
held-out metrics always use the 3-valued labels of the chosen sink setting, so runs compare.

The backbone shows every image in the labelling view the labels were made on (the adapter's
:meth:`~sdrpn.models.base.ModelAdapter.labelling_view` through its labelling processor: LLaVA's
processor as it is, Qwen2.5-VL's grey square at the authors' fixed pixel budget), with the family's
rotary positions (M-RoPE for Qwen), which the RPN head then reads too.

The RPN records what it was trained with, for the engine to match: the conversation template of
the labels (``sdrpn label --prompt``; labels that did not record one used the processor's chat
template), the index of the first image token under it, and the processor's base view geometry.
Its RoI threshold is the authors' default (0.15), or the one asked for; the threshold calibrated on
the held-out labels is recorded beside it (``calibrated_threshold``).

Reproducible and resumable: the data order of epoch ``e`` is a permutation seeded by
``(seed, e)``, so a step number alone says which samples come next. A checkpoint (RPN, optimizer
and schedule state, step) is written atomically every ``save_every`` steps; a rerun with the same
settings continues from it and produces the same weights as an uninterrupted run.

Under ``torchrun`` every process takes ``batch[rank::world]`` of each global batch and the RPN is
wrapped in DistributedDataParallel; the loss is normalised by the global count of target cells,
so the loss curve is the single-process one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from .. import distributed
from ..errors import UserError
from ..models.base import ModelAdapter
from ..prompts import PROCESSOR_TEMPLATE, PromptTemplate, template_for, template_named
from ..roi import RoIOptions, propose
from .label_job import label_template
from .labels import IGNORE_INDEX, assign_labels, is_valid
from .records import RecordProblem, open_rgb_image
from .shards import atomic_write, read_index, read_shard

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
CHECKPOINT_FORMAT = "sdrpn-train-checkpoint/1"
TARGETS = ("labels", "attention")
# The RoI thresholds the calibration chooses from, in increasing order.
CALIBRATION_THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
LABEL_RULES = ("tau_fg", "tau_bg", "max_box_frac", "min_peak", "blur_box")
RELABEL_CHUNK = 4096  # samples per assign_labels call: vectorised, yet bounded memory


@dataclass(frozen=True)
class TrainOptions:
    """The training recipe. Defaults: the authors' LLaVA-1.5-7B setting.

    Attributes:
        start_layer: K, the first model layer the RPN replaces.
        num_blocks: T, layers spanned by the RPN (T - 1 decoder blocks + the q/k head).
        lr: peak learning rate.
        batch_size: global batch (all processes and accumulation steps together).
        grad_accum: micro-batches per step on each process.
        epochs: passes over the training samples (ignored when ``max_steps`` is set).
        max_steps: total optimizer steps, overriding ``epochs``.
        max_samples: use only the first N usable samples (in the label index's order), for
            data-efficiency studies; the held-out samples are drawn from those N.
        warmup: fraction of the steps with linear warmup.
        max_grad_norm: gradient clipping norm.
        eval_samples: valid samples held out for the RoI-quality metrics.
        eval_every: steps between held-out evaluations (None: at the start and the end only).
        save_every: steps between checkpoints.
        log_every: steps between log lines.
        seed: data order and held-out split.
        iou_threshold: sigmoid threshold of the predicted mask in the held-out IoU.
        target: what the loss fits: ``labels`` (BCE on the non-ignored cells of the 3-valued
            labels) or ``attention`` (BCE against the grounding map over its peak, on every cell).
        keep_sinks: do not zero the sink tokens: labels recomputed from the grounding with an empty
            sink mask, and an ``attention`` target that keeps the sinks' values.
        threshold: the default RoI threshold saved with the RPN; None keeps the authors' 0.15. The
            calibrated threshold (:func:`calibrated_threshold`, on the held-out samples) is saved
            beside it either way.
    """

    start_layer: int = 15
    num_blocks: int = 3
    lr: float = 5e-5
    batch_size: int = 512
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_samples: int | None = None
    warmup: float = 0.03
    max_grad_norm: float = 1.0
    eval_samples: int = 256
    eval_every: int | None = None
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    iou_threshold: float = 0.5
    target: str = "labels"
    keep_sinks: bool = False
    threshold: float | None = None

    def resume_settings(self) -> dict:
        """The options a resumed run must share (logging and checkpoint cadence may change)."""
        fixed = asdict(self)
        for key in ("eval_every", "save_every", "log_every"):
            fixed.pop(key)
        return fixed


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSample:
    """One labelled sample: which record, its question and image, its (H, W) int8 labels, and the
    (N,) float16 grounding map and bool sink mask they were made from; ``padding`` the (N,) bool
    cells of the labelling view that hold no image, under label rules that make them known
    background (``padding_is_background``; else None)."""

    record: int
    question: str
    image: str
    labels: torch.Tensor
    grounding: torch.Tensor
    sink: torch.Tensor
    padding: torch.Tensor | None = None


@dataclass
class LabelSet:
    """The valid samples of a ``sdrpn label`` output, and how they were made."""

    samples: list[TrainSample]
    settings: dict
    image_root: Path


def read_label_set(directory: str | Path, image_root: str | Path | None = None) -> LabelSet:
    """The samples with valid labels in ``directory`` (written by ``sdrpn label``)."""
    directory = Path(directory)
    try:
        index = read_index(directory)
        settings = json.loads((directory / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--labels {directory}: not a finished `sdrpn label` output ({exc})") from None
    root = Path(image_root) if image_root is not None else Path(settings.get("image_root", "."))
    # The padding cells of the views matter under rules that make them known background.
    with_padding = bool(settings.get("options", {}).get("padding_is_background", False))
    shards: dict[str, dict] = {}
    samples = []
    for row in index:
        if not row["valid"]:
            continue
        if row["shard"] not in shards:
            shards[row["shard"]] = read_shard(directory / row["shard"])[0]
        tensors, position = shards[row["shard"]], row["row"]
        padding = tensors["padding"][position].flatten() if with_padding and "padding" in tensors else None
        samples.append(TrainSample(row["record"], row["question"], row["image"], tensors["labels"][position],
                                   tensors["grounding"][position].flatten(), tensors["sink"][position].flatten(),
                                   padding))
    return LabelSet(samples, settings, root)


def keep_sink_labels(samples: Sequence[TrainSample], settings: dict) -> list[TrainSample]:
    """The samples as if no token were a sink: empty sink masks, and labels recomputed from the
    stored grounding with the label run's rules (``settings``: its run.json). Under rules whose
    padding cells are known background (``padding_is_background``, the authors' Qwen2.5-VL rules)
    the padding cells the shards stored stay so: they are no sinks the detector found."""
    options = settings.get("options", {})
    missing = [key for key in LABEL_RULES if key not in options]
    if missing:
        raise UserError(f"the label run's run.json lacks {', '.join(missing)}: cannot recompute its labels "
                        f"for --keep-sinks")
    rules = {key: options[key] for key in LABEL_RULES}
    with_padding = bool(options.get("padding_is_background", False))
    if with_padding and any(sample.padding is None for sample in samples):
        raise UserError("the label run's rules treat the padding cells of its views as background, but its shards "
                        "do not hold them: cannot recompute its labels for --keep-sinks")
    relabelled = []
    for start in range(0, len(samples), RELABEL_CHUNK):
        chunk = samples[start:start + RELABEL_CHUNK]
        grounding = torch.stack([sample.grounding for sample in chunk]).float()
        no_sink = torch.zeros_like(grounding, dtype=torch.bool)
        grid = tuple(chunk[0].labels.shape)
        known = torch.stack([sample.padding for sample in chunk]).reshape(-1, *grid) if with_padding else None
        labels = assign_labels(grounding, no_sink, grid, **rules, known_background=known).to(torch.int8)
        relabelled += [replace(sample, labels=labels[i], sink=no_sink[i]) for i, sample in enumerate(chunk)]
    return relabelled


def sink_free_grounding(sample: TrainSample) -> torch.Tensor:
    """(N,) float32 grounding with the sample's sink tokens zeroed (and its padding cells, under label
    rules that make them known background: the labels saw the map so)."""
    grounding = sample.grounding.float().masked_fill(sample.sink, 0.0)
    return grounding if sample.padding is None else grounding.masked_fill(sample.padding, 0.0)


def training_samples(label_set: LabelSet, keep_sinks: bool) -> list[TrainSample]:
    """The samples a run trains and evaluates on: the label run's valid ones (relabelled by
    :func:`keep_sink_labels` under ``keep_sinks``), less those left without valid labels or without
    a positive grounding peak.

    The set does not depend on the target, so that an ablation compares the targets on the same
    samples; for the same reason the samples the label run marked invalid are never used, though
    their grounding is stored.
    """
    samples = keep_sink_labels(label_set.samples, label_set.settings) if keep_sinks else label_set.samples
    return [sample for sample in samples
            if bool(is_valid(sample.labels)) and float(sink_free_grounding(sample).max()) > 0]


def training_target(sample: TrainSample, target: str) -> torch.Tensor:
    """(N,) float target of the loss: the labels (the loss skips their IGNORE_INDEX cells), or for
    ``attention`` the sink-free grounding over its peak, a soft target on every cell."""
    if target == "labels":
        return sample.labels.flatten().float()
    grounding = sink_free_grounding(sample)
    return grounding / grounding.max()


def split_held_out(samples: Sequence[TrainSample], count: int, seed: int) -> tuple[list[TrainSample], list[TrainSample]]:
    """(train, held-out): ``count`` samples chosen by a seeded permutation, the rest for training."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: the same on every process and every rerun."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


@dataclass
class FeatureBatch:
    """Left-padded layer-K inputs of a batch, ready for the RPN."""

    hidden: torch.Tensor          # (B, S, D)
    attention_mask: torch.Tensor  # (B, S) bool
    image_start: torch.Tensor     # (B,) int64
    labels: torch.Tensor          # (B, N) int64
    rope_position_ids: torch.Tensor | None = None  # (P, B, S) rotary positions (multi-axis RoPE), else None

    @property
    def query_index(self) -> int:
        return self.hidden.shape[1] - 1  # the last prompt token (left padding)


class Backbone:
    """Layers ``0 .. K-1`` of the frozen model, without autograd, with an optional disk cache.

    Per sample it yields the states entering layer K over the real prompt tokens (the sequence
    ends at the query token), the position of the first image token in it and, for multi-axis RoPE,
    the tokens' rotary positions. The questions are asked in the conversation template ``prompt``
    (None: the model family's default), about the images' labelling views (what the labels were made
    on: :meth:`~sdrpn.models.base.ModelAdapter.labelling_view`, encoded by the adapter's labelling
    processor).
    """

    def __init__(self, model, processor, adapter: ModelAdapter, start_layer: int, image_root: Path,
                 cache_dir: str | Path | None = None, prompt=None):
        self.model = model
        self.processor = adapter.labelling_processor(processor)
        self.adapter = adapter
        self.start_layer = start_layer
        self.image_root = image_root
        self.template = template_for(prompt, adapter)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._check_cache()

    def _check_cache(self) -> None:
        geometry = self.adapter.geometry
        identity = {"model": self.adapter.config_fingerprint(), "start_layer": self.start_layer,
                    "dtype": str(self.adapter.dtype), "prompt": self.template.to_dict(),
                    "geometry": geometry.mode if geometry is not None else None}
        view = self.adapter.labelling_settings()
        if view is not None:  # a view of the family's own (LLaVA's is the processor's: its geometry)
            identity["labelling_view"] = view
        path = self.cache_dir / "cache.json"
        if path.exists():
            # Caches that did not record the template and geometry were made with the processor's
            # chat template and the checkpoint's own processor.
            found = {"prompt": template_named(PROCESSOR_TEMPLATE).to_dict(), "geometry": identity["geometry"],
                     **json.loads(path.read_text())}
            if found != identity:
                raise UserError(f"--cache {self.cache_dir} holds features of another model, K, dtype, prompt "
                                f"template or geometry; use another directory")
        else:
            atomic_write(path, json.dumps(identity).encode())

    def _cache_path(self, sample: TrainSample) -> Path:
        return self.cache_dir / f"{sample.record:09d}.safetensors"

    @torch.no_grad()
    def _compute(self, samples: Sequence[TrainSample]) -> list[tuple[torch.Tensor, int, torch.Tensor | None]]:
        adapter = self.adapter
        grid = tuple(int(size) for size in adapter.image_grid)
        views = []
        for sample in samples:
            try:
                image = open_rgb_image(self.image_root, sample.image)[0]
            except RecordProblem as problem:
                raise UserError(f"training sample {sample.record}: {problem} (pass --image-root)") from None
            view = adapter.labelling_view(image)
            if tuple(view.grid) != grid or tuple(sample.labels.shape) != grid:
                raise UserError(f"training sample {sample.record}: its labelling view is {view.grid[0]}x{view.grid[1]} "
                                f"tokens and its labels {tuple(sample.labels.shape)}; the RPN is trained on "
                                f"{grid[0]}x{grid[1]}")
            views.append(view.image)
        prompts = [self.template.render(sample.question, self.processor) for sample in samples]
        encoded = self.processor(images=views, text=prompts, return_tensors="pt", padding=True, padding_side="left")
        names = adapter.vision_input_names
        vision = encoded[names[0]] if len(names) == 1 else {name: encoded[name] for name in names}
        inputs = adapter.embed(encoded["input_ids"], vision, encoded["attention_mask"])
        hidden = adapter.run_layers(inputs.inputs_embeds, 0, self.start_layer, inputs.position_ids,
                                    inputs.attention_mask, None, inputs.rope_position_ids, inputs.layer_additions)
        features = []
        for row in range(len(samples)):
            real = inputs.attention_mask[row]
            first = int(real.int().argmax())
            rope = None if inputs.rope_position_ids is None else inputs.rope_position_ids[:, row, first:]
            features.append((hidden[row, first:], int(inputs.image_start[row]) - first, rope))
        return features

    def __call__(self, samples: Sequence[TrainSample], device: torch.device) -> FeatureBatch:
        """Layer-K inputs of ``samples``, left-padded into one batch on ``device``."""
        features: dict[int, tuple[torch.Tensor, int, torch.Tensor | None]] = {}
        missing = []
        for position, sample in enumerate(samples):
            path = self._cache_path(sample) if self.cache_dir is not None else None
            if path is not None and path.exists():
                stored = load_file(path)
                features[position] = (stored["hidden"], int(stored["image_start"]), stored.get("rope"))
            else:
                missing.append(position)
        if missing:
            for position, feature in zip(missing, self._compute([samples[p] for p in missing])):
                features[position] = feature
                if self.cache_dir is not None:
                    tensors = {"hidden": feature[0].cpu().contiguous(), "image_start": torch.tensor(feature[1])}
                    if feature[2] is not None:
                        tensors["rope"] = feature[2].cpu().contiguous()
                    atomic_write(self._cache_path(samples[position]), save(tensors))
        return self._collate([features[p] for p in range(len(samples))], samples, device)

    @staticmethod
    def _collate(features, samples, device) -> FeatureBatch:
        length = max(feature[0].shape[0] for feature in features)
        width = features[0][0].shape[-1]
        hidden = torch.zeros(len(features), length, width, dtype=features[0][0].dtype, device=device)
        mask = torch.zeros(len(features), length, dtype=torch.bool, device=device)
        ropes = [feature[2] for feature in features]
        rope = None
        if ropes[0] is not None:
            rope = torch.zeros(ropes[0].shape[0], len(features), length, dtype=torch.int64, device=device)
        starts = []
        for row, (states, image_start, *_) in enumerate(features):
            pad = length - states.shape[0]
            hidden[row, pad:] = states.to(device)
            mask[row, pad:] = True
            if rope is not None:
                rope[:, row, pad:] = ropes[row].to(device)
            starts.append(pad + image_start)
        labels = torch.stack([sample.labels.flatten() for sample in samples]).to(device, torch.int64)
        return FeatureBatch(hidden, mask, torch.tensor(starts, device=device), labels, rope)


# ------------------------------------------------------------------------------------------------
# Loss, metrics, schedule
# ------------------------------------------------------------------------------------------------


def bce_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed BCE-with-logits over the non-ignored cells, and their count. ``targets``: 0/1 labels
    or soft targets in [0, 1]; cells equal to IGNORE_INDEX are skipped."""
    keep = targets != IGNORE_INDEX
    loss = F.binary_cross_entropy_with_logits(logits.float()[keep], targets[keep].float(), reduction="sum")
    return loss, int(keep.sum())


def roi_statistics(logits: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """Summed BCE, labelled cells, and mask intersection / union with the foreground labels, over
    the non-ignored cells (the ignored ones are unknown either way)."""
    keep = labels != IGNORE_INDEX
    loss, cells = bce_sum(logits, labels)
    predicted = (torch.sigmoid(logits.float()) > threshold) & keep
    foreground = labels == 1
    return {"bce": float(loss), "cells": cells, "intersection": float((predicted & foreground).sum()),
            "union": float((predicted | foreground).sum())}


def roi_iou_sums(logits: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
                 thresholds: Sequence[float] = CALIBRATION_THRESHOLDS,
                 roi_options: RoIOptions = RoIOptions()) -> torch.Tensor:
    """(len(thresholds),) float64: for each threshold t, the per-sample IoU, over the non-ignored
    cells, of the cells the engine's second view shows at t (:func:`sdrpn.roi.propose` with
    ``roi_options``, the family's post-processing, at t: blur, threshold, the component area rules,
    box or masked upscaling) with the fg labels, summed over the batch. A sample without a RoI
    scores 0, as in the testbed's localisation IoU: a map whose only component is a single cell
    (dropped as noise) counts as none."""
    maps = logits.float().reshape(-1, *grid)
    keep = labels != IGNORE_INDEX
    foreground = labels == 1
    sums = []
    for threshold in thresholds:
        shown = propose(maps, grid, replace(roi_options, threshold=threshold)).cells
        predicted = shown.flatten(1) & keep
        iou = (predicted & foreground).sum(dim=1) / (predicted | foreground).sum(dim=1).clamp_min(1)
        sums.append(iou.double().sum())
    return torch.stack(sums).cpu()


def calibrated_threshold(mean_ious: Sequence[float], thresholds: Sequence[float] = CALIBRATION_THRESHOLDS) -> float:
    """The threshold whose RoI masks overlap the fg labels best (the mean of :func:`roi_iou_sums`
    over the held-out samples, one per threshold). On a tie the largest wins: it gives the fewest
    RoI tokens. The labels are the model's own pseudo-labels, so the choice needs no annotation."""
    best = max(mean_ious)
    return thresholds[max(index for index, value in enumerate(mean_ious) if value == best)]


def prompt_image_start(processor, template: PromptTemplate, adapter: ModelAdapter) -> int:
    """The index of the first image token in ``template``'s prompts as ``processor`` encodes them (it
    comes before the question, so one blank image and question tell)."""
    from PIL import Image

    from ..engine.pipeline import image_starts

    height, width = adapter.vision_input_size
    encoded = processor(images=[Image.new("RGB", (width, height))], text=[template.render("?", processor)],
                        return_tensors="pt")
    return image_starts(encoded["input_ids"], None, adapter.image_token_id)[0]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay to ``floor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_factor(step: int, total_steps: int, warmup: float) -> float:
    """Linear warmup over ``warmup`` of the steps, then cosine decay to zero."""
    return warmup_cosine(step, max(1, math.ceil(warmup * total_steps)), total_steps)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """The trained RPN (unwrapped), the log records and the final held-out metrics."""

    rpn: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


class Trainer:
    """One training run; see the module docstring. Use :func:`train_rpn`."""

    def __init__(self, model, processor, label_set: LabelSet, out_dir: str | Path, options: TrainOptions,
                 cache_dir: str | Path | None = None, adapter: ModelAdapter | None = None):
        from .. import RPN
        from ..models import adapter_for

        self.options = options
        self.out_dir = Path(out_dir)
        self.context = distributed.launch_context()
        self.adapter = adapter or adapter_for(model, processor)
        self.device = self.adapter.device
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.eval()
        if not 0 <= options.start_layer or options.start_layer + options.num_blocks > self.adapter.num_layers:
            raise UserError(f"--K {options.start_layer} --T {options.num_blocks}: the RPN spans layers K .. K+T-1, "
                            f"which must lie in the model's {self.adapter.num_layers} layers")
        injected = self.adapter.injection_layers
        if injected and options.start_layer <= max(injected):  # Qwen3-VL's deepstack: inference would refuse the RPN
            raise UserError(f"--K {options.start_layer}: {self.adapter.family} adds image features after layers "
                            f"{list(injected)}, and SD-RPN reuses stage 1's cache only from K >= {max(injected) + 1}")
        world = self.context.world_size
        if options.batch_size % (world * options.grad_accum):
            raise UserError(f"--batch-size {options.batch_size} must be a multiple of processes x --grad-accum "
                            f"= {world} x {options.grad_accum}")
        if options.target not in TARGETS:
            raise UserError(f"--target {options.target}: expected one of {', '.join(TARGETS)}")
        if options.threshold is not None and not 0.0 <= options.threshold <= 1.0:
            raise UserError(f"--threshold {options.threshold}: expected a probability in [0, 1]")
        samples = training_samples(label_set, options.keep_sinks)[:options.max_samples]
        train, held_out = split_held_out(samples, min(options.eval_samples, len(samples) // 5), options.seed)
        if len(train) < options.batch_size:
            raise UserError(f"{len(train)} training samples ({len(samples)} valid, {len(held_out)} held "
                            f"out) do not fill one batch of --batch-size {options.batch_size}")
        self.train_samples, self.held_out = train, held_out
        # Incomplete last batches are dropped: every process then runs the same number of equal
        # micro-batches, as DDP requires, and every step has the same weight.
        self.steps_per_epoch = len(train) // options.batch_size
        self.total_steps = options.max_steps or options.epochs * self.steps_per_epoch
        template = label_template(label_set.settings)
        recorded_view = label_set.settings.get("labelling_view")
        if recorded_view is not None and recorded_view != self.adapter.labelling_settings():
            raise UserError(f"the labels were made on the labelling view {recorded_view}, but this model's is "
                            f"{self.adapter.labelling_settings()}")
        self.backbone = Backbone(model, processor, self.adapter, options.start_layer, label_set.image_root, cache_dir,
                                 template)

        labels = {**label_set.settings.get("options", {}), "target": options.target, "keep_sinks": options.keep_sinks}
        threshold = {} if options.threshold is None else {"threshold": options.threshold}
        self.rpn = RPN.from_model(self.adapter, options.start_layer, options.num_blocks, labels=labels,
                                  prompt=template, image_start=prompt_image_start(processor, template, self.adapter),
                                  geometry=None if self.adapter.geometry is None else self.adapter.geometry.mode,
                                  **threshold).float().to(self.device)
        self.rpn.requires_grad_(True)  # copied from the frozen model
        self.rpn.train()
        self.module = self.rpn
        if self.context.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(self.rpn)
        self.optimizer = torch.optim.AdamW(self.rpn.parameters(), lr=options.lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, options.warmup))
        records = hashlib.sha256(json.dumps([s.record for s in samples]).encode()).hexdigest()
        self.settings = {"format": CHECKPOINT_FORMAT, "options": options.resume_settings(),
                         "model": self.adapter.config_fingerprint(), "labels": label_set.settings,
                         "samples": records}
        self.step = 0

    # -- checkpoints -------------------------------------------------------------------------------

    def _checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save_checkpoint(self) -> None:
        if not self.context.is_main:
            return
        buffer = io.BytesIO()
        torch.save({"settings": json.dumps(self.settings), "step": self.step, "rpn": self.rpn.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, buffer)
        atomic_write(self._checkpoint_path(), buffer.getvalue())

    def resume(self) -> bool:
        """Continue from the checkpoint in ``out_dir`` if there is one; True if so."""
        path = self._checkpoint_path()
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        if json.loads(state["settings"]) != self.settings:
            raise UserError(f"{path} belongs to a run with other settings (model, labels or options); "
                            f"pass another --out, or delete the checkpoint to start over")
        self.rpn.load_state_dict(state["rpn"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        return True

    # -- steps -------------------------------------------------------------------------------------

    def _global_batch(self, step: int) -> list[TrainSample]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_samples), self.options.seed, epoch)
        chosen = order[position * self.options.batch_size:(position + 1) * self.options.batch_size]
        return [self.train_samples[i] for i in chosen]

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def train_step(self) -> dict:
        """One optimizer step over the next global batch; returns the log record."""
        batch = self._global_batch(self.step)
        targets = torch.stack([training_target(sample, self.options.target) for sample in batch])
        total_cells = int((targets != IGNORE_INDEX).sum())
        mine = batch[self.context.rank::self.context.world_size]
        my_targets = targets[self.context.rank::self.context.world_size]
        micro = len(mine) // self.options.grad_accum
        local_loss = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for number, start in enumerate(range(0, len(mine), micro)):
            features = self.backbone(mine[start:start + micro], self.device)
            sync = number == self.options.grad_accum - 1 or not self.context.distributed
            with (contextlib.nullcontext() if sync else self.module.no_sync()), self._autocast():
                logits = self.module(features.hidden.float(), features.query_index, features.image_start,
                                     features.attention_mask, rope_position_ids=features.rope_position_ids)
                loss, _ = bce_sum(logits, my_targets[start:start + micro].to(self.device))
                # DDP averages gradients over processes; scale so that they add up to the global mean.
                (loss * self.context.world_size / max(total_cells, 1)).backward()
            local_loss += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.rpn.parameters(), self.options.max_grad_norm)
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        loss_sum = sum(distributed.gather_objects(local_loss))
        return {"step": self.step, "loss": loss_sum / max(total_cells, 1), "lr": lr,
                "grad_norm": float(grad_norm), "samples": len(batch)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out BCE (mean over labelled cells), IoU of the predicted masks with the fg labels, and
        the mean IoU of the cells the engine's RoI views show at each calibration threshold."""
        self.rpn.eval()
        totals = {"bce": 0.0, "cells": 0, "intersection": 0.0, "union": 0.0,
                  "iou_sums": torch.zeros(len(CALIBRATION_THRESHOLDS), dtype=torch.float64)}
        mine = self.held_out[self.context.rank::self.context.world_size]
        size = max(1, self.options.batch_size // (self.context.world_size * self.options.grad_accum))
        roi_options = RoIOptions(**self.adapter.roi_defaults)  # the engine's, for this family
        for start in range(0, len(mine), size):
            features = self.backbone(mine[start:start + size], self.device)
            with self._autocast():
                logits = self.rpn(features.hidden.float(), features.query_index, features.image_start,
                                  features.attention_mask, rope_position_ids=features.rope_position_ids)
            for key, value in roi_statistics(logits, features.labels, self.options.iou_threshold).items():
                totals[key] += value
            totals["iou_sums"] += roi_iou_sums(logits, features.labels, self.rpn.image_grid, roi_options=roi_options)
        self.rpn.train()
        merged = {key: sum(part[key] for part in distributed.gather_objects(totals)) for key in totals}
        return {"step": self.step, "held_out_bce": merged["bce"] / max(merged["cells"], 1),
                "held_out_iou": merged["intersection"] / merged["union"] if merged["union"] else 0.0,
                "held_out_samples": len(self.held_out),
                "roi_iou_by_threshold": (merged["iou_sums"] / max(len(self.held_out), 1)).tolist()}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, "".join(line + "\n" for line in kept).encode())


def _calibrated_threshold(trainer: Trainer, final: dict | None) -> float | None:
    """The RoI threshold calibrated on the held-out samples (None without any); a warning when it
    lands on an end of the search range, where the best one may lie beyond it."""
    if final is None:
        return None
    ious = final["roi_iou_by_threshold"]
    chosen = calibrated_threshold(ious)
    if trainer.context.is_main:
        iou = ious[CALIBRATION_THRESHOLDS.index(chosen)]
        print(f"calibrated RoI threshold {chosen:g} on the held-out labels (IoU {iou:.4f} of the cells the "
              f"engine's RoI view shows with their foreground); saved as calibrated_threshold, used with "
              f"--threshold calibrated (the default stays {trainer.rpn.threshold:g})", file=sys.stderr)
        edge = _range_edge_warning(chosen, max(ious))
        if edge:
            print(f"sdrpn train: warning: {edge}", file=sys.stderr)
    return chosen


def _range_edge_warning(chosen: float, best_iou: float) -> str | None:
    """Why a threshold on an end of :data:`CALIBRATION_THRESHOLDS` is doubtful, or None inside it."""
    low, high = CALIBRATION_THRESHOLDS[0], CALIBRATION_THRESHOLDS[-1]
    searched = f"the search range {low:g} .. {high:g}"
    if best_iou <= 0.0:
        return (f"no threshold of {searched} gives a RoI mask that overlaps the held-out foreground labels "
                f"(IoU 0 at every one), so the calibrated {chosen:g} means nothing; check the labels "
                f"(sdrpn label) and train longer")
    if chosen == low:
        return (f"the calibrated threshold {chosen:g} is the lowest of {searched}: the RPN's probabilities are "
                f"low everywhere, and a lower threshold might overlap the labels better; train longer or "
                f"pass --threshold to generate, show and eval")
    if chosen == high:
        return (f"the calibrated threshold {chosen:g} is the highest of {searched}: a higher one might "
                f"overlap the labels better; pass --threshold to generate, show and eval")
    return None


def train_rpn(model, processor, label_set: LabelSet, out_dir: str | Path, options: TrainOptions,
              cache_dir: str | Path | None = None, progress: bool = True,
              callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train an RPN for ``model`` on ``label_set`` and save it to ``out_dir`` with
    ``RPN.save_pretrained``; resumes from ``out_dir``'s checkpoint when there is one.

    ``model`` is frozen (``requires_grad`` off, eval mode) and is never changed otherwise.

    ``callback`` receives every log record (steps and evaluations) as it is made.
    Must run inside :func:`sdrpn.distributed.process_group` when launched by ``torchrun``.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    trainer = Trainer(model, processor, label_set, out_dir, options, cache_dir)
    context = trainer.context
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    resumed = trainer.resume()
    log_path = out_dir / LOG_NAME
    if context.is_main:
        _truncate_log(log_path, trainer.step)
    result = TrainResult(trainer.rpn)

    def record(entry: dict, kind: str) -> None:
        entry = {"kind": kind, **entry}
        (result.history if kind == "train" else result.evaluations).append(entry)
        if context.is_main:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if callback is not None:
            callback(entry)

    bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", desc="train",
               disable=not (progress and context.is_main), dynamic_ncols=True)
    if context.is_main:
        bar.write(f"sdrpn train: {len(trainer.train_samples)} training samples, {len(trainer.held_out)} held out, "
                  f"{trainer.total_steps} steps of {options.batch_size}"
                  + (f"; resumed at step {trainer.step}" if resumed else ""), file=sys.stderr)
    if not resumed and trainer.held_out:
        record(trainer.evaluate(), "eval")
    started = time.perf_counter()
    while trainer.step < trainer.total_steps:
        entry = trainer.train_step()
        entry["seconds"] = time.perf_counter() - started
        record(entry, "train")
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
        if trainer.step % options.log_every == 0 and context.is_main:
            bar.write(f"step {trainer.step}: loss {entry['loss']:.4f}, lr {entry['lr']:.2e}", file=sys.stderr)
        if options.eval_every and trainer.step % options.eval_every == 0 and trainer.step < trainer.total_steps \
                and trainer.held_out:
            record(trainer.evaluate(), "eval")
        if trainer.step % options.save_every == 0 and trainer.step < trainer.total_steps:
            trainer.save_checkpoint()
    bar.close()
    if trainer.held_out:
        final = trainer.evaluate()
        record(final, "eval")
        if context.is_main:
            print(f"held-out: IoU {final['held_out_iou']:.4f}, BCE {final['held_out_bce']:.4f} "
                  f"({final['held_out_samples']} samples)", file=sys.stderr)
    trainer.rpn.calibrated_threshold = _calibrated_threshold(trainer, final if trainer.held_out else None)
    if context.is_main:
        trainer.rpn.save_pretrained(out_dir)
        trainer.save_checkpoint()
    distributed.barrier()
    return result
