"""The oracle of ViCrop's relative attention: the model's own eager attention weights.

    expected = eager_relative_attention(model, question_inputs, generic_inputs, layer, image_token_id, grid)
"""

from __future__ import annotations

import torch

__all__ = ["eager_relative_attention"]


def eager_relative_attention(model, question: dict, generic: dict, layer: int, image_token_id: int,
                             grid: tuple[int, int]) -> torch.Tensor:
    """(rows, cols) ratio of the last token's attention to the image at ``layer``, mean over heads,
    for the question's processor outputs over the generic prompt's, from ``output_attentions``
    under eager attention (the model's implementation is restored afterwards)."""
    rows = []
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            for inputs in (question, generic):
                attentions = model(**inputs, output_attentions=True).attentions[layer]
                start = int((inputs["input_ids"][0] == image_token_id).nonzero()[0])
                rows.append(attentions[0, :, -1, start:start + grid[0] * grid[1]].mean(0))
    finally:
        model.set_attn_implementation(previous)
    return (rows[0] / (rows[1] + 1e-8)).view(grid)
