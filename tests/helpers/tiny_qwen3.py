"""Tiny random Qwen3-VL models (dense and MoE) built from the real transformers configs, with real
vision inputs.

Qwen3-VL's image processor is transformers' Qwen2-VL one (``AutoImageProcessor`` maps ``qwen3_vl``
to ``Qwen2VLImageProcessor``/``Qwen2VLImageProcessorPil``) with the checkpoints' settings: 16-pixel
patches, 2 x 2 merge (32-pixel cells), mean = std = 0.5. The PIL backend needs no torchvision.
Prompts are token ids laid out as the Qwen3-VL processor lays them out
(``<|vision_start|> <|image_pad|> x n <|vision_end|>``), so no tokenizer file is needed either.

    model = tiny_qwen3_vl()                  # moe=True: Qwen3VLMoeForConditionalGeneration
    inputs = qwen3_inputs(images, texts)     # input_ids, attention_mask (left padded), mm_token_type_ids,
                                             # pixel_values, image_grid_thw
"""

from __future__ import annotations

import torch

from helpers.tiny_qwen import BOS, EOS, IMAGE, PAD, VIDEO, VISION_END, VISION_START, VOCAB, qwen_images, qwen_inputs

__all__ = ["tiny_qwen3_vl", "qwen3_inputs", "qwen_images", "image_processor", "LAYERS", "DEEPSTACK_LAYERS", "CELL"]

LAYERS = 6
DEEPSTACK_LAYERS = 3  # deepstack maps from vision blocks 0, 1, 2, added after decoder layers 0, 1, 2
CELL = 32


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa", moe: bool = False):
    import transformers

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=DEEPSTACK_LAYERS, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=list(range(DEEPSTACK_LAYERS)))
    name = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, f"{name}Config")(
        text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    return model


def image_processor(max_tokens: int = 64):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # ``size`` rather than min_pixels/max_pixels: transformers 5.17 writes those into the class's own
    # default ``size`` dict, which every later processor would then share.
    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3,
                                    size={"shortest_edge": 4 * CELL * CELL, "longest_edge": max_tokens * CELL * CELL})


def qwen3_inputs(images, texts, max_tokens: int = 64) -> dict:
    """Processor-style inputs as :func:`helpers.tiny_qwen.qwen_inputs` makes them, with 32-pixel cells."""
    return qwen_inputs(images, texts, processor=image_processor(max_tokens))
