"""End-to-end throughput of two-stage SD-RPN against plain generation and the plain reference.

Usage::

    python benchmarks/bench_e2e.py --arch tiny --device cpu --batch 1 --new-tokens 8
    python benchmarks/bench_e2e.py --arch llava-1.5-7b --random-weights --device cuda --dtype bfloat16 \\
        --batch 1 --new-tokens 16 --rois box:0.25,masked:0.3,none --json results/e2e.json
    python benchmarks/bench_e2e.py --arch qwen2.5-vl-tiny --device cpu --rois box:0.25,masked:0.3,none
    python benchmarks/bench_e2e.py --arch qwen2.5-vl-7b --random-weights --device cuda --dtype bfloat16 ...
    python benchmarks/bench_e2e.py --arch qwen3-vl-tiny --device cpu --rois box:0.25,masked:0.3,none
    python benchmarks/bench_e2e.py ... --check-args   # validate the arguments, print the plan, exit

Models are built from real transformers configs with random weights. Two families share one bench
loop; each has its own model builder, prompt builder, vision-tower FLOP model and RoI rule:

* LLaVA-1.5 (``tiny``: a small LLaVA with LLaVA-1.5's 336-pixel view and 24 x 24 token grid;
  ``llava-1.5-7b``: the full architecture). Source images 640 x 480.
* Qwen2.5-VL (``qwen2.5-vl-tiny``: 8 decoder layers of width 256 and a 4-block windowed ViT, sized
  for CPU timings; ``qwen2.5-vl-7b``: Qwen2.5-VL-7B-Instruct's architecture, K = 16, T = 3 as the
  authors' 7B release). Source images 1000 x 750. Every view, the original and the RoI's, is
  encoded at a fixed budget of ``--image-tokens`` tokens (default 576: ``min_pixels = max_pixels
  = 576 * 28 * 28``): the original view is 20 x 27 = 540 tokens, about LLaVA-1.5's 576, and the
  RoI crop is zoomed to the full budget, which is the point of the method. (At the processor's
  default budget, ``min_pixels`` = 56 * 56, a crop of a 1000 x 750 image would be encoded at its
  native resolution, i.e. not zoomed at all.) At this budget the 7B (about 17 GB of bfloat16
  weights) has room for batch 8 on one GPU.
  SD-RPN on Qwen2.5-VL runs the engine's trimmed mode only (``SDRPN(sync_free=False)``): the
  processor sizes each RoI view by its crop, which is read on the host, so ``--modes sync-free``
  is refused. ``res-scaling`` and ``vicrop`` run on every family in the engine, but are measured
  here on LLaVA only (their FLOP model below is LLaVA's). Views above 1024 tokens would get the
  authors' pruning of original-view tokens in stage 2 (``RoIOptions.prune_above``), which the FLOP
  floor below does not model; the default budget stays below it.
* Qwen3-VL (``qwen3-vl-tiny``: the tiny Qwen2.5-VL's widths with Qwen3-VL's layers; ``qwen3-vl-4b``:
  Qwen3-VL-4B-Instruct's architecture, K = 21, T = 3 as sdrpn's preset for its 36 layers, none
  having been released). Everything above holds, with 32-pixel cells (16-pixel patches): the same
  576-token budget gives the same 20 x 27 view of the 1000 x 750 images. Its ViT has no windows
  (every block attends over the whole view) and three deepstack mergers, all counted in the floor;
  the deepstack features it adds to the image (and RoI) tokens' states in layers 0-2 are
  element-wise work and are not.

Prompts are synthetic token ids around the image tokens laid out as each family's processor lays
them out (LLaVA: 5 tokens, the image, the question; Qwen: the 14 tokens of Qwen2.5-VL's chat
template's system prompt and user header (Qwen3-VL's adds no system prompt: 3 tokens),
``<|vision_start|>``, the image, ``<|vision_end|>``, the question and the template's 5 closing
tokens), questions of different lengths per row (so batches are padded). No tokenizer file is needed.

With random weights the cost depends only on the shapes, so the RoI is forced; ``--rois`` lists
the RoI configurations, all measured in one run, every row of a batch getting the same RoI
(default ``box:0.25``: a random RPN proposes no RoI at all, and SD-RPN without one reads the
baseline's visual tokens):

* ``box:F``: a centred rectangle (the grid's aspect) covering the share F of the token grid. On
  LLaVA, box upscaling: every one of the H * W RoI slots holds a token of the crop view. Qwen2.5-VL
  has no box upscaling (the authors' rule is masked upscaling only, Qwen3-VL's too here): there
  ``box:F`` is one region under the masked rule, i.e. its crop is zoomed to the pixel budget and,
  the mask filling the crop, every token of the RoI view is kept (the JSON's ``upscaling`` says
  ``masked``).
* ``masked:F``: two rectangles in opposite corners of the grid, covering F of it together. Masked
  upscaling: about F of the RoI slots hold tokens (those under the rectangles). On Qwen2.5-VL the
  crop is the box around the whole mask, here the whole image, so the RoI view has the original's
  grid and about F of its tokens are kept.
* ``none``: no RoI; every RoI slot is empty.
* ``rpn``: the RPN's own maps decide (random maps, with random weights); a warning says when they
  proposed no RoI, which is what a random RPN does.

LLaVA's RoI filters drop components of more than 225 cells (the authors' ``max_area``), so the
largest ``box`` covers about 0.4 of the 24 x 24 grid: a larger one would be no RoI, and is refused.
Qwen2.5-VL's masked rule keeps the whole mask, filters or not, so no such limit applies there.

Methods: ``baseline`` (plain prefill + decode), ``sdrpn`` (two stages, KV reuse, everything between
the stages on the device), ``sdrpn-reference`` (the plain way: CPU post-processing, PIL crop, a
fresh stage-2 call that encodes both views and prefills everything, sample by sample),
``sdrpn-compiled`` (``compile=True``), ``res-scaling`` and ``vicrop`` (measured on LLaVA only). All methods
share the decode loop. ``sdrpn`` and ``sdrpn-compiled`` run in each engine mode of ``--modes``
(``SDRPN(sync_free=...)``): ``sync-free`` runs every RoI slot through every layer, masked, and
reads nothing back on the host (the default on GPUs); ``trimmed`` reads the RoI token counts once
and runs only the real RoI tokens (the default on the CPU, and the only mode of Qwen). The
methods that ignore the RoI (baseline, res-scaling, vicrop) are measured once. Every measured
function takes its turn in each repeat, so all ratios compare times of the same run.

``ideal_ratio`` is DESIGN section 3's floor: the baseline plus the extra work of the method, the
extra work costed at the baseline's measured prefill speed (seconds per FLOP):
``t_base / (t_base + t_prefill * extra_flops / prefill_flops)``. For SD-RPN the extra work is what
an ideal two-stage run adds to the baseline, row by row: T-1 RPN blocks over the prompt and the RPN
head; with a RoI, one vision pass over the RoI view (the family's vision tower at the view's grid:
CLIP at 24 x 24 for LLaVA, the Qwen ViT at the processor's grid), the new tokens
[RoI block | question] through layers 0..K-1 against the cached prefix and the whole sequence
through layers K..L-1 (instead of the prompt alone), and the decoding steps' attention over the
RoI tokens. ``of_floor`` is ``ratio_vs_baseline / ideal_ratio``: 1.0 when a method costs no more
than its extra FLOPs. Host work (the processor encoding Qwen's crop, PIL conversions) is not in
the floor: it is what keeps a method from it.

Prints a table of every measurement and, per RoI configuration, the engine modes side by side. CPU
timings are only meaningful on an idle machine: the load average is printed before and after the
run, with a warning when other processes keep the cores busy. On a busy machine, ``--threads 1
--clock process`` times each function by this process's CPU time, which leaves out the time other
processes take (two threads waiting on each other under such load run many times slower).
``--json FILE`` writes the run: its settings (``family``, the view's ``image_grid`` and
``image_tokens``, the engine modes available), ``methods`` (the rows that ignore the RoI) and
``configs`` (per RoI configuration: its boxes, upscaling, RoI tokens, RoI-view tokens, rows,
sdrpn against sdrpn-reference, whether their tokens agree and how far their logits are apart).
The fields are the same for every family. ``--json-key KEY`` adds the run to FILE's object of runs
under KEY instead, so that several runs share one file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sdrpn import RPN, SDRPN
from sdrpn.distill.heads import RPN_DEPTH_PRESETS
from sdrpn.engine.baselines import vicrop_layer
from sdrpn.roi import MODE_BOX, MODE_MASK, MODE_NONE, RoIOptions, forced_logits

PROMPT_PREFIX = 5  # LLaVA: "<s> USER :" style tokens before the image
QUESTION_LENGTHS = (18, 11, 25, 14, 21, 9, 16, 23)  # per row, cycled
SOURCE_SIZE = (640, 480)  # LLaVA's source images (width, height)
IMAGE_TOKENS = 576  # LLaVA's 24 x 24 grid
DEFAULT_ROIS = "box:0.25"
# A 1-minute load average above this share of the cores means other work competes for them.
BUSY_LOAD_SHARE = 0.5

METHODS = ("baseline", "sdrpn", "sdrpn-reference", "sdrpn-compiled", "res-scaling", "vicrop")
MODE_METHODS = ("sdrpn", "sdrpn-compiled")  # measured in each engine mode
ROI_METHODS = (*MODE_METHODS, "sdrpn-reference")  # measured in each RoI configuration
ENGINE_MODES = {"sync-free": True, "trimmed": False}  # SDRPN(sync_free=...)
UPSCALING = {MODE_NONE: "none", MODE_BOX: "box", MODE_MASK: "masked"}
# Fast path against the reference: the largest step-logit error relative to the row's largest
# logit that still counts as equal (float32: both compute the same sums in another order).
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-2}


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # a key of FAMILIES
    vision: dict
    text: dict
    start_layer: int  # K
    num_blocks: int  # T
    full_size: bool = False  # a real model's architecture: needs --random-weights
    tokens: dict = field(default_factory=dict)  # special token ids (Qwen)


# The special tokens of Qwen2.5-VL and Qwen3-VL (their tokenizer's ids); the tiny archs keep them in the
# same order at the top of their smaller vocabulary.
QWEN_TOKENS = {"pad_token_id": 151643, "bos_token_id": 151643, "eos_token_id": 151645,
               "vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
               "video_token_id": 151656}
QWEN_FIRST_SPECIAL = 151643  # <|endoftext|>: every id below it is an ordinary token
QWEN_TINY_VOCAB = 4096


def qwen_tiny_tokens(vocab: int) -> dict:
    base = vocab - 32
    return {name: base + value - QWEN_FIRST_SPECIAL for name, value in QWEN_TOKENS.items()}


ARCHS = {
    "tiny": Arch(
        "tiny", "llava",
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    image_size=336, patch_size=14, projection_dim=64),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024, max_position_embeddings=4096),
        start_layer=4, num_blocks=2,
    ),
    "llava-1.5-7b": Arch(
        "llava-1.5-7b", "llava",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        start_layer=15, num_blocks=3, full_size=True,
    ),
    # CPU-sized: large enough that the decoder's work, not Python, dominates a run.
    "qwen2.5-vl-tiny": Arch(
        "qwen2.5-vl-tiny", "qwen2_5_vl",
        vision=dict(depth=4, hidden_size=128, intermediate_size=344, num_heads=4, out_hidden_size=256,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[3]),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=QWEN_TINY_VOCAB, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0,
                  rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
        start_layer=4, num_blocks=2, tokens=qwen_tiny_tokens(QWEN_TINY_VOCAB),
    ),
    # Qwen2.5-VL-7B-Instruct's config.json; K = 16, T = 3 as the authors' 7B RPN.
    "qwen2.5-vl-7b": Arch(
        "qwen2.5-vl-7b", "qwen2_5_vl",
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                  rms_norm_eps=1e-6, rope_theta=1000000.0,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        start_layer=16, num_blocks=3, full_size=True, tokens=QWEN_TOKENS,
    ),
    # CPU-sized as qwen2.5-vl-tiny: Qwen3-VL's decoder (q/k norms, interleaved M-RoPE, heads wider than
    # hidden / heads as the 4B's) and its ViT (no windows, learned position embeddings, deepstack maps
    # after blocks 0-2, added after decoder layers 0-2).
    "qwen3-vl-tiny": Arch(
        "qwen3-vl-tiny", "qwen3_vl",
        vision=dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=256,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[0, 1, 2]),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=96, vocab_size=QWEN_TINY_VOCAB, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                      "mrope_section": [18, 15, 15], "mrope_interleaved": True}),
        start_layer=4, num_blocks=2, tokens=qwen_tiny_tokens(QWEN_TINY_VOCAB),
    ),
    # Qwen3-VL-4B-Instruct's config.json (transformers' Qwen3VLConfig defaults describe a larger model:
    # 32 layers of 4096, a 27-block ViT of 1152): 36 layers of 2560, 32 query heads of 128 (wider than
    # 2560 / 32), 8 KV heads; a 24-block ViT of 1024, deepstack after blocks 5, 11, 17. Its tied
    # embeddings are untied here, which changes no FLOP. K, T: sdrpn's preset for 36 layers.
    "qwen3-vl-4b": Arch(
        "qwen3-vl-4b", "qwen3_vl",
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh", in_channels=3),
        text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                      "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        start_layer=RPN_DEPTH_PRESETS["qwen3-vl-4b/8b"].start_layer,
        num_blocks=RPN_DEPTH_PRESETS["qwen3-vl-4b/8b"].num_blocks, full_size=True, tokens=QWEN_TOKENS,
    ),
}


@dataclass(frozen=True)
class View:
    """The source images and how the family encodes them: ``source_size`` (width, height) of every
    source image; ``image_tokens`` the pixel budget of a Qwen view in tokens (LLaVA: always 576)."""

    source_size: tuple[int, int]
    image_tokens: int


def synthetic_images(batch: int, size: tuple[int, int]) -> list:
    """Smooth random RGB images (gradients plus noise) of ``size`` (width, height)."""
    rng = np.random.default_rng(2)
    width, height = size
    images = []
    for _ in range(batch):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], axis=-1)
        images.append(Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)))
    return images


def left_padded(rows: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as (B, S) ids and attention mask, padded on the left."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row):] = row
        attention_mask[index, length - len(row):] = 1
    return input_ids, attention_mask


def random_words(generator, count: int, low: int, high: int) -> torch.Tensor:
    return torch.randint(low, high, (count,), generator=generator)


# ------------------------------------------------------------------------------------------------
# FLOP model (multiply-adds counted twice)
# ------------------------------------------------------------------------------------------------


def head_dim_of(config) -> int:
    """The attention heads' width: the config's own where it sets one (Qwen3-VL-4B: 128, not 2560 / 32)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llm_flops(config, tokens: int, context: int, layers: int) -> float:
    """``tokens`` new tokens through ``layers`` decoder layers after ``context`` cached tokens."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = head_dim_of(config)
    kv = config.num_key_value_heads
    linear = 2 * (d * heads * head_dim * 2 + 2 * d * kv * head_dim + 3 * d * config.intermediate_size)
    attention = 4 * heads * head_dim * (tokens * context + tokens * (tokens + 1) / 2)
    return layers * (tokens * linear + attention)


def rpn_head_flops(config, image_tokens: int) -> float:
    """The RPN's last block: q of the query token, k of the image tokens, the per-head scores."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim, kv = head_dim_of(config), config.num_key_value_heads
    return 2 * d * heads * head_dim + image_tokens * (2 * d * kv * head_dim + 2 * heads * head_dim)


def clip_vision_flops(config, tokens: int) -> float:
    """LLaVA: one view of ``tokens`` patch tokens (+ CLS) through the CLIP tower and the projector."""
    vision, text = config.vision_config, config.text_config
    d, n = vision.hidden_size, tokens + 1
    per_layer = n * 2 * (4 * d * d + 2 * d * vision.intermediate_size) + 4 * d * n * n
    patches = n * 2 * 3 * vision.patch_size**2 * d
    projector = tokens * 2 * (d * text.hidden_size + text.hidden_size**2)
    return vision.num_hidden_layers * per_layer + patches + projector


def qwen_vision_flops(vision, grid: tuple[int, int]) -> float:
    """Qwen2.5-VL: one view of ``grid`` (rows, cols) tokens through the windowed ViT and the merger.

    Each token is ``merge x merge`` patches of ``patch x patch`` pixels (times the temporal patch);
    blocks in ``fullatt_block_indexes`` attend over the whole view, the others within windows of
    ``window_size`` pixels (4 x 4 tokens for Qwen2.5-VL, cut at the grid's edges); the MLP is gated
    (gate, up, down); the merger is an MLP over 4 concatenated patches.
    """
    rows, cols = grid
    merge, d = vision.spatial_merge_size, vision.hidden_size
    patches = rows * cols * merge * merge
    linear = patches * 2 * (4 * d * d + 3 * d * vision.intermediate_size)
    side = max(1, vision.window_size // merge // vision.patch_size)  # window side in tokens
    windows = [min(side, rows - r) * min(side, cols - c) * merge * merge
               for r in range(0, rows, side) for c in range(0, cols, side)]
    full = len([i for i in vision.fullatt_block_indexes if i < vision.depth])
    attention = 4 * d * (full * patches**2 + (vision.depth - full) * sum(n * n for n in windows))
    return vision.depth * linear + attention + patch_embed_flops(vision, patches) + merger_flops(vision, rows * cols)


def qwen3_vision_flops(vision, grid: tuple[int, int]) -> float:
    """Qwen3-VL: one view of ``grid`` (rows, cols) tokens through the ViT, its merger and the
    deepstack mergers.

    Patch embedding and merger as Qwen2.5-VL's; no windows: every block attends over the whole
    view; the MLP is plain (fc1, fc2); each of ``deepstack_visual_indexes`` has a merger of the final
    one's shape. Interpolating the learned position embeddings is element-wise work, left out as norms are.
    """
    rows, cols = grid
    merge, d = vision.spatial_merge_size, vision.hidden_size
    patches = rows * cols * merge * merge
    block = patches * 2 * (4 * d * d + 2 * d * vision.intermediate_size) + 4 * d * patches**2
    mergers = (1 + len(vision.deepstack_visual_indexes)) * merger_flops(vision, rows * cols)
    return vision.depth * block + patch_embed_flops(vision, patches) + mergers


def patch_embed_flops(vision, patches: int) -> float:
    """A Qwen ViT's patch embedding: one (temporal x patch x patch x channels) -> hidden projection per patch."""
    return patches * 2 * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * vision.hidden_size


def merger_flops(vision, tokens: int) -> float:
    """A Qwen ViT's merger: an MLP over each token's ``merge x merge`` concatenated patches."""
    wide = vision.hidden_size * vision.spatial_merge_size**2
    return tokens * 2 * (wide * wide + wide * vision.out_hidden_size)


@dataclass(frozen=True)
class PromptShape:
    """One prompt row: ``prefix`` real tokens up to the last image token (E), ``question`` real tokens
    after it (Q), ``image_tokens`` and the ``image_grid`` of its view."""

    prefix: int
    question: int
    image_tokens: int
    image_grid: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.prefix + self.question


def sdrpn_extra_flops(family, config, arch: Arch, shape: PromptShape, roi_tokens: int, roi_grid, new_tokens: int,
                      wrappers: int) -> float:
    """What an ideal two-stage run adds to the baseline for one row (DESIGN section 3's floor).

    Stage 1 to layer K is the baseline's own work (reused); T-1 RPN blocks and the head are extra.
    With ``roi_tokens`` > 0: the RoI view (``roi_grid``) through the vision tower; the new tokens
    [RoI block (``wrappers`` framing tokens + the RoI tokens) | question] through layers 0..K-1
    after the cached prefix, and the whole sequence through K..L-1, in place of the prompt's
    layers K..L-1 (so the question runs through layers 0..K-1 twice: its stage-2 keys follow the
    RoI); each decoding step's attention over the RoI block. Without a RoI, stage 1's states simply
    continue from layer K. Qwen3-VL's deepstack additions to the RoI tokens are element-wise: not counted.
    """
    text = config.text_config
    layers, start = text.num_hidden_layers, arch.start_layer
    extra = llm_flops(text, shape.tokens, 0, arch.num_blocks - 1) + rpn_head_flops(text, shape.image_tokens)
    if roi_tokens <= 0:
        return extra
    block = wrappers + roi_tokens
    stage2 = (llm_flops(text, block + shape.question, shape.prefix, start)
              + llm_flops(text, shape.tokens + block, 0, layers - start))
    replaced = llm_flops(text, shape.tokens, 0, layers - start)  # stage 1's states at layer K are not continued
    heads_dim = text.num_attention_heads * head_dim_of(text)
    decoding = (new_tokens - 1) * layers * 4 * heads_dim * block
    return extra + family.vision_flops(config, roi_grid) + stage2 - replaced + decoding


# ------------------------------------------------------------------------------------------------
# Model families: model and processor, prompts, view grid, vision FLOPs, RoI views
# ------------------------------------------------------------------------------------------------


class Family:
    """What one model family brings to the shared bench loop."""

    name = ""
    label = ""
    methods: tuple = METHODS  # the methods it can measure
    default_methods = "baseline,sdrpn,sdrpn-reference"
    modes: tuple = tuple(ENGINE_MODES)  # the engine modes it runs, the first one for RoI-free methods
    modes_note = ""
    modes_reason = ""
    roi_wrappers = 0  # framing tokens around the RoI block in stage 2
    whole_mask = False  # its RoI rule keeps the box around the whole mask (no box upscaling, no area filter)
    source_size = SOURCE_SIZE
    image_tokens = IMAGE_TOKENS

    def view(self, source_size, image_tokens) -> View:
        return View(tuple(source_size or self.source_size), image_tokens or self.image_tokens)

    def image_grid(self, arch: Arch, view: View) -> tuple[int, int]:
        raise NotImplementedError

    def build_model(self, arch: Arch, view: View, device, dtype, attn_implementation: str):
        """A random-weight model of ``arch`` and the processor the engine gets."""
        raise NotImplementedError

    def build_inputs(self, model, processor, batch: int, view: View, device) -> tuple[dict, list]:
        """Synthetic prompts (left padded) and the processor's vision outputs for ``batch`` rows, and
        the source images."""
        raise NotImplementedError

    def vision_flops(self, config, grid: tuple[int, int]) -> float:
        raise NotImplementedError

    def roi_view_grids(self, bench, modes: list[int], crops: list) -> list:
        """Per row, the token grid of its RoI view (None without one)."""
        raise NotImplementedError


class LlavaFamily(Family):
    name, label = "llava", "LLaVA-1.5"
    default_methods = "baseline,sdrpn,sdrpn-reference,res-scaling,vicrop"
    modes_note = "sync-free and trimmed"

    def view(self, source_size, image_tokens) -> View:
        if image_tokens not in (None, IMAGE_TOKENS):
            raise ValueError(f"--image-tokens sets a Qwen view's pixel budget; {self.label}'s view is fixed "
                             f"(336 pixels, 24 x 24 = {IMAGE_TOKENS} tokens)")
        return super().view(source_size, None)

    def image_grid(self, arch: Arch, view: View) -> tuple[int, int]:
        side = arch.vision["image_size"] // arch.vision["patch_size"]
        return side, side

    def build_model(self, arch: Arch, view: View, device, dtype, attn_implementation: str):
        from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                                  LlavaImageProcessorPil)

        vocab = arch.text["vocab_size"]
        text = LlamaConfig(**arch.text, bos_token_id=1, eos_token_id=2, pad_token_id=vocab - 1)
        config = LlavaConfig(vision_config=CLIPVisionConfig(**arch.vision), text_config=text,
                             image_token_id=vocab - 2, image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
        model.generation_config.pad_token_id = text.pad_token_id
        model.generation_config.eos_token_id = None  # random weights: always generate --new-tokens tokens
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": 336},
                                                 crop_size={"height": 336, "width": 336})
        return model, synthetic_processor(config, image_processor)

    def build_inputs(self, model, processor, batch: int, view: View, device) -> tuple[dict, list]:
        text = model.config.text_config
        generator = torch.Generator().manual_seed(1)
        rows = []
        for row in range(batch):
            question = QUESTION_LENGTHS[row % len(QUESTION_LENGTHS)]
            words = random_words(generator, PROMPT_PREFIX + question, 3, text.vocab_size - 2)
            image = torch.full((IMAGE_TOKENS,), model.config.image_token_id)
            rows.append(torch.cat([words[:PROMPT_PREFIX], image, words[PROMPT_PREFIX:]]))
        input_ids, attention_mask = left_padded(rows, text.pad_token_id)
        images = synthetic_images(batch, view.source_size)
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "pixel_values": pixel_values.to(device=device, dtype=model.dtype)}, images

    def vision_flops(self, config, grid: tuple[int, int]) -> float:
        return clip_vision_flops(config, grid[0] * grid[1])

    def roi_view_grids(self, bench, modes: list[int], crops: list) -> list:
        return [bench.grid if mode != MODE_NONE else None for mode in modes]  # the crop, resized to the view


def synthetic_processor(config, image_processor):
    """A ``LlavaProcessor`` whose word-level tokenizer maps "t<i>" to id i (only token counts matter
    with random weights; ViCrop tokenizes its generic prompt with it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    text = config.text_config
    special = {"<unk>": 0, "<image>": config.image_token_id, "<pad>": text.pad_token_id}
    vocab = {f"t{i}": i for i in range(text.vocab_size) if i not in special.values()}
    vocab.update(special)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


# Qwen2.5-VL's chat template around one image and a question: "<|im_start|>system\nYou are a
# helpful assistant.<|im_end|>\n<|im_start|>user\n" (14 tokens), then <|vision_start|> image
# <|vision_end|>, the question, and "<|im_end|>\n<|im_start|>assistant\n" (5 tokens).
QWEN_PROMPT_PREFIX, QWEN_PROMPT_SUFFIX = 14, 5
QWEN3_PROMPT_PREFIX = 3  # Qwen3-VL's template adds no system prompt: "<|im_start|>user\n"
QWEN_SOURCE_SIZE = (1000, 750)
QWEN_IMAGE_TOKENS = 576  # min_pixels = max_pixels = 576 cells (28 x 28 pixels Qwen2.5-VL, 32 x 32 Qwen3-VL)


def qwen_image_processor(image_tokens: int, patch_size: int, merge_size: int):
    """transformers' PIL Qwen2-VL image processor (Qwen3-VL's too) at a fixed budget of ``image_tokens``
    tokens of ``patch_size * merge_size`` pixels a side (its mean and std do not matter to timings)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor
    except ImportError:  # a transformers without the PIL backend module
        from transformers import Qwen2VLImageProcessor as Processor
    budget = image_tokens * (patch_size * merge_size) ** 2
    # ``size``, not min/max_pixels: transformers 5.17 would write those into the class's shared default.
    return Processor(patch_size=patch_size, merge_size=merge_size,
                     size={"shortest_edge": budget, "longest_edge": budget})


class QwenFamily(Family):
    name, label = "qwen2_5_vl", "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")
    prompt_prefix = QWEN_PROMPT_PREFIX
    methods = ("baseline", "sdrpn", "sdrpn-reference", "sdrpn-compiled")
    modes = ("trimmed",)
    modes_reason = ("the processor sizes each RoI view by its crop, which is read on the host, so "
                    "SDRPN(sync_free=True) is refused")
    modes_note = f"trimmed only: {modes_reason}"
    roi_wrappers = 2  # <|vision_start|> RoI <|vision_end|>
    whole_mask = True  # the authors' Qwen rule: masked upscaling of the box around the whole mask
    source_size = QWEN_SOURCE_SIZE
    image_tokens = QWEN_IMAGE_TOKENS

    @staticmethod
    def cell(arch: Arch) -> int:
        return arch.vision["patch_size"] * arch.vision["spatial_merge_size"]

    def image_grid(self, arch: Arch, view: View) -> tuple[int, int]:
        from sdrpn.models.qwen_geometry import QwenViewGeometry

        cell = self.cell(arch)
        budget = view.image_tokens * cell * cell
        return QwenViewGeometry(cell=cell, min_pixels=budget, max_pixels=budget).grid(view.source_size)

    def build_model(self, arch: Arch, view: View, device, dtype, attn_implementation: str):
        import transformers

        config_class, model_class = (getattr(transformers, name) for name in self.model_classes)
        tokens = arch.tokens
        ids = {name: tokens[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = config_class(
            text_config={**arch.text, **ids}, vision_config=dict(arch.vision),
            image_token_id=tokens["image_token_id"], video_token_id=tokens["video_token_id"],
            vision_start_token_id=tokens["vision_start_token_id"], vision_end_token_id=tokens["vision_end_token_id"],
            **ids,
        )
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class._from_config(config, dtype=dtype).eval()
        model.generation_config.pad_token_id = tokens["pad_token_id"]
        model.generation_config.eos_token_id = None  # random weights: always generate --new-tokens tokens
        return model, qwen_image_processor(view.image_tokens, arch.vision["patch_size"],
                                           arch.vision["spatial_merge_size"])

    def build_inputs(self, model, processor, batch: int, view: View, device) -> tuple[dict, list]:
        config = model.config
        images = synthetic_images(batch, view.source_size)
        vision = processor(images=images, return_tensors="pt")
        merge = config.vision_config.spatial_merge_size
        ordinary = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                       config.vision_end_token_id, model.generation_config.pad_token_id)
        generator = torch.Generator().manual_seed(1)
        rows = []
        for row, grid in enumerate(vision["image_grid_thw"].tolist()):
            question = QUESTION_LENGTHS[row % len(QUESTION_LENGTHS)]
            prefix = self.prompt_prefix
            words = random_words(generator, prefix + question + QWEN_PROMPT_SUFFIX, 0, ordinary)
            image = torch.full((math.prod(grid) // merge**2,), config.image_token_id)
            rows.append(torch.cat([words[:prefix], torch.tensor([config.vision_start_token_id]), image,
                                   torch.tensor([config.vision_end_token_id]), words[prefix:]]))
        input_ids, attention_mask = left_padded(rows, model.generation_config.pad_token_id)
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "mm_token_type_ids": (input_ids == config.image_token_id).int().to(device),
                "pixel_values": vision["pixel_values"].to(device=device, dtype=model.dtype),
                "image_grid_thw": vision["image_grid_thw"].to(device)}, images

    def vision_flops(self, config, grid: tuple[int, int]) -> float:
        return qwen_vision_flops(config.vision_config, grid)

    def roi_view_grids(self, bench, modes: list[int], crops: list) -> list:
        """The processor encodes each crop at its budget: its grid, as the engine gets it."""
        grids = [None] * len(modes)
        rows = [row for row, mode in enumerate(modes) if mode != MODE_NONE]
        if rows:
            pictures = [bench.images[row].convert("RGB").crop(tuple(crops[row])) for row in rows]
            thw = bench.processor(images=pictures, return_tensors="pt")["image_grid_thw"].tolist()
            merge = bench.model.config.vision_config.spatial_merge_size
            for row, (_, height, width) in zip(rows, thw):
                grids[row] = (height // merge, width // merge)
        return grids


class Qwen3Family(QwenFamily):
    """Qwen2.5-VL's bench with Qwen3-VL's model, prompt and ViT (no windows, deepstack mergers)."""

    name, label = "qwen3_vl", "Qwen3-VL"
    model_classes = ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")
    prompt_prefix = QWEN3_PROMPT_PREFIX

    def vision_flops(self, config, grid: tuple[int, int]) -> float:
        return qwen3_vision_flops(config.vision_config, grid)


FAMILIES = {family.name: family for family in (LlavaFamily(), QwenFamily(), Qwen3Family())}


def family_of(arch: Arch | str) -> Family:
    return FAMILIES[(ARCHS[arch] if isinstance(arch, str) else arch).family]


# ------------------------------------------------------------------------------------------------
# RoI configurations and the measurement plan
# ------------------------------------------------------------------------------------------------


def grid_of(arch: Arch, view: View | None = None) -> tuple[int, int]:
    """The token grid of ``arch``'s view of the source images (its family's defaults without ``view``)."""
    family = family_of(arch)
    return family.image_grid(arch, view or family.view(None, None))


@dataclass(frozen=True)
class RoIConfig:
    """The RoI every row gets: ``boxes`` ``[x0, y0, x1, y1)`` on the token grid (empty: no RoI), or
    None: the RPN's own maps."""

    name: str
    boxes: tuple | None

    def logits(self, batch: int, grid, threshold: float, device) -> torch.Tensor | None:
        if self.boxes is None:
            return None
        return forced_logits([list(self.boxes)] * batch, grid, threshold, device=device)


def rectangle_sides(share: float, grid) -> tuple[int, int]:
    """(height, width) of a rectangle of the grid's aspect covering ``share`` of it, at least 2 x 2."""
    scale = math.sqrt(share)
    return max(2, round(scale * grid[0])), max(2, round(scale * grid[1]))


def centred_square(fraction: float, grid) -> tuple:
    """One box covering ``fraction`` of the grid in its centre (a square on a square grid)."""
    height, width = rectangle_sides(fraction, grid)
    x0, y0 = (grid[1] - width) // 2, (grid[0] - height) // 2
    return ((x0, y0, x0 + width, y0 + height),)


def opposite_squares(fraction: float, grid) -> tuple:
    """Two boxes covering ``fraction`` of the grid together, in its top-left and bottom-right
    corners (squares on a square grid): two components, so the engine upscales them masked."""
    height, width = rectangle_sides(fraction / 2, grid)
    if 2 * height >= grid[0] or 2 * width >= grid[1]:  # they would touch (or overlap) and make one component
        largest = 2 * ((grid[0] - 1) // 2) * ((grid[1] - 1) // 2) / (grid[0] * grid[1])
        raise ValueError(f"two squares covering {fraction} of the grid touch; use at most {largest:.2f}")
    rows, cols = grid
    return ((0, 0, width, height), (cols - width, rows - height, cols, rows))


def roi_config(spec: str, grid, whole_mask: bool = False) -> RoIConfig:
    """``box:F``, ``masked:F``, ``none`` or ``rpn`` (see the module's docstring); ValueError says
    what is wrong with ``spec``. ``whole_mask``: the family's rule upscales the box around the whole
    mask (Qwen2.5-VL), so ``box:F`` is one region under that rule and the area filters do not apply."""
    kind, _, value = spec.partition(":")
    if kind in ("none", "rpn") and not value:
        return RoIConfig(spec, () if kind == "none" else None)
    if kind not in ("box", "masked"):
        raise ValueError(f"unknown RoI {spec!r}; use box:F, masked:F, none or rpn")
    try:
        fraction = float(value)
    except ValueError:
        raise ValueError(f"RoI {spec!r}: F must be a number in (0, 1]") from None
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"RoI {spec!r}: F must be in (0, 1]")
    try:
        boxes = centred_square(fraction, grid) if kind == "box" else opposite_squares(fraction, grid)
    except ValueError as error:
        raise ValueError(f"RoI {spec!r}: {error}") from None
    max_area = RoIOptions().max_area
    if not whole_mask and any((x1 - x0) * (y1 - y0) > max_area for x0, y0, x1, y1 in boxes):
        raise ValueError(f"RoI {spec!r}: the RoI filters drop components of more than {max_area} cells, "
                         "so this would be no RoI; use a smaller F, or none")
    return RoIConfig(spec, boxes)


@dataclass(frozen=True)
class Row:
    """One measured function: a method, in an engine mode, for a RoI configuration (None: the
    method ignores the RoI)."""

    method: str
    config: RoIConfig | None = None
    mode: str | None = None

    @property
    def label(self) -> str:
        return f"{self.method}/{self.mode}" if self.mode else self.method


def plan(methods: list[str], modes: list[str], configs: list[RoIConfig]) -> list[Row]:
    """The rows of a run: the baseline first, then the RoI-free methods, then per configuration
    each RoI method, in each engine mode where it has modes."""
    rows = [Row(method) for method in methods if method not in ROI_METHODS]  # the baseline comes first
    for config in configs:
        for method in methods:
            if method in MODE_METHODS:
                rows += [Row(method, config, mode) for mode in modes]
            elif method in ROI_METHODS:
                rows.append(Row(method, config))
    return rows


# ------------------------------------------------------------------------------------------------
# Running and timing
# ------------------------------------------------------------------------------------------------


def prompt_shapes(inputs: dict, image_token_id: int, grids: list) -> list[PromptShape]:
    """Each row's prefix (to its last image token) and question, in real tokens."""
    shapes = []
    for ids, mask, grid in zip(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool(), grids):
        tokens = ids[mask]
        image = (tokens == image_token_id).nonzero().flatten()
        end = int(image[-1]) + 1
        shapes.append(PromptShape(prefix=end, question=len(tokens) - end, image_tokens=int(image.numel()),
                                  image_grid=tuple(grid)))
    return shapes


class Bench:
    """The model, its inputs, one engine per (compiled, mode) and the forced RPN maps of each RoI
    configuration, the engines and maps made on first use."""

    def __init__(self, arch: Arch, batch: int, device, dtype, attn_implementation: str, view: View | None = None):
        self.arch, self.family = arch, family_of(arch)
        self.view = view or self.family.view(None, None)
        self.model, self.processor = self.family.build_model(arch, self.view, device, dtype, attn_implementation)
        self.inputs, self.images = self.family.build_inputs(self.model, self.processor, batch, self.view, device)
        self.rpn = RPN.from_model(self.model, arch.start_layer, arch.num_blocks)
        self.grid, self.batch, self.device = self.family.image_grid(arch, self.view), batch, device
        self.shapes = prompt_shapes(self.inputs, self.model.config.image_token_id, [self.grid] * batch)
        if any(shape.image_tokens != self.grid[0] * self.grid[1] for shape in self.shapes):
            raise RuntimeError(f"the processor's views do not have the expected {self.grid} grid")
        self.engines, self.roi_logits, self.roi_plans = {}, {}, {}

    def engine(self, row: Row) -> SDRPN:
        key = (row.method == "sdrpn-compiled", row.mode or self.family.modes[0])
        if key not in self.engines:
            self.engines[key] = SDRPN(self.model, self.rpn, self.processor, compile=key[0],
                                      sync_free=ENGINE_MODES[key[1]])
        return self.engines[key]

    def forced_logits(self, config: RoIConfig | None, threshold: float) -> torch.Tensor | None:
        """The RPN maps ``config`` forces, for an engine of RoI ``threshold``."""
        if config is None:
            return None
        key = (config.name, threshold)
        if key not in self.roi_logits:
            self.roi_logits[key] = config.logits(self.batch, self.grid, threshold, self.device)
        return self.roi_logits[key]

    def generate(self, row: Row, new_tokens: int, return_roi: bool = False, output_logits: bool = False):
        engine = self.engine(row)
        method = "sdrpn" if row.method == "sdrpn-compiled" else row.method
        roi_logits = self.forced_logits(row.config, engine.options.threshold)
        return engine.generate(**self.inputs, images=self.images, method=method, max_new_tokens=new_tokens,
                               roi_logits=roi_logits, return_roi=return_roi, output_logits=output_logits)

    def roi_plan(self, config: RoIConfig) -> tuple[list[int], list]:
        """Per row, the upscaling mode the engine picks for ``config`` and the token grid of the RoI
        view it encodes (None without one); stage 1 run once, outside the timings."""
        if config.name not in self.roi_plans:
            engine = self.engine(Row("sdrpn", config, self.family.modes[-1]))
            prediction = engine.predict_roi(**self.inputs, images=self.images,
                                            roi_logits=self.forced_logits(config, engine.options.threshold))
            modes = prediction.proposal.mode.tolist()
            crops = prediction.crops.tolist()
            self.roi_plans[config.name] = modes, self.family.roi_view_grids(self, modes, crops)
        return self.roi_plans[config.name]


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def timed(functions: dict, device, repeats: int, warmup: int, clock: str = "wall") -> dict:
    """Median time in milliseconds of each function (CUDA synchronised): wall time, or with
    ``clock="process"`` this process's CPU time (one CPU thread: the time the machine's other work
    takes from it is left out). The functions take turns within each repeat, so that a machine
    whose load drifts slows them all alike."""
    now = CLOCKS[clock]
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = now()
            function()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((now() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def first_outputs(bench: Bench, rows: list[Row], new_tokens: int) -> dict:
    """Each row's output (sequences, RoI, visual tokens, every step's logits on the host); a method
    that cannot run here is left out."""
    outputs = {}
    for row in rows:
        try:
            output = bench.generate(row, new_tokens, return_roi=True, output_logits=True)
        except ValueError as error:
            print(f"skipping {row.label}: {error}", file=sys.stderr)
            continue
        output.logits = [step.float().cpu() for step in output.logits]
        outputs[row] = output
    return outputs


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def row_records(latencies: dict, outputs: dict, batch: int, floor) -> dict:
    """Per row: latency, throughput, visual tokens, ratio to the baseline, the work it adds, its
    floor, and how close it comes to the floor. ``floor(row)`` gives the row's extra FLOPs and
    ideal ratio."""
    records = {row: {"latency_ms": latency, "throughput_samples_s": batch / latency * 1000,
                     "visual_tokens": float(outputs[row].visual_tokens.float().mean())}
               for row, latency in latencies.items()}
    base = records[Row("baseline")]
    for row, record in records.items():
        record["ratio_vs_baseline"] = record["throughput_samples_s"] / base["throughput_samples_s"]
        record["extra_flops"], record["ideal_ratio"] = floor(row)
        record["of_floor"] = record["ratio_vs_baseline"] / record["ideal_ratio"]
    return records


def same_tokens(outputs: dict, row: Row, other: Row) -> bool | None:
    if row not in outputs or other not in outputs:
        return None
    return bool(torch.equal(outputs[row].sequences.cpu(), outputs[other].sequences.cpu()))


def logits_error(outputs: dict, row: Row, other: Row) -> float | None:
    """The largest difference of two rows' step logits, relative to the largest logit of the
    sample and step (``other`` is the reference; its ended rows hold NaN and are left out)."""
    if row not in outputs or other not in outputs:
        return None
    error = 0.0
    for ours, theirs in zip(outputs[row].logits, outputs[other].logits):
        kept = ~torch.isnan(theirs).any(dim=1)
        scale = theirs[kept].abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        if kept.any():
            error = max(error, float(((ours[kept] - theirs[kept]).abs() / scale).max()))
    return error


def config_record(config: RoIConfig, rows: list[Row], records: dict, outputs: dict, image_tokens: float,
                  roi_plan: tuple[list[int], list], tolerance: float) -> dict:
    """One RoI configuration: its rows, upscaling, RoI tokens, each mode against sdrpn-reference."""
    mine = [row for row in rows if row.config == config and row in records]
    reference = Row("sdrpn-reference", config)
    moded = [row for row in mine if row.mode]
    vs_reference = {row.label: records[row]["throughput_samples_s"] / records[reference]["throughput_samples_s"]
                    for row in moded if reference in records}
    errors = {row.label: logits_error(outputs, row, reference) for row in moded}
    equivalence = {}
    for row in moded:
        equivalence[f"{row.label}_vs_reference_tokens_equal"] = same_tokens(outputs, row, reference)
        error = errors[row.label]
        equivalence[f"{row.label}_vs_reference_logits_close"] = None if error is None else error <= tolerance
    modes, view_grids = roi_plan
    return {"boxes": None if config.boxes is None else [list(box) for box in config.boxes],
            "upscaling": ",".join(sorted({UPSCALING[mode] for mode in modes})),
            "roi_view_tokens": statistics.mean(0 if grid is None else grid[0] * grid[1] for grid in view_grids),
            "roi_tokens": records[mine[0]]["visual_tokens"] - image_tokens if mine else None,
            "methods": {row.label: records[row] for row in mine},
            "throughput_vs_reference": vs_reference, "equivalence": equivalence,
            "logits_max_rel_error": errors}


def print_rows(records: dict) -> None:
    print(f"{'RoI':<14}{'method':<26}{'latency ms':>11}{'samples/s':>11}{'vs base':>9}{'floor':>8}"
          f"{'of floor':>10}{'visual tok':>12}")
    for row, values in records.items():
        print(f"{row.config.name if row.config else '-':<14}{row.label:<26}{values['latency_ms']:>11.2f}"
              f"{values['throughput_samples_s']:>11.2f}{values['ratio_vs_baseline']:>9.3f}"
              f"{values['ideal_ratio']:>8.3f}{values['of_floor']:>10.3f}{values['visual_tokens']:>12.1f}")


def print_configs(configs: dict) -> None:
    """Per RoI configuration: the upscaling the engine chose and the RoI's size."""
    for name, config in configs.items():
        roi = "-" if config["roi_tokens"] is None else f"{config['roi_tokens']:.1f}"
        print(f"RoI {name}: {config['upscaling']} upscaling, {roi} RoI tokens kept of a "
              f"{config['roi_view_tokens']:.1f}-token RoI view")


def print_modes(method: str, configs: dict) -> None:
    """The engine modes of ``method`` side by side: throughput against the baseline and against
    sdrpn-reference, per RoI configuration."""
    sync_free, trimmed = f"{method}/sync-free", f"{method}/trimmed"
    print(f"{method}, sync-free against trimmed (throughput vs baseline; vs sdrpn-reference):")
    print(f"{'RoI':<14}{'RoI tok':>9}{'floor':>8}{'sync-free':>11}{'trimmed':>9}{'trim/sf':>9}"
          f"{'sf/ref':>8}{'trim/ref':>10}")
    for name, config in configs.items():
        rows = config["methods"]
        if sync_free not in rows or trimmed not in rows:
            continue
        sf, tr = rows[sync_free]["ratio_vs_baseline"], rows[trimmed]["ratio_vs_baseline"]
        vs_reference = config["throughput_vs_reference"]
        versus = [f"{vs_reference[label]:.2f}x" if label in vs_reference else "-" for label in (sync_free, trimmed)]
        print(f"{name:<14}{config['roi_tokens']:>9.1f}{rows[trimmed]['ideal_ratio']:>8.3f}{sf:>11.3f}{tr:>9.3f}"
              f"{tr / sf:>8.2f}x{versus[0]:>8}{versus[1]:>10}")


def extra_flops(bench: Bench, row: Row, output, new_tokens: int) -> float:
    """The work ``row``'s method adds to the baseline, summed over the batch (DESIGN section 3)."""
    family, config, arch = bench.family, bench.model.config, bench.arch
    text = config.text_config
    if row.method.startswith("sdrpn"):
        _, view_grids = bench.roi_plan(row.config) if row.config is not None else ([], [None] * bench.batch)
        roi_tokens = [int(visual) - shape.image_tokens
                      for visual, shape in zip(output.visual_tokens.cpu().tolist(), bench.shapes)]
        return sum(sdrpn_extra_flops(family, config, arch, shape, tokens, grid, new_tokens, family.roi_wrappers)
                   for shape, tokens, grid in zip(bench.shapes, roi_tokens, view_grids))
    total = 0.0
    for shape in bench.shapes:  # LLaVA's peers
        prompt = shape.tokens
        if row.method == "res-scaling":
            total += (clip_vision_flops(config, 4 * IMAGE_TOKENS) - clip_vision_flops(config, IMAGE_TOKENS)
                      + llm_flops(text, 3 * IMAGE_TOKENS, prompt, text.num_hidden_layers))
        elif row.method == "vicrop":  # two passes to its attention layer + the crop as a second image
            layers = vicrop_layer(text.num_hidden_layers) + 1
            total += (2 * llm_flops(text, prompt, 0, layers) + clip_vision_flops(config, IMAGE_TOKENS)
                      + llm_flops(text, IMAGE_TOKENS, prompt, text.num_hidden_layers))
    return total


def prefill_flops(bench: Bench) -> float:
    """The baseline's prefill, summed over the batch: each view through the vision tower, each
    prompt through every decoder layer."""
    config = bench.model.config
    text = config.text_config
    return sum(bench.family.vision_flops(config, shape.image_grid)
               + llm_flops(text, shape.tokens, 0, text.num_hidden_layers) for shape in bench.shapes)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def image_size(value: str) -> tuple[int, int]:
    width, _, height = value.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not WIDTHxHEIGHT, e.g. 1000x750") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: width and height must be positive")
    return size


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, validated: methods, modes and RoI configurations come back as lists, the
    view as ``args.view``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=list(ARCHS), default="tiny")
    parser.add_argument("--random-weights", action="store_true",
                        help="use random weights (the only option: no checkpoint is loaded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, of: {', '.join(METHODS)} (default: LLaVA "
                             f"{FAMILIES['llava'].default_methods}; "
                             f"Qwen {FAMILIES['qwen2_5_vl'].default_methods})")
    parser.add_argument("--modes", default=None,
                        help=f"engine modes of sdrpn and sdrpn-compiled, comma-separated: "
                             f"{', '.join(ENGINE_MODES)} (default: every mode the family runs; Qwen runs "
                             "trimmed only)")
    parser.add_argument("--rois", default=DEFAULT_ROIS,
                        help=f"RoI configurations, comma-separated: box:F, masked:F, none, rpn (default {DEFAULT_ROIS}: "
                             "with random weights the RPN proposes no RoI, so one is forced)")
    parser.add_argument("--source-size", type=image_size, default=None, metavar="WxH",
                        help=f"source image size (default: LLaVA {'x'.join(map(str, SOURCE_SIZE))}, "
                             f"Qwen {'x'.join(map(str, QWEN_SOURCE_SIZE))})")
    parser.add_argument("--image-tokens", type=int, default=None, metavar="N",
                        help=f"Qwen only: every view's pixel budget in tokens, min_pixels = max_pixels = N "
                             f"cells (28 x 28 pixels Qwen2.5-VL, 32 x 32 Qwen3-VL) (default {QWEN_IMAGE_TOKENS})")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="wall time (default), or the process's CPU time: CPU only, with --threads 1, "
                             "steadier than wall time on a machine other work keeps busy")
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--json-key", default=None, metavar="KEY",
                        help="add the run to --json's object of runs under KEY, keeping its other runs (several "
                             "runs in one file)")
    parser.add_argument("--check-args", action="store_true", help="validate the arguments, print the plan and exit")
    args = parser.parse_args(argv)
    arch = ARCHS[args.arch]
    family = family_of(arch)
    if args.json_key is not None and args.json is None:
        parser.error("--json-key needs --json")
    if arch.full_size and not args.random_weights:
        parser.error(f"--arch {args.arch} needs --random-weights (no checkpoint can be loaded here)")
    for name in ("batch", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.clock == "process" and (args.threads != 1 or not args.device.startswith("cpu")):
        parser.error("--clock process measures one CPU thread's time: use it with --device cpu --threads 1")
    if args.image_tokens is not None and args.image_tokens < 4:
        parser.error("--image-tokens must be at least 4 (a 2 x 2-token view)")
    args.methods = ["baseline", *(m for m in names(args.methods or family.default_methods) if m != "baseline")]
    args.modes = names(args.modes) if args.modes is not None else list(family.modes)
    for flag, given, known in (("--methods", args.methods, METHODS), ("--modes", args.modes, ENGINE_MODES)):
        unknown = [name for name in given if name not in known]
        if unknown or not given:
            parser.error(f"{flag}: unknown or none: {', '.join(unknown)}; choose from {', '.join(known)}")
    foreign = [method for method in args.methods if method not in family.methods]
    if foreign:
        parser.error(f"--methods {','.join(foreign)}: measured on LLaVA only (their FLOP floor here is LLaVA's); "
                     f"{args.arch} measures {', '.join(family.methods)}")
    unsupported = [mode for mode in args.modes if mode not in family.modes]
    if unsupported:
        parser.error(f"--modes {','.join(unsupported)}: {args.arch} runs SD-RPN in the engine's "
                     f"{' and '.join(family.modes)} mode only ({family.modes_reason}); "
                     f"use --modes {','.join(family.modes)}")
    try:
        args.view = family.view(args.source_size, args.image_tokens)
        args.grid = family.image_grid(arch, args.view)
    except ValueError as error:
        parser.error(str(error))
    try:
        args.rois = [roi_config(spec, args.grid, family.whole_mask) for spec in names(args.rois)]
    except ValueError as error:
        parser.error(str(error))
    if not args.rois:
        parser.error("--rois: give at least one RoI configuration")
    return args


def print_plan(args, rows: list[Row]) -> None:
    family = family_of(args.arch)
    height, width = args.grid
    print(f"arguments valid: {args.arch} on {args.device} ({args.dtype}), batch {args.batch}, "
          f"{args.new_tokens} new tokens, {args.warmup} warm-up + {args.repeats} timed runs of:")
    print(f"  ({family.label}: {'x'.join(map(str, args.view.source_size))} source images, a {height} x {width} = "
          f"{height * width}-token view; engine modes: {family.modes_note})")
    for row in rows:
        boxes = "" if row.config is None else f" {row.config.name} {row.config.boxes}"
        if family.whole_mask and row.config is not None and row.config.name.startswith("box:"):
            boxes += " (one region under the masked rule: the zoomed crop's every token kept)"
        print(f"  {row.label}{boxes}")


def measure(bench: Bench, outputs: dict, args) -> tuple[dict, float]:
    """Median latency of each row that ran, and of the baseline's prefill alone (one new token)."""
    functions = {row: (lambda row=row: bench.generate(row, args.new_tokens)) for row in outputs}
    functions["baseline-prefill"] = lambda: bench.generate(Row("baseline"), 1)
    functions["baseline-prefill"]()  # its first call stays out of the timing, as each row's did
    latencies = timed(functions, bench.device, args.repeats, args.warmup, args.clock)
    return latencies, latencies.pop("baseline-prefill")


def load_average() -> tuple[str, bool]:
    """The machine's 1-minute load, and whether other work keeps its cores busy (timings then run
    slower and vary more than on an idle machine)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load average {load:.1f} on {cores} cores", load > BUSY_LOAD_SHARE * cores


def print_load(when: str) -> str:
    """Print the load (and a warning when the machine is busy); returns the load line."""
    line, busy = load_average()
    print(f"{when}: {line}")
    if busy:
        print(f"warning: {line}: other processes are using the CPU, so these timings are slower and noisier "
              f"than on an idle machine", file=sys.stderr)
    return line


def roi_less_configs(record: dict) -> list[str]:
    """The RPN-decided configurations that got no RoI tokens: they measured SD-RPN without a RoI."""
    return [name for name, config in record["configs"].items()
            if config["boxes"] is None and config["roi_tokens"] == 0]


def print_report(record: dict, records: dict, args) -> None:
    family = family_of(args.arch)
    print(f"{args.arch} on {record['device_name'] or record['device']} ({args.dtype}), batch {args.batch}, "
          f"{args.new_tokens} new tokens, prompt {record['prompt_tokens']} tokens, "
          f"{record['image_tokens']:.0f}-token view ({family.label}; engine modes: {family.modes_note})")
    print_rows(records)
    print_configs(record["configs"])
    for method in MODE_METHODS:
        if method in args.methods and set(ENGINE_MODES) <= set(args.modes):
            print_modes(method, record["configs"])
    equivalence = {name: config["equivalence"] for name, config in record["configs"].items()}
    print("equivalence:", json.dumps({"baseline_vs_generate_equal": record["baseline_vs_generate_equal"],
                                      **equivalence}))
    for name in roi_less_configs(record):
        print(f"warning: --rois {name}: the random-weight RPN proposed no RoI, so these rows measure SD-RPN "
              f"without one (the baseline's visual tokens); force a RoI with box:F or masked:F", file=sys.stderr)


def write_json(path: str, record: dict, key: str | None = None) -> None:
    """Writes ``record`` to ``path``; with ``key``, into the object of runs that ``path`` holds (or
    a new one), under ``key``."""
    if key is not None:
        runs = json.loads(open(path).read()) if os.path.exists(path) else {}
        record = {**runs, key: record}
    with open(path, "w") as file:
        json.dump(record, file, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = plan(args.methods, args.modes, args.rois)
    if args.check_args:
        print_plan(args, rows)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = print_load("before the run")
    device, dtype, arch = torch.device(args.device), getattr(torch, args.dtype), ARCHS[args.arch]
    bench = Bench(arch, args.batch, device, dtype, args.attn_implementation, args.view)
    model, family = bench.model, bench.family

    outputs = first_outputs(bench, rows, args.new_tokens)
    latencies, prefill_ms = measure(bench, outputs, args)
    plans = {config.name: bench.roi_plan(config) for config in args.rois}
    prompt = statistics.mean(shape.tokens for shape in bench.shapes)
    image_tokens = statistics.mean(shape.image_tokens for shape in bench.shapes)
    baseline_flops = prefill_flops(bench)

    def floor(row: Row) -> tuple[float, float]:
        base_ms = latencies[Row("baseline")]
        extra = extra_flops(bench, row, outputs[row], args.new_tokens)
        return extra, base_ms / (base_ms + prefill_ms * extra / baseline_flops)

    records = row_records(latencies, outputs, args.batch, floor)
    with torch.inference_mode():
        expected = model.generate(**bench.inputs, max_new_tokens=args.new_tokens, do_sample=False)
    tolerance = LOGIT_TOLERANCE[args.dtype]
    record = {
        "arch": args.arch, "family": family.name, "device": str(device), "dtype": args.dtype, "batch": args.batch,
        "new_tokens": args.new_tokens, "prompt_tokens": int(prompt), "image_grid": list(bench.grid),
        "image_tokens": image_tokens, "source_size": list(bench.view.source_size),
        "modes": args.modes, "modes_available": list(family.modes), "modes_note": family.modes_note,
        "rois": [config.name for config in args.rois], "baseline_prefill_ms": prefill_ms,
        "baseline_prefill_flops": baseline_flops, "logits_tolerance": tolerance,
        "methods": {row.label: values for row, values in records.items() if row.config is None},
        "configs": {config.name: config_record(config, rows, records, outputs, image_tokens, plans[config.name],
                                               tolerance) for config in args.rois},
        "baseline_vs_generate_equal": bool(torch.equal(outputs[Row("baseline")].sequences.cpu(), expected.cpu())),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(), "clock": args.clock, "repeats": args.repeats, "warmup": args.warmup,
        "load_before": load_before, "load_after": print_load("after the run"),
    }
    print_report(record, records, args)
    if args.json:
        write_json(args.json, record, args.json_key)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
