"""Vision warm start of the testbed's tiny LLaVA: the CLIP tower and the projector learn to see first.

A real LLaVA starts from a pretrained CLIP. The testbed model starts from nothing, and a ViT that
learns only through the language model's answer loss gets no glyph features in a CPU budget: the
answer cannot attend to features that do not exist yet, so the loss stays at the digit prior (the
record in ``benchmarks/results/testbed``). So ``train-model`` first trains the vision tower and the
projector alone, with two dense targets for each image token, read by linear classifiers from the
projected tokens the language model will see:

* the digit: background, or the tens or the ones digit whose glyph centre lies in its patch (from
  the generator's ink boxes). Glyphs unreadable in a view (fine numbers in a base view) are ignored
  rather than called background;
* the colour: the shape colour (one of :data:`~sdrpn.data.synthetic.COLORS`) that covers at least
  half of its patch, or none (from the view's pixels). Without it the projected tokens keep little
  colour: in a model trained after a digits-only warm start, a linear probe read the target's
  colour from 34% of its projected centre tokens, against 86% of the tower's own outputs. A
  question names its shape by colour, and the language model's attention cannot find "the red
  square" in tokens that do not say red.

The views are those the language model is then trained on, base views and the engine's RoI views.
The classifiers are thrown away afterwards; the tower's and the projector's weights are kept.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..data.synthetic import COLORS
from ..distill.train import warmup_cosine
from .batches import batch_indices, make_batch

__all__ = ["TokenHead", "colour_targets", "held_out_accuracy", "token_targets", "warm_start_vision"]

BACKGROUND, IGNORE = 0, -100
NUM_CLASSES = 21  # background, tens digit 0-9, ones digit 0-9
NUM_COLOURS = 1 + len(COLORS)  # none, then the shape colours in COLORS order
COLOUR_TOLERANCE = 24  # per channel; the background and ink colours are >= 100 away from every shape colour


class TokenHead(nn.Module):
    """Linear classifiers of each image token's features: :data:`NUM_CLASSES` digit classes and
    :data:`NUM_COLOURS` colour classes."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.digits = nn.Linear(width, NUM_CLASSES)
        self.colours = nn.Linear(width, NUM_COLOURS)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.norm(tokens)
        return self.digits(tokens), self.colours(tokens)


def _glyph_centres(number: str, box) -> list[tuple[int, float, float]]:
    """``(class, x, y)`` of the two glyphs of a number whose ink spans ``box`` (two equally wide
    bitmap glyphs side by side)."""
    x0, y0, x1, y1 = box
    y = (y0 + y1) / 2
    return [(1 + int(number[0]), x0 + (x1 - x0) / 4, y), (11 + int(number[1]), x0 + 3 * (x1 - x0) / 4, y)]


def token_targets(details, to_view, view_size: int, grid: tuple[int, int], readable: bool) -> torch.Tensor:
    """(H * W) int64 targets of one view.

    Args:
        details: ``(number, ink box)`` of every number in the source image.
        to_view: maps a source point ``(x, y)`` to view pixels.
        view_size: the square view's side in pixels.
        readable: whether glyphs are labelled (else their tokens are ignored).
    """
    rows, cols = grid
    targets = torch.full((rows * cols,), BACKGROUND, dtype=torch.int64)
    for number, box in details:
        for label, x, y in _glyph_centres(number, box):
            u, v = to_view(x, y)
            if 0 <= u < view_size and 0 <= v < view_size:
                cell = int(v * rows / view_size) * cols + int(u * cols / view_size)
                targets[cell] = label if readable else IGNORE
    return targets


def colour_targets(pixel_values: torch.Tensor, mean, std, patch: int) -> torch.Tensor:
    """(B, H * W) int64 colour class of each patch of normalised views ``(B, 3, H * patch, W * patch)``:
    ``1 + i`` where the colour ``i`` of :data:`COLORS` covers at least half the patch, else 0."""
    scale = 255.0 * torch.tensor(std, dtype=torch.float32)[:, None, None]
    pixels = pixel_values.float() * scale + 255.0 * torch.tensor(mean, dtype=torch.float32)[:, None, None]
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)[:, :, None, None]   # (C, 3, 1, 1)
    near = ((pixels[:, None] - palette[None]).abs().amax(dim=2) <= COLOUR_TOLERANCE).float()  # (B, C, H, W)
    cover = nn.functional.avg_pool2d(near, patch).flatten(2)                                  # (B, C, tokens)
    share, colour = cover.max(dim=1)
    return torch.where(share >= 0.5, colour + 1, torch.zeros_like(colour))


def _batch_targets(batch, data, indices, geometry, grid) -> torch.Tensor:
    """(2B, H * W) targets of a batch's base views, then its RoI views."""
    view_size = geometry.input_size[0]
    base, roi = [], []
    for row, index in enumerate(indices):
        question = data[index]
        transform = geometry.transform(question.image_size)

        def to_base(x, y, transform=transform):
            x0, y0, _, _ = transform.source_to_view((x, y, x, y))
            return x0, y0

        x0, y0, side = (float(value) for value in batch.roi_squares[row])

        def to_roi(x, y, x0=x0, y0=y0, side=side):
            return (x - x0) * view_size / side, (y - y0) * view_size / side

        base.append(token_targets(question.details, to_base, view_size, grid, question.subset == "coarse"))
        roi.append(token_targets(question.details, to_roi, view_size, grid, True))
    return torch.stack(base + roi)


def _balanced_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the rare positive tokens (a glyph, a colour) and the class-0 tokens
    weighted equally: glyphs are ~1% of the tokens, coloured patches ~10%."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    positive, negative = targets > 0, targets == 0
    loss = nn.functional.cross_entropy(logits[negative], targets[negative])
    if positive.any():
        loss = 0.5 * loss + 0.5 * nn.functional.cross_entropy(logits[positive], targets[positive])
    return loss


def _loss(outputs, digit_targets: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    digit_logits, colour_logits = outputs
    return _balanced_loss(digit_logits.float(), digit_targets) + _balanced_loss(colour_logits.float(), colours)


def _colours(pixel_values: torch.Tensor, processor, adapter) -> torch.Tensor:
    image_processor = processor.image_processor
    patch = pixel_values.shape[-1] // adapter.image_grid[1]
    return colour_targets(pixel_values, image_processor.image_mean, image_processor.image_std, patch)


@torch.no_grad()
def held_out_accuracy(model, head, adapter, data, processor, bf16: bool = True, batch_size: int = 32) -> dict:
    """``{"glyph": ..., "colour": ...}``: the share of glyph tokens of ``data``'s tight RoI views
    and of coloured tokens of its base views that the classifiers get right."""
    geometry, grid = adapter.geometry, adapter.image_grid
    counts = {"glyph": [0, 0], "colour": [0, 0]}
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        batch = make_batch(data, indices, "box", processor, geometry, grid)
        digits = _batch_targets(batch, data, indices, geometry, grid)[len(indices):]
        colours = _colours(batch.pixel_values, processor, adapter)
        with torch.autocast(adapter.device.type, dtype=torch.bfloat16, enabled=bf16):
            digit_logits = head(adapter.encode_images(batch.roi_pixel_values.to(adapter.device)))[0]
            colour_logits = head(adapter.encode_images(batch.pixel_values.to(adapter.device)))[1]
        for name, logits, targets in (("glyph", digit_logits, digits), ("colour", colour_logits, colours)):
            positive = targets > 0
            counts[name][0] += int((logits.argmax(-1).cpu()[positive] == targets[positive]).sum())
            counts[name][1] += int(positive.sum())
    return {name: correct / max(total, 1) for name, (correct, total) in counts.items()}


def warm_start_vision(model, adapter, processor, train, val, options, progress: bool = True, log=print,
                      resume: dict | None = None, save=None) -> list[dict]:
    """Trains ``model``'s vision tower and projector in place; returns the history (loss, held-out
    glyph and colour accuracies).

    ``options`` is the :class:`~sdrpn.testbed.train_model.TrainModelOptions` (its ``vision_*``
    fields, seed, weight decay, growth and bf16). Each step draws ``vision_batch_size`` training
    questions and trains on their base views and their RoI views (ground-truth cells grown by up
    to ``max_grow`` per side, as the language model sees them). AdamW with 100 warmup steps, then
    cosine decay. Deterministic from the seed.

    Resumable: every ``options.save_every`` steps ``save`` (when given) receives the state dict
    that ``resume`` takes back, and a resumed run continues as if never interrupted.
    """
    from tqdm.auto import tqdm

    vision = nn.ModuleDict({"tower": model.model.vision_tower, "projector": model.model.multi_modal_projector})
    steps, seed = options.vision_steps, options.seed
    warmup = min(100, max(steps // 10, 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = TokenHead(model.config.get_text_config().hidden_size)
    parameters = [*vision.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=options.vision_lr, betas=(0.9, 0.98),
                                  weight_decay=options.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, steps))
    geometry, grid = adapter.geometry, adapter.image_grid
    start, history, running, elapsed = 0, [], [], 0.0
    if resume is not None:
        vision.load_state_dict(resume["vision"])
        head.load_state_dict(resume["head"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start, history, running, elapsed = resume["step"], resume["history"], resume["running"], resume["elapsed"]
    began = time.perf_counter()
    vision.train()
    for step in tqdm(range(start, steps), desc="vision warm start", unit="step", initial=start, total=steps,
                     disable=not progress):
        rng = np.random.default_rng([seed, 3, step])
        indices = batch_indices(step, options.vision_batch_size, len(train), seed + 1)
        batch = make_batch(train, indices, "box", processor, geometry, grid, rng, options.max_grow)
        digits = _batch_targets(batch, train, indices, geometry, grid)
        views = torch.cat([batch.pixel_values, batch.roi_pixel_values])
        colours = _colours(views, processor, adapter)
        with torch.autocast(adapter.device.type, dtype=torch.bfloat16, enabled=options.bf16):
            outputs = head(adapter.encode_images(views.to(adapter.device)))
        loss = _loss(outputs, digits.to(adapter.device), colours.to(adapter.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        done = step + 1
        if done % 250 == 0 or done == steps:
            vision.eval()
            accuracy = held_out_accuracy(model, head, adapter, val, processor, options.bf16)
            vision.train()
            history.append({"step": done, "loss": float(np.mean(running)), "val_glyph_accuracy": accuracy["glyph"],
                            "val_colour_accuracy": accuracy["colour"],
                            "elapsed_s": round(elapsed + time.perf_counter() - began, 1)})
            running = []
            log(f"vision step {done}: loss {history[-1]['loss']:.3f}, held-out glyph accuracy "
                f"{accuracy['glyph']:.3f}, colour accuracy {accuracy['colour']:.3f}")
        if save is not None and done % options.save_every == 0 and done < steps:
            save({"step": done, "vision": vision.state_dict(), "head": head.state_dict(),
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                  "running": running, "elapsed": elapsed + time.perf_counter() - began})
    return history
