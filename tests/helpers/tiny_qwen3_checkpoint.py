"""A tiny random Qwen3-VL checkpoint written to disk as a real one is laid out: the model of
:func:`helpers.tiny_qwen3.tiny_qwen3_vl` (dense or MoE), the word-level tokenizer of
:mod:`helpers.tiny_qwen_checkpoint` (Qwen3-VL keeps Qwen2.5-VL's special tokens), Qwen3-VL's chat
template (no default system prompt) and ``preprocessor_config.json`` in the form Qwen3-VL's released
checkpoints ship it (``size`` in pixels, 16-pixel patches, mean = std = 0.5).

    directory = save_tiny_qwen3_checkpoint(tmp_path / "qwen3")
"""

from __future__ import annotations

from pathlib import Path

from helpers.tiny_qwen3 import CELL, tiny_qwen3_vl
from helpers.tiny_qwen_checkpoint import QWEN3_CHAT_TEMPLATE, write_qwen_checkpoint

__all__ = ["save_tiny_qwen3_checkpoint", "qwen3_preprocessor_config", "MIN_PIXELS", "MAX_PIXELS"]

# Small views keep the tiny model fast: 4 to 64 tokens (32 x 32 pixels each).
MIN_PIXELS, MAX_PIXELS = 4 * CELL * CELL, 64 * CELL * CELL


def qwen3_preprocessor_config(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> dict:
    """``preprocessor_config.json`` as Qwen3-VL's released checkpoints have it (their pixel budget,
    65536 to 16777216, replaced by a small one)."""
    return {
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
    }


def save_tiny_qwen3_checkpoint(directory, seed: int = 0, moe: bool = False, min_pixels: int = MIN_PIXELS,
                               max_pixels: int = MAX_PIXELS) -> Path:
    """Writes the tiny Qwen3-VL model, its tokenizer, chat template and image-processor config;
    returns the directory."""
    return write_qwen_checkpoint(directory, tiny_qwen3_vl(seed=seed, moe=moe), QWEN3_CHAT_TEMPLATE,
                                 qwen3_preprocessor_config(min_pixels, max_pixels))
