"""Tiny random Qwen2.5-VL models built from the real transformers config, with real vision inputs.

The image processor is transformers' PIL Qwen2-VL image processor (smart resize, 14-pixel patches,
2 x 2 merge); prompts are token ids laid out as the Qwen processor lays them out
(``<|vision_start|> <|image_pad|> x n <|vision_end|>`` between text tokens), so no tokenizer file
and no torchvision are needed.

    model = tiny_qwen2_5_vl()
    inputs = qwen_inputs(images, texts)      # input_ids, attention_mask (left padded), mm_token_type_ids,
                                             # pixel_values, image_grid_thw
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["tiny_qwen2_5_vl", "qwen_inputs", "qwen_images", "forced_maps", "assert_same_logits", "IMAGE",
           "VISION_START", "VISION_END", "PAD", "EOS"]

PAD, BOS, EOS = 0, 1, 2
IMAGE, VIDEO, VISION_START, VISION_END = 110, 111, 112, 113
VOCAB = 120
LAYERS = 6


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def image_processor(max_tokens: int = 64):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=max_tokens * 28 * 28)


def qwen_images(sizes, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]


def qwen_inputs(images, texts, max_tokens: int = 64, processor=None) -> dict:
    """Processor-style inputs: per prompt ``[BOS] text[0] <vs> image <ve> text[1]``, left padded
    (``processor``: the image processor, by default :func:`image_processor` at ``max_tokens``)."""
    vision = (processor or image_processor(max_tokens))(images=images, return_tensors="pt")
    rows = []
    for grid, (before, after) in zip(vision["image_grid_thw"].tolist(), texts):
        tokens = int(np.prod(grid)) // 4
        rows.append([BOS, *before, VISION_START, *[IMAGE] * tokens, VISION_END, *after])
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row):] = torch.tensor(row)
        attention_mask[index, length - len(row):] = 1
    # The processor also marks the image tokens; the model's own positions need it.
    mm_token_type_ids = (input_ids == IMAGE).int()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids, **vision}


def forced_maps(inputs, boxes, threshold=0.25):
    """(B, H, W) RPN logits padded to the largest grid, row i's boxes (forced_logits) on its own grid."""
    from sdrpn.roi import forced_logits

    grids = (inputs["image_grid_thw"][:, 1:] // 2).tolist()
    height, width = max(g[0] for g in grids), max(g[1] for g in grids)
    maps = torch.full((len(grids), height, width), -20.0)
    for row, (grid, row_boxes) in enumerate(zip(grids, boxes)):
        maps[row, : grid[0], : grid[1]] = forced_logits([row_boxes], tuple(grid), threshold)[0]
    return maps


def assert_same_logits(ours, theirs):
    """Every step's logits equal where the second is finite (rows that ended hold NaN)."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-5, msg=f"step {step}")
