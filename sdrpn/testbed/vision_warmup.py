"""Vision warm start of the testbed's tiny LLaVA: the CLIP tower learns to see the digits first.

A real LLaVA starts from a pretrained CLIP. The testbed model starts from nothing, and a ViT that
learns only through the language model's answer loss gets no glyph features in a CPU budget: the
answer cannot attend to features that do not exist yet, so the loss stays at the digit prior (the
record in ``benchmarks/results/testbed``). So ``train-model`` first trains the vision tower alone,
with dense targets from the generator's ground truth: each image token of a view is classified as
background, or as the tens or the ones digit whose glyph centre lies in its patch. The views are
those the language model is then trained on, base views and the engine's RoI views; glyphs that
are unreadable in a view (fine numbers in a base view) are ignored rather than called background,
or, with ``vision_marks_details``, given a class of their own: "a detail is here", which a pretrained CLIP
sees in text too small to read, and which the answer's attention can then find in the base view.
The per-token classifier is thrown away afterwards; only the tower's weights are kept.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..distill.train import warmup_cosine
from .batches import batch_indices, make_batch

__all__ = ["TokenDigitHead", "glyph_accuracy", "token_targets", "warm_start_vision"]

BACKGROUND, IGNORE = 0, -100
NUM_CLASSES = 21  # background, tens digit 0-9, ones digit 0-9
DETAIL = NUM_CLASSES  # an unreadable glyph's token, an extra class when details are marked


class TokenDigitHead(nn.Module):
    """A linear classifier of each image token's features into ``classes`` classes."""

    def __init__(self, width: int, classes: int = NUM_CLASSES):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.classify = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(tokens))


def _glyph_centres(number: str, box) -> list[tuple[int, float, float]]:
    """``(class, x, y)`` of the two glyphs of a number whose ink spans ``box`` (two equally wide
    bitmap glyphs side by side)."""
    x0, y0, x1, y1 = box
    y = (y0 + y1) / 2
    return [(1 + int(number[0]), x0 + (x1 - x0) / 4, y), (11 + int(number[1]), x0 + 3 * (x1 - x0) / 4, y)]


def token_targets(details, to_view, view_size: int, grid: tuple[int, int], readable: bool,
                  unreadable: int = IGNORE) -> torch.Tensor:
    """(H * W) int64 targets of one view.

    Args:
        details: ``(number, ink box)`` of every number in the source image.
        to_view: maps a source point ``(x, y)`` to view pixels.
        view_size: the square view's side in pixels.
        readable: whether glyphs are labelled with their digit (else with ``unreadable``).
        unreadable: the target of an unreadable glyph's token: :data:`IGNORE` or :data:`DETAIL`.
    """
    rows, cols = grid
    targets = torch.full((rows * cols,), BACKGROUND, dtype=torch.int64)
    for number, box in details:
        for label, x, y in _glyph_centres(number, box):
            u, v = to_view(x, y)
            if 0 <= u < view_size and 0 <= v < view_size:
                cell = int(v * rows / view_size) * cols + int(u * cols / view_size)
                targets[cell] = label if readable else unreadable
    return targets


def _batch_targets(batch, data, indices, geometry, grid, unreadable: int = IGNORE) -> torch.Tensor:
    """(2B, H * W) targets of a batch's base views, then its RoI views (``unreadable``: the target
    of a fine glyph's token in a base view)."""
    view_h, view_w = geometry.input_size
    base, roi = [], []
    for row, index in enumerate(indices):
        question = data[index]
        transform = geometry.transform(question.image_size)

        def to_base(x, y, transform=transform):
            x0, y0, _, _ = transform.source_to_view((x, y, x, y))
            return x0, y0

        x0, y0, width, height = (float(value) for value in batch.roi_crops[row])

        def to_roi(x, y, x0=x0, y0=y0, width=width, height=height):  # the crop is stretched to the view
            return (x - x0) * view_w / width, (y - y0) * view_h / height

        base.append(token_targets(question.details, to_base, view_w, grid, question.subset == "coarse", unreadable))
        roi.append(token_targets(question.details, to_roi, view_w, grid, True))
    return torch.stack(base + roi)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with glyph and background tokens weighted equally (glyphs are ~1% of tokens)."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    glyph, background = targets > BACKGROUND, targets == BACKGROUND
    loss = nn.functional.cross_entropy(logits[background], targets[background])
    if glyph.any():
        loss = 0.5 * loss + 0.5 * nn.functional.cross_entropy(logits[glyph], targets[glyph])
    return loss


def _features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image-token features LLaVA projects (CLS dropped), under autograd."""
    layer = model.config.vision_feature_layer
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


@torch.no_grad()
def glyph_accuracy(model, head, adapter, data, processor, bf16: bool = True, batch_size: int = 32) -> float:
    """Share of glyph tokens of ``data``'s tight RoI views classified right."""
    geometry, grid = adapter.geometry, adapter.image_grid
    correct = total = 0
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        batch = make_batch(data, indices, "box", processor, geometry, grid)
        targets = _batch_targets(batch, data, indices, geometry, grid)[len(indices):]
        with torch.autocast(adapter.device.type, dtype=torch.bfloat16, enabled=bf16):
            predicted = head(_features(model, batch.roi_pixel_values.to(adapter.device))).argmax(-1).cpu()
        glyph = targets > BACKGROUND
        correct += int((predicted[glyph] == targets[glyph]).sum())
        total += int(glyph.sum())
    return correct / max(total, 1)


def warm_start_vision(model, adapter, processor, train, val, options, progress: bool = True, log=print,
                      resume: dict | None = None, save=None) -> list[dict]:
    """Trains ``model``'s vision tower in place; returns the history (loss, held-out glyph accuracy).

    ``options`` is the :class:`~sdrpn.testbed.train_model.TrainModelOptions` (its ``vision_*``
    fields, seed, weight decay, growth and bf16). Each step draws ``vision_batch_size`` training
    questions and trains on their base views and their RoI views (ground-truth cells grown by up
    to ``max_grow`` per side, as the language model sees them). AdamW with 100 warmup steps, then
    cosine decay. Deterministic from the seed.

    Resumable: every ``options.save_every`` steps ``save`` (when given) receives the state dict
    that ``resume`` takes back, and a resumed run continues as if never interrupted.
    """
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    steps, seed = options.vision_steps, options.seed
    warmup = min(100, max(steps // 10, 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = TokenDigitHead(model.config.vision_config.hidden_size,
                              DETAIL + 1 if options.vision_marks_details else NUM_CLASSES)
    unreadable = DETAIL if options.vision_marks_details else IGNORE
    parameters = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=options.vision_lr, betas=(0.9, 0.98),
                                  weight_decay=options.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, steps))
    geometry, grid = adapter.geometry, adapter.image_grid
    start, history, running, elapsed = 0, [], [], 0.0
    if resume is not None:
        tower.load_state_dict(resume["tower"])
        head.load_state_dict(resume["head"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start, history, running, elapsed = resume["step"], resume["history"], resume["running"], resume["elapsed"]
    began = time.perf_counter()
    tower.train()
    for step in tqdm(range(start, steps), desc="vision warm start", unit="step", initial=start, total=steps,
                     disable=not progress):
        rng = np.random.default_rng([seed, 3, step])
        indices = batch_indices(step, options.vision_batch_size, len(train), seed + 1)
        batch = make_batch(train, indices, "box", processor, geometry, grid, rng, options.max_grow)
        targets = _batch_targets(batch, train, indices, geometry, grid, unreadable)
        views = torch.cat([batch.pixel_values, batch.roi_pixel_values])
        with torch.autocast(adapter.device.type, dtype=torch.bfloat16, enabled=options.bf16):
            loss = _loss(head(_features(model, views.to(adapter.device))).float(), targets.to(adapter.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        done = step + 1
        if done % 250 == 0 or done == steps:
            tower.eval()
            accuracy = glyph_accuracy(model, head, adapter, val, processor, options.bf16)
            tower.train()
            history.append({"step": done, "loss": float(np.mean(running)), "val_glyph_accuracy": accuracy,
                            "elapsed_s": round(elapsed + time.perf_counter() - began, 1)})
            running = []
            log(f"vision step {done}: loss {history[-1]['loss']:.3f}, held-out glyph accuracy {accuracy:.3f}")
        if save is not None and done % options.save_every == 0 and done < steps:
            save({"step": done, "tower": tower.state_dict(), "head": head.state_dict(),
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                  "running": running, "elapsed": elapsed + time.perf_counter() - began})
    return history
