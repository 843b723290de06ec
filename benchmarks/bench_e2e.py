"""End-to-end throughput of two-stage SD-RPN against plain generation and the plain reference.

Usage::

    python benchmarks/bench_e2e.py --arch tiny --device cpu --batch 1 --new-tokens 8
    python benchmarks/bench_e2e.py --arch llava-1.5-7b --random-weights --device cuda --dtype bfloat16 \\
        --batch 1 --new-tokens 16 --rois box:0.25,masked:0.3,none --json results/e2e.json
    python benchmarks/bench_e2e.py ... --check-args   # validate the arguments, print the plan, exit

Models are built from real transformers configs with random weights (``tiny``: a small LLaVA with
LLaVA-1.5's 336-pixel view and 24 x 24 token grid; ``llava-1.5-7b``: the full architecture). With
random weights the cost depends only on the shapes, so the RoI is forced; ``--rois`` lists the RoI
configurations, all measured in one run, every row of a batch getting the same RoI (default
``box:0.25``: a random RPN proposes no RoI at all, and SD-RPN without one reads the baseline's
visual tokens):

* ``box:F``: a centred square covering the share F of the token grid. Box upscaling: every one of
  the H * W RoI slots holds a token of the crop view.
* ``masked:F``: two squares in opposite corners of the grid, covering F of it together. Masked
  upscaling: about F of the RoI slots hold tokens (those under the squares).
* ``none``: no RoI; every RoI slot is empty.
* ``rpn``: the RPN's own maps decide (random maps, with random weights); a warning says when they
  proposed no RoI, which is what a random RPN does.

The RoI filters drop components of more than 225 cells (the authors' ``max_area``), so the largest
``box`` covers about 0.4 of the 24 x 24 grid: a larger one would be no RoI, and is refused.
Prompts are synthetic token ids around the image tokens, questions of different lengths per row
(so batches are padded), source images 640 x 480.

Methods: ``baseline`` (plain prefill + decode), ``sdrpn`` (two stages, KV reuse, everything between
the stages on the device), ``sdrpn-reference`` (the plain way: CPU post-processing, PIL crop, a
fresh stage-2 call that encodes both views and prefills everything, sample by sample),
``sdrpn-compiled`` (``compile=True``), ``res-scaling`` and ``vicrop``. All methods share the decode
loop. ``sdrpn`` and ``sdrpn-compiled`` run in each engine mode of ``--modes``
(``SDRPN(sync_free=...)``): ``sync-free`` runs every RoI slot through every layer, masked, and
reads nothing back on the host (the default on GPUs); ``trimmed`` reads the RoI token counts once
and runs only the real RoI tokens (the default on the CPU). The methods that ignore the RoI
(baseline, res-scaling, vicrop) are measured once. Every measured function takes its turn in each
repeat, so all ratios compare times of the same run.

``ideal_ratio`` is DESIGN section 3's floor: the baseline plus the extra work of the method (for
SD-RPN: the RoI tokens through all layers, T-1 blocks over the prompt, one vision pass over the
crop), the extra work costed at the baseline's measured prefill speed (seconds per FLOP), the
decode unchanged: ``t_base / (t_base + t_prefill * extra_flops / prefill_flops)``. ``of_floor`` is
``ratio_vs_baseline / ideal_ratio``: 1.0 when a method costs no more than its extra FLOPs.

Prints a table of every measurement and, per RoI configuration, the engine modes side by side. CPU
timings are only meaningful on an idle machine: the load average is printed before and after the
run, with a warning when other processes keep the cores busy.
``--json FILE`` writes the run: its settings, ``methods`` (the rows that ignore the RoI) and
``configs`` (per RoI configuration: its boxes, RoI tokens, rows, sdrpn against sdrpn-reference and
whether their tokens agree).
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
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdrpn import RPN, SDRPN
from sdrpn.engine.baselines import vicrop_layer
from sdrpn.roi import RoIOptions, forced_logits

PROMPT_PREFIX = 5  # "<s> USER :" style tokens before the image
QUESTION_LENGTHS = (18, 11, 25, 14, 21, 9, 16, 23)  # per row, cycled
SOURCE_SIZE = (640, 480)
IMAGE_TOKENS = 576  # the 24 x 24 grid of every arch here
DEFAULT_ROIS = "box:0.25"
# A 1-minute load average above this share of the cores means other work competes for them.
BUSY_LOAD_SHARE = 0.5

METHODS = ("baseline", "sdrpn", "sdrpn-reference", "sdrpn-compiled", "res-scaling", "vicrop")
MODE_METHODS = ("sdrpn", "sdrpn-compiled")  # measured in each engine mode
ROI_METHODS = (*MODE_METHODS, "sdrpn-reference")  # measured in each RoI configuration
ENGINE_MODES = {"sync-free": True, "trimmed": False}  # SDRPN(sync_free=...)


@dataclass(frozen=True)
class Arch:
    name: str
    vision: dict
    text: dict
    start_layer: int  # K
    num_blocks: int  # T


ARCHS = {
    "tiny": Arch(
        "tiny",
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    image_size=336, patch_size=14, projection_dim=64),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024, max_position_embeddings=4096),
        start_layer=4, num_blocks=2,
    ),
    "llava-1.5-7b": Arch(
        "llava-1.5-7b",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        start_layer=15, num_blocks=3,
    ),
}


def build_model(arch: Arch, device, dtype, attn_implementation: str):
    """A random-weight ``LlavaForConditionalGeneration`` of ``arch`` and a processor for it."""
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
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return model, synthetic_processor(config, image_processor)


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


def build_inputs(model, processor, batch: int, device):
    """Synthetic prompts (left padded), pixel values and source images for ``batch`` rows."""
    text = model.config.text_config
    generator = torch.Generator().manual_seed(1)
    rows = []
    for row in range(batch):
        question = QUESTION_LENGTHS[row % len(QUESTION_LENGTHS)]
        words = torch.randint(3, text.vocab_size - 2, (PROMPT_PREFIX + question,), generator=generator)
        image = torch.full((IMAGE_TOKENS,), model.config.image_token_id)
        rows.append(torch.cat([words[:PROMPT_PREFIX], image, words[PROMPT_PREFIX:]]))
    length = max(len(r) for r in rows)
    input_ids = torch.full((batch, length), text.pad_token_id)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row):] = row
        attention_mask[index, length - len(row):] = 1
    rng = np.random.default_rng(2)
    images = []
    for _ in range(batch):  # smooth random images: gradients plus noise
        y, x = np.mgrid[0:SOURCE_SIZE[1], 0:SOURCE_SIZE[0]]
        base = np.stack([x * 255 / SOURCE_SIZE[0], y * 255 / SOURCE_SIZE[1], (x + y) % 256], axis=-1)
        images.append(Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)))
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "pixel_values": pixel_values.to(device=device, dtype=model.dtype)}, images


# ------------------------------------------------------------------------------------------------
# FLOP model (multiply-adds counted twice)
# ------------------------------------------------------------------------------------------------


def llm_flops(config, tokens: int, context: int, layers: int) -> float:
    """``tokens`` new tokens through ``layers`` decoder layers after ``context`` cached tokens."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = d // heads
    kv = config.num_key_value_heads
    linear = 2 * (d * heads * head_dim * 2 + 2 * d * kv * head_dim + 3 * d * config.intermediate_size)
    attention = 4 * heads * head_dim * (tokens * context + tokens * (tokens + 1) / 2)
    return layers * (tokens * linear + attention)


def vision_flops(config, tokens: int) -> float:
    """One view of ``tokens`` patch tokens (+ CLS) through the vision tower and the projector."""
    vision, text = config.vision_config, config.text_config
    d, n = vision.hidden_size, tokens + 1
    per_layer = n * 2 * (4 * d * d + 2 * d * vision.intermediate_size) + 4 * d * n * n
    patches = n * 2 * 3 * vision.patch_size**2 * d
    projector = tokens * 2 * (d * text.hidden_size + text.hidden_size**2)
    return vision.num_hidden_layers * per_layer + patches + projector


def extra_flops(method: str, config, arch: Arch, prompt: int, roi_tokens: float) -> float:
    """Work a method adds to the baseline prefill (DESIGN section 3's floor)."""
    text = config.text_config
    if method.startswith("sdrpn"):  # without RoI tokens there is no crop to encode
        crop = vision_flops(config, IMAGE_TOKENS) if roi_tokens > 0 else 0.0
        return (crop + llm_flops(text, prompt, 0, arch.num_blocks - 1)
                + llm_flops(text, int(roi_tokens), prompt, text.num_hidden_layers))
    if method == "res-scaling":
        return (vision_flops(config, 4 * IMAGE_TOKENS) - vision_flops(config, IMAGE_TOKENS)
                + llm_flops(text, 3 * IMAGE_TOKENS, prompt, text.num_hidden_layers))
    if method == "vicrop":  # two passes to its attention layer + the crop as a second image
        layers = vicrop_layer(text.num_hidden_layers) + 1
        return (2 * llm_flops(text, prompt, 0, layers) + vision_flops(config, IMAGE_TOKENS)
                + llm_flops(text, IMAGE_TOKENS, prompt, text.num_hidden_layers))
    return 0.0


# ------------------------------------------------------------------------------------------------
# RoI configurations and the measurement plan
# ------------------------------------------------------------------------------------------------


def grid_of(arch: Arch) -> tuple[int, int]:
    side = arch.vision["image_size"] // arch.vision["patch_size"]
    return side, side


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


def centred_square(fraction: float, grid) -> tuple:
    side = max(2, round(math.sqrt(fraction) * min(grid)))
    x0, y0 = (grid[1] - side) // 2, (grid[0] - side) // 2
    return ((x0, y0, x0 + side, y0 + side),)


def opposite_squares(fraction: float, grid) -> tuple:
    """Two squares covering ``fraction`` of the grid together, in its top-left and bottom-right
    corners: two components, so the engine upscales them masked."""
    side = max(2, round(math.sqrt(fraction / 2) * min(grid)))
    if 2 * side >= min(grid):  # they would touch (or overlap) and make one component
        largest = 2 * ((min(grid) - 1) // 2) ** 2 / (grid[0] * grid[1])
        raise ValueError(f"two squares covering {fraction} of the grid touch; use at most {largest:.2f}")
    height, width = grid
    return ((0, 0, side, side), (width - side, height - side, width, height))


def roi_config(spec: str, grid) -> RoIConfig:
    """``box:F``, ``masked:F``, ``none`` or ``rpn`` (see the module's docstring); ValueError says
    what is wrong with ``spec``."""
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
    if any((x1 - x0) * (y1 - y0) > max_area for x0, y0, x1, y1 in boxes):
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


class Bench:
    """The model, its inputs, one engine per (compiled, mode) and the forced RPN maps of each RoI
    configuration, the engines and maps made on first use."""

    def __init__(self, arch: Arch, batch: int, device, dtype, attn_implementation: str):
        self.model, self.processor = build_model(arch, device, dtype, attn_implementation)
        self.inputs, self.images = build_inputs(self.model, self.processor, batch, device)
        self.rpn = RPN.from_model(self.model, arch.start_layer, arch.num_blocks)
        self.grid, self.batch, self.device = grid_of(arch), batch, device
        self.engines, self.roi_logits = {}, {}

    def engine(self, row: Row) -> SDRPN:
        key = (row.method == "sdrpn-compiled", row.mode or "sync-free")
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

    def generate(self, row: Row, new_tokens: int, return_roi: bool = False):
        engine = self.engine(row)
        method = "sdrpn" if row.method == "sdrpn-compiled" else row.method
        roi_logits = self.forced_logits(row.config, engine.options.threshold)
        return engine.generate(**self.inputs, images=self.images, method=method, max_new_tokens=new_tokens,
                               roi_logits=roi_logits, return_roi=return_roi)


def timed(functions: dict, device, repeats: int, warmup: int) -> dict:
    """Median wall time in milliseconds of each function (CUDA synchronised). The functions take
    turns within each repeat, so that a machine whose load drifts slows them all alike."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            function()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def first_outputs(bench: Bench, rows: list[Row], new_tokens: int) -> dict:
    """Each row's output (sequences, RoI tokens); a method that cannot run here is left out."""
    outputs = {}
    for row in rows:
        try:
            outputs[row] = bench.generate(row, new_tokens, return_roi=True)
        except ValueError as error:
            print(f"skipping {row.label}: {error}", file=sys.stderr)
    return outputs


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def row_records(latencies: dict, outputs: dict, batch: int, floor) -> dict:
    """Per row: latency, throughput, visual tokens, ratio to the baseline, its floor, and how
    close it comes to the floor. ``floor(row, roi_tokens)`` gives the row's ideal ratio."""
    records = {row: {"latency_ms": latency, "throughput_samples_s": batch / latency * 1000,
                     "visual_tokens": float(outputs[row].visual_tokens.float().mean())}
               for row, latency in latencies.items()}
    base = records[Row("baseline")]
    for row, record in records.items():
        record["ratio_vs_baseline"] = record["throughput_samples_s"] / base["throughput_samples_s"]
        record["ideal_ratio"] = floor(row, record["visual_tokens"] - IMAGE_TOKENS)
        record["of_floor"] = record["ratio_vs_baseline"] / record["ideal_ratio"]
    return records


def same_tokens(outputs: dict, row: Row, other: Row) -> bool | None:
    if row not in outputs or other not in outputs:
        return None
    return bool(torch.equal(outputs[row].sequences.cpu(), outputs[other].sequences.cpu()))


def config_record(config: RoIConfig, rows: list[Row], records: dict, outputs: dict) -> dict:
    """One RoI configuration: its rows, RoI tokens, each mode against sdrpn-reference."""
    mine = [row for row in rows if row.config == config and row in records]
    reference = Row("sdrpn-reference", config)
    moded = [row for row in mine if row.mode]
    vs_reference = {row.label: records[row]["throughput_samples_s"] / records[reference]["throughput_samples_s"]
                    for row in moded if reference in records}
    equivalence = {f"{row.label}_vs_reference_tokens_equal": same_tokens(outputs, row, reference) for row in moded}
    return {"boxes": None if config.boxes is None else [list(box) for box in config.boxes],
            "roi_tokens": records[mine[0]]["visual_tokens"] - IMAGE_TOKENS if mine else None,
            "methods": {row.label: records[row] for row in mine},
            "throughput_vs_reference": vs_reference, "equivalence": equivalence}


def print_rows(records: dict) -> None:
    print(f"{'RoI':<14}{'method':<26}{'latency ms':>11}{'samples/s':>11}{'vs base':>9}{'floor':>8}"
          f"{'of floor':>10}{'visual tok':>12}")
    for row, values in records.items():
        print(f"{row.config.name if row.config else '-':<14}{row.label:<26}{values['latency_ms']:>11.2f}"
              f"{values['throughput_samples_s']:>11.2f}{values['ratio_vs_baseline']:>9.3f}"
              f"{values['ideal_ratio']:>8.3f}{values['of_floor']:>10.3f}{values['visual_tokens']:>12.1f}")


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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, validated: methods, modes and RoI configurations come back as lists."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--random-weights", action="store_true",
                        help="use random weights (the only option: no checkpoint is loaded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--methods", default="baseline,sdrpn,sdrpn-reference,res-scaling,vicrop",
                        help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--modes", default="sync-free,trimmed",
                        help=f"engine modes of sdrpn and sdrpn-compiled, comma-separated: {', '.join(ENGINE_MODES)}")
    parser.add_argument("--rois", default=DEFAULT_ROIS,
                        help=f"RoI configurations, comma-separated: box:F, masked:F, none, rpn (default {DEFAULT_ROIS}: "
                             "with random weights the RPN proposes no RoI, so one is forced)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--check-args", action="store_true", help="validate the arguments, print the plan and exit")
    args = parser.parse_args(argv)
    if args.arch != "tiny" and not args.random_weights:
        parser.error(f"--arch {args.arch} needs --random-weights (no checkpoint can be loaded here)")
    for name in ("batch", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.methods = ["baseline", *(m for m in names(args.methods) if m != "baseline")]
    args.modes = names(args.modes)
    for flag, given, known in (("--methods", args.methods, METHODS), ("--modes", args.modes, ENGINE_MODES)):
        unknown = [name for name in given if name not in known]
        if unknown or not given:
            parser.error(f"{flag}: unknown or none: {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        args.rois = [roi_config(spec, grid_of(ARCHS[args.arch])) for spec in names(args.rois)]
    except ValueError as error:
        parser.error(str(error))
    if not args.rois:
        parser.error("--rois: give at least one RoI configuration")
    return args


def print_plan(args, rows: list[Row]) -> None:
    print(f"arguments valid: {args.arch} on {args.device} ({args.dtype}), batch {args.batch}, "
          f"{args.new_tokens} new tokens, {args.warmup} warm-up + {args.repeats} timed runs of:")
    for row in rows:
        boxes = "" if row.config is None else f" {row.config.name} {row.config.boxes}"
        print(f"  {row.label}{boxes}")


def measure(bench: Bench, outputs: dict, args) -> tuple[dict, float]:
    """Median latency of each row that ran, and of the baseline's prefill alone (one new token)."""
    functions = {row: (lambda row=row: bench.generate(row, args.new_tokens)) for row in outputs}
    functions["baseline-prefill"] = lambda: bench.generate(Row("baseline"), 1)
    functions["baseline-prefill"]()  # its first call stays out of the timing, as each row's did
    latencies = timed(functions, bench.device, args.repeats, args.warmup)
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
    print(f"{args.arch} on {record['device_name'] or record['device']} ({args.dtype}), batch {args.batch}, "
          f"{args.new_tokens} new tokens, prompt {record['prompt_tokens']} tokens")
    print_rows(records)
    for method in MODE_METHODS:
        if method in args.methods and set(ENGINE_MODES) <= set(args.modes):
            print_modes(method, record["configs"])
    equivalence = {name: config["equivalence"] for name, config in record["configs"].items()}
    print("equivalence:", json.dumps({"baseline_vs_generate_equal": record["baseline_vs_generate_equal"],
                                      **equivalence}))
    for name in roi_less_configs(record):
        print(f"warning: --rois {name}: the random-weight RPN proposed no RoI, so these rows measure SD-RPN "
              f"without one (the baseline's visual tokens); force a RoI with box:F or masked:F", file=sys.stderr)


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
    bench = Bench(arch, args.batch, device, dtype, args.attn_implementation)
    model, text = bench.model, bench.model.config.text_config

    outputs = first_outputs(bench, rows, args.new_tokens)
    latencies, prefill_ms = measure(bench, outputs, args)
    prompt = int(bench.inputs["attention_mask"].sum(1).float().mean())
    prefill_flops = vision_flops(model.config, IMAGE_TOKENS) + llm_flops(text, prompt, 0, text.num_hidden_layers)

    def floor(row: Row, roi_tokens: float) -> float:
        base_ms = latencies[Row("baseline")]
        extra = extra_flops(row.method, model.config, arch, prompt, roi_tokens)
        return base_ms / (base_ms + prefill_ms * extra / prefill_flops)

    records = row_records(latencies, outputs, args.batch, floor)
    with torch.inference_mode():
        expected = model.generate(**bench.inputs, max_new_tokens=args.new_tokens, do_sample=False)
    record = {
        "arch": args.arch, "device": str(device), "dtype": args.dtype, "batch": args.batch,
        "new_tokens": args.new_tokens, "prompt_tokens": prompt, "modes": args.modes,
        "rois": [config.name for config in args.rois], "baseline_prefill_ms": prefill_ms,
        "methods": {row.label: values for row, values in records.items() if row.config is None},
        "configs": {config.name: config_record(config, rows, records, outputs) for config in args.rois},
        "baseline_vs_generate_equal": bool(torch.equal(outputs[Row("baseline")].sequences, expected)),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
        "load_before": load_before, "load_after": print_load("after the run"),
    }
    print_report(record, records, args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(record, file, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
