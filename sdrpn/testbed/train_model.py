"""Training the testbed's tiny LLaVA from scratch (``sdrpn testbed train-model``).

Two stages: the vision warm start (:mod:`sdrpn.testbed.vision_warmup`), then the projector and
the language model (the tower frozen by default) on batches of :mod:`sdrpn.testbed.batches`.
Each batch is one of three kinds of sequences, drawn at random (coarse questions always in the
first during the refinement steps):

* ``single``: ``[system][image tokens][question][answer]``, the plain LLaVA layout;
* ``box``: ``[system][image tokens][RoI tokens][question][answer]``, the stage-2 layout of
  two-stage inference (DESIGN section 2). The RoI is a box of grid cells covering the question's
  ground-truth box, grown by up to ``max_grow`` cells per side at random;
* ``mask``: the same with a second, random component of cells, as masked upscaling sees it: the
  crop encloses both components and only the RoI tokens under them are kept.

The RoI views are made by the engine's own code (:mod:`sdrpn.roi`) from a map forced onto those
cells, so training sees exactly the crops, token counts and token order that inference produces.
The model learns to locate at the base resolution and to read in the second view; it cannot read
the numbers at the base resolution, which is what the testbed is about.

Reproducible: the initial weights, the data order and every augmentation are functions of the
seed and the step only, so a run resumed from its checkpoint continues as if never interrupted
(bit for bit on the same machine and number of threads).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ..distill.train import warmup_cosine
from ..errors import UserError
from .batches import VIEW_MODES, Batch, QuestionSet, batch_indices, make_batch
from .model_card import write_model_card
from .tiny_model import TinyLlavaSpec, build_model, build_processor
from .vision_warmup import warm_start_vision

__all__ = ["DESIGN_RECIPES", "TrainModelOptions", "answer_logits", "evaluate", "loss_and_correct", "train_model",
           "trained_design"]

CHECKPOINT = "checkpoint.pt"
TRAINING_LOG = "training.json"


@dataclass(frozen=True)
class TrainModelOptions:
    """The training recipe.

    Attributes:
        steps: optimizer steps.
        batch_size: questions per step.
        lr: peak learning rate (AdamW, betas 0.9/0.98), after ``warmup_steps`` of linear warmup,
            then cosine decay to ``lr * min_lr_ratio``.
        weight_decay: on weight matrices only.
        max_grad_norm: gradient clipping.
        seed: initial weights, data order and augmentation.
        view_mix: probabilities of the ``single``, ``box`` and ``mask`` batches.
        max_grow: cells a ground-truth RoI may grow by on each side.
        eval_every: steps between validation runs (and at the end).
        eval_samples: validation questions used.
        save_every: steps between checkpoints.
        bf16: run the forward and backward under bfloat16 autocast (weights and optimizer stay
            float32); about twice as fast on CPUs with AVX512-BF16 and on GPUs.
        vision_steps: steps of the vision warm start before the language model is trained
            (:mod:`sdrpn.testbed.vision_warmup`; 0 skips it).
        vision_batch_size: questions per warm-start step (each gives two views).
        vision_lr: the warm start's peak learning rate.
        vision_marks_details: the warm start gives the tokens of numbers unreadable in a base view a
            class of their own instead of ignoring them (:mod:`sdrpn.testbed.vision_warmup`).
        freeze_vision: keep the vision tower fixed while the projector and the language model
            train (LLaVA's recipe with a pretrained CLIP).
        refine_steps, refine_lr: steps after the main schedule, at a constant learning rate, with
            every coarse question in a single view. Coarse questions are the only ones that teach
            the model to find the named shape and read it at the base resolution, where
            self-distillation reads its labels; with a second view it could read them there
            instead. Early on, though, their easy RoI views are what gets reading started, so
            the refinement comes last (the record in ``benchmarks/results/testbed``).
    """

    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    view_mix: tuple[float, float, float] = (0.3, 0.5, 0.2)
    max_grow: int = 1
    eval_every: int = 250
    eval_samples: int = 256
    save_every: int = 200
    bf16: bool = True
    vision_steps: int = 1500
    vision_batch_size: int = 32
    vision_lr: float = 1e-3
    vision_marks_details: bool = False
    freeze_vision: bool = True
    refine_steps: int = 1250
    refine_lr: float = 5e-4

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.refine_steps < 0:
            raise UserError(f"steps and batch size must be positive and refine steps >= 0, got {self.steps}, "
                            f"{self.batch_size} and {self.refine_steps}")
        if len(self.view_mix) != len(VIEW_MODES) or min(self.view_mix) < 0 or not math.isclose(sum(self.view_mix), 1.0):
            raise UserError(f"view_mix must be {len(VIEW_MODES)} probabilities summing to 1, got {self.view_mix}")

    @property
    def total_steps(self) -> int:
        return self.steps + self.refine_steps

    def recipe(self) -> dict:
        """The options that change the trained weights (a checkpoint resumes only under the same).
        ``vision_marks_details`` is left out when off, as in the recipes written before it existed."""
        return {key: value for key, value in asdict(self).items()
                if key not in ("eval_every", "eval_samples", "save_every")
                and (key != "vision_marks_details" or value)}


# The recipe of each data-set design (:data:`sdrpn.data.synthetic.DESIGNS`). In "one-detail" the
# only number of an image is where the answer is, so the warm start marks where numbers are even
# where it cannot read them: the answer's attention then has a feature to find in the base view.
DESIGN_RECIPES: dict[str, TrainModelOptions] = {
    "classic": TrainModelOptions(),
    "one-detail": TrainModelOptions(vision_marks_details=True),
}


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def answer_logits(model, adapter, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits of every answer token.

    Returns:
        (B, A, vocab) logits, (B, A) target ids and (B, A) bool mask of real answer tokens.
    """
    device = adapter.device
    features = adapter.encode_images(batch.pixel_values.to(device))
    roi_features = None
    if batch.roi_pixel_values is not None:
        roi_features = adapter.encode_images(batch.roi_pixel_values.to(device))
    sequences, last_question = [], []
    for row, question in enumerate(batch.questions):
        parts = [adapter.embed_ids(question.prefix.to(device)[None])[0], features[row]]
        if roi_features is not None:
            parts.append(roi_features[row][batch.roi_keep[row].to(device)])
        parts.append(adapter.embed_ids(torch.cat([question.suffix, question.answer[:-1]]).to(device)[None])[0])
        sequence = torch.cat(parts)
        sequences.append(sequence)
        last_question.append(sequence.shape[0] - question.answer.shape[0])  # answer[:-1] follows it
    # Right padding: with causal attention no real token sees the padding, so no mask is needed.
    embeds = pad_sequence(sequences, batch_first=True)
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    width = max(q.answer.shape[0] for q in batch.questions)
    offsets = torch.arange(width)
    lengths = torch.tensor([q.answer.shape[0] for q in batch.questions])
    valid = offsets[None] < lengths[:, None]
    # The token at position p predicts token p + 1: the last question token predicts the first answer token.
    positions = (torch.tensor(last_question)[:, None] + offsets[None]).clamp(max=embeds.shape[1] - 1)
    picked = hidden.gather(1, positions.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))
    targets = pad_sequence([q.answer for q in batch.questions], batch_first=True)
    return model.lm_head(picked), targets.to(device), valid.to(device)


def loss_and_correct(logits, targets, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over answer tokens, and per question whether greedy decoding gives the
    whole answer (every token the argmax of its teacher-forced step)."""
    loss = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    hits = (logits.argmax(-1) == targets) | ~valid
    return loss, hits.all(dim=1)


@torch.no_grad()
def evaluate(model, adapter, processor, data: QuestionSet, batch_size: int = 32) -> dict[str, float]:
    """Accuracy per subset of ``data`` with one view, and with the ground-truth RoI as the second
    view: ``{"fine, one view": ..., "fine, ground-truth RoI": ..., "coarse, one view": ...}``."""
    was_training = model.training
    model.eval()
    grid, geometry = adapter.image_grid, adapter.geometry
    subsets = sorted({question.subset for question in data.questions}, key=lambda name: name != "fine")
    results = {}
    for mode, name in (("single", "one view"), ("box", "ground-truth RoI")):
        correct = torch.zeros(len(data), dtype=torch.bool)
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            batch = make_batch(data, indices, mode, processor, geometry, grid)
            correct[indices] = loss_and_correct(*answer_logits(model, adapter, batch))[1].cpu()
        for subset in subsets:
            members = torch.tensor([question.subset == subset for question in data.questions])
            results[f"{subset}, {name}"] = float(correct[members].float().mean())
    model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------


def _view_groups(data: QuestionSet, indices: list[int], mode: str, coarse_single_view: bool):
    """``(indices, mode)`` groups of one step: all in ``mode``, or the coarse questions apart in
    ``single`` when ``coarse_single_view`` (the refinement steps)."""
    if not coarse_single_view or mode == "single":
        return [(indices, mode)]
    coarse = [index for index in indices if data[index].subset == "coarse"]
    rest = [index for index in indices if data[index].subset != "coarse"]
    return [(group, group_mode) for group, group_mode in ((coarse, "single"), (rest, mode)) if group]


def _optimizer(trained: list[torch.nn.Parameter], options: TrainModelOptions):
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=options.lr, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step >= options.steps:
            return options.refine_lr / options.lr
        return warmup_cosine(step, options.warmup_steps, options.steps, options.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _atomic_torch_save(state, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _environment() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def train_model(data_dir: str | Path, out_dir: str | Path, options: TrainModelOptions | None = None,
                spec: TinyLlavaSpec | None = None, progress: bool = True) -> dict:
    """Trains the tiny LLaVA on ``data_dir`` (written by :func:`sdrpn.data.synthetic.generate_dataset`)
    and saves it (fp16 weights), its processor and ``training.json`` in ``out_dir``.

    Resumes from ``out_dir/checkpoint.pt`` when the recipe and data are the same. Returns the
    training summary (also in ``training.json``): recipe, timings, validation accuracies.
    """
    from tqdm.auto import tqdm

    from ..data.synthetic import read_manifest
    from ..models import adapter_for

    options = options or TrainModelOptions()
    spec = spec or TinyLlavaSpec()
    data_dir, out = Path(data_dir), Path(out_dir)
    manifest = read_manifest(data_dir)
    if manifest is None or not manifest.get("complete"):
        raise UserError(f"--data {data_dir}: not a complete data set of `sdrpn testbed generate` "
                        f"(no complete dataset.json)")
    out.mkdir(parents=True, exist_ok=True)

    processor = build_processor(spec)
    model = build_model(spec, seed=options.seed).train()
    # With head dim 32 and ~300 tokens, plain matmul attention trains about 1.5x faster on a CPU
    # than the fused SDPA kernels (slow backward in bfloat16); the saved model uses SDPA again.
    model.set_attn_implementation("eager")
    adapter = adapter_for(model, processor)
    train = QuestionSet(data_dir, "train", processor)
    val = QuestionSet(data_dir, "val", processor, limit=options.eval_samples)
    if len(train) == 0:
        raise UserError(f"--data {data_dir}: the train split is empty")
    identity = {"recipe": options.recipe(), "spec": asdict(spec), "data": manifest}

    start, history, vision_history, elapsed = 0, [], [], 0.0
    running = {"loss": 0.0, "correct": 0, "seen": 0}  # training statistics since the last evaluation
    checkpoint = out / CHECKPOINT
    state = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.is_file() else None
    if state is not None and state["identity"] != identity:
        raise UserError(f"{checkpoint} was written by another recipe or data set; remove it or use another --out")
    began = time.perf_counter()
    in_warm_start = state is not None and state.get("stage") == "vision"
    if in_warm_start:
        elapsed = state["vision"]["elapsed"]
    if options.vision_steps and (state is None or in_warm_start):
        def save_warm_start(vision_state: dict) -> None:
            _atomic_torch_save({"identity": identity, "stage": "vision", "vision": vision_state}, checkpoint)

        vision_history = warm_start_vision(model, adapter, processor, train, val, options, progress,
                                           log=lambda line: tqdm.write(line),
                                           resume=state["vision"] if in_warm_start else None, save=save_warm_start)
        state = None
    model.model.vision_tower.requires_grad_(not options.freeze_vision)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(trained, options)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history, elapsed, running = state["step"], state["history"], state["elapsed"], state["running"]
        vision_history = state["vision_history"]

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save({"identity": identity, "step": step, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "history": history, "vision_history": vision_history, "running": running,
                            "elapsed": elapsed + time.perf_counter() - began}, checkpoint)

    if start == 0 and options.vision_steps:
        save_checkpoint(0)  # the finished warm start is never redone
    total = options.total_steps
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress)
    for step in range(start, total):
        rng = np.random.default_rng([options.seed, 2, step])
        mode = VIEW_MODES[rng.choice(len(VIEW_MODES), p=options.view_mix)]
        indices = batch_indices(step, options.batch_size, len(train), options.seed)
        loss, correct = 0.0, []
        for part, part_mode in _view_groups(train, indices, mode, coarse_single_view=step >= options.steps):
            batch = make_batch(train, part, part_mode, processor, adapter.geometry, adapter.image_grid, rng,
                               options.max_grow)
            with torch.autocast(adapter.device.type, dtype=torch.bfloat16, enabled=options.bf16):
                part_loss, part_correct = loss_and_correct(*answer_logits(model, adapter, batch))
            loss = loss + part_loss * (len(part) / len(indices))
            correct.append(part_correct)
        correct = torch.cat(correct)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, options.max_grad_norm)
        optimizer.step()
        scheduler.step()
        running["loss"] += loss.item() * len(correct)
        running["correct"] += int(correct.sum())
        running["seen"] += len(correct)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", mode=mode)

        done = step + 1
        if done % options.eval_every == 0 or done == total:
            accuracy = evaluate(model, adapter, processor, val, options.batch_size)
            entry = {"step": done, "train_loss": running["loss"] / max(running["seen"], 1),
                     "train_accuracy": running["correct"] / max(running["seen"], 1),
                     "lr": scheduler.get_last_lr()[0], "val": accuracy,
                     "elapsed_s": round(elapsed + time.perf_counter() - began, 1)}
            history.append(entry)
            running = {"loss": 0.0, "correct": 0, "seen": 0}
            bar.write(f"step {done}: train loss {entry['train_loss']:.3f}, val accuracy "
                      + ", ".join(f"{name} {value:.3f}" for name, value in accuracy.items()))
        if done % options.save_every == 0 and done < total:
            save_checkpoint(done)
    bar.close()

    elapsed += time.perf_counter() - began
    summary = {"recipe": options.recipe(), "spec": asdict(spec), "data": manifest,
               "vision_history": vision_history, "history": history,
               "train_seconds": round(elapsed, 1), "environment": _environment(),
               "val_samples": len(val), "final": history[-1]["val"] if history else None}
    # fp16 storage halves the files; the model is used (and evaluated) in float32.
    model.set_attn_implementation("sdpa")
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    with open(out / TRAINING_LOG, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    write_model_card(out)
    if checkpoint.is_file():
        checkpoint.unlink()
    return summary


def trained_design(model_dir: str | Path) -> str | None:
    """The design of the data set a model of :func:`train_model` was trained on, read from its
    ``training.json``; None without one, or for a configuration that no design names."""
    from ..data.synthetic import design_of

    path = Path(model_dir) / TRAINING_LOG
    if not path.is_file():
        return None
    try:
        return design_of(json.loads(path.read_text(encoding="utf-8"))["data"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a training summary of `sdrpn testbed train-model` ({error})") from None
