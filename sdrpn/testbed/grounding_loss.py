"""Auxiliary grounding loss of the tiny LLaVA's training: a few heads learn to look at the target.

A real LLaVA comes to self-distillation with heads that already ground the question's object in
the image: its CLIP tower and its training data (region captions, referring expressions) taught
them. The testbed model learns from scratch on one task, and its answer loss alone leaves every
head's attention spread over the image, so the loop's labels have nothing to distil (the record
in ``benchmarks/results/testbed``). This loss stands in for that pretraining: the answer rows of
the chosen heads are pushed towards the question's ground-truth cells in the base view.

The rows are those ``sdrpn label`` reads: each fed-back answer token as the query, over the base
view's image tokens. The loss is the mean of ``-log`` of the share of those rows' image attention
that falls in the cells of the question's box. Only the model's training sees the boxes;
``sdrpn label``, ``sdrpn heads`` and the RPN still see nothing but the model's own attention.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .batches import Batch, box_cells

__all__ = ["AttentionTap", "grounding_loss", "tap_attention"]

_EPSILON = 1e-6


class AttentionTap:
    """The attention probabilities ``(B, heads, S, S)`` of one layer's last forward."""

    weights: torch.Tensor | None = None


@contextlib.contextmanager
def tap_attention(model, layer: int) -> Iterator[AttentionTap]:
    """Keeps the attention probabilities of ``layer`` of the language model while the block runs.

    The model must run eager attention (the only kind that forms the probabilities).
    """
    if model.config.text_config._attn_implementation != "eager":
        raise ValueError("the grounding loss needs eager attention")
    tap = AttentionTap()

    def keep(module, args, output):
        tap.weights = output[1]

    handle = model.model.language_model.layers[layer].self_attn.register_forward_hook(keep)
    try:
        yield tap
    finally:
        handle.remove()


def grounding_loss(weights: torch.Tensor, batch: Batch, heads: tuple[int, ...], geometry, grid) -> torch.Tensor:
    """Mean ``-log`` share of the answer rows' base-view attention inside each question's box cells.

    Args:
        weights: ``(B, heads, S, S)`` attention probabilities of the sequences of
            :func:`sdrpn.testbed.train_model.answer_logits` for ``batch``.
        heads: the heads trained to ground.
        geometry, grid: the adapter's image geometry and token grid.
    """
    rows, cols = grid
    tokens = rows * cols
    losses = []
    for row, question in enumerate(batch.questions):
        image_start = question.prefix.shape[0]
        roi_tokens = 0 if batch.roi_keep is None else int(batch.roi_keep[row].sum())
        first_answer = image_start + tokens + roi_tokens + question.suffix.shape[0]
        queries = slice(first_answer, first_answer + question.answer.shape[0] - 1)  # the fed-back tokens
        attention = weights[row, list(heads), queries, image_start:image_start + tokens].float()
        x0, y0, x1, y1 = box_cells(question.box, question.image_size, geometry, grid)
        inside = torch.zeros(rows, cols, dtype=torch.bool, device=attention.device)
        inside[y0:y1, x0:x1] = True
        share = attention[..., inside.flatten()].sum(-1) / (attention.sum(-1) + _EPSILON)
        losses.append(-torch.log(share + _EPSILON).mean())
    return torch.stack(losses).mean()
