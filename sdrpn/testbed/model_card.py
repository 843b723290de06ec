"""The model card (README.md) of a tiny LLaVA trained by ``sdrpn testbed train-model``, written from
its ``training.json``: what it is, how it was trained, how long it took and its accuracies."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.synthetic import DEFAULT_DESIGN, design_of

__all__ = ["model_card", "write_model_card"]

CARD_NAME = "README.md"


def _accuracy_table(history: list[dict]) -> list[str]:
    if not history:
        return ["(no validation run was recorded)"]
    names = list(history[-1]["val"])
    lines = ["| step | train loss | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for entry in history:
        values = " | ".join(f"{100 * entry['val'][name]:.1f}%" for name in names)
        lines.append(f"| {entry['step']} | {entry['train_loss']:.3f} | {values} |")
    return lines


def _warm_start(recipe: dict, history: list[dict]) -> list[str]:
    steps = recipe.get("vision_steps", 0)
    if not steps:
        return ["- vision warm start: none"]
    accuracy = f", held-out glyph-token accuracy {100 * history[-1]['val_glyph_accuracy']:.1f}%" if history else ""
    return [f"- vision warm start: {steps} steps of {recipe['vision_batch_size']} questions (base and RoI views), "
            f"peak lr {recipe['vision_lr']:g}; every image token classified as background or the digit whose "
            f"glyph centre it holds{accuracy}",
            f"- vision tower {'frozen' if recipe.get('freeze_vision') else 'trained'} while the projector and "
            f"the language model train"]


_DESIGN_TEXT = {"one-detail": "coloured shapes, the one a question names holding a small two-digit number"}
_FLAGS = {"seed": "--seed", "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr",
          "vision_steps": "--vision-steps", "refine_steps": "--refine-steps"}


def _design_flag(design: str | None) -> str:
    return f" --design {design}" if design not in (None, DEFAULT_DESIGN) else ""


def _command(recipe: dict, design: str | None) -> str:
    """The train-model command line of ``recipe``, and the recipe keys no flag sets that differ
    from the design's recipe."""
    from .train_model import DESIGN_RECIPES, TrainModelOptions

    # as training.json holds it
    defaults = json.loads(json.dumps(DESIGN_RECIPES.get(design, TrainModelOptions()).recipe()))
    flags = [f"{flag} {recipe[key]:g}" for key, flag in _FLAGS.items()
             if key in recipe and (key == "seed" or recipe[key] != defaults[key])]
    other = [key for key in recipe if key not in _FLAGS and recipe[key] != defaults.get(key)]
    line = f"`sdrpn testbed train-model --data DIR --out DIR{_design_flag(design)} {' '.join(flags)}`"
    return line + (f" with a recipe that differs from the script's defaults in {', '.join(other)}" if other else "")


def model_card(summary: dict) -> str:
    """The card's Markdown for a ``training.json`` summary."""
    recipe, spec, data, env = summary["recipe"], summary["spec"], summary["data"], summary["environment"]
    splits = ", ".join(f"{count} {split}" for split, count in data["splits"].items())
    design = design_of(data)
    return "\n".join([
        "# Tiny LLaVA of the sdrpn testbed",
        "",
        "A `transformers.LlavaForConditionalGeneration` trained from scratch on the synthetic fine-grained VQA of",
        f"`sdrpn.data.synthetic` ({_DESIGN_TEXT.get(design, 'coloured shapes holding small two-digit numbers')}). "
        "It cannot read a fine number at",
        "its base resolution; given a zoomed second view of the shape after the original image tokens (SD-RPN's",
        "stage-2 layout) it can. How well its own attention finds that shape is what `sdrpn testbed run` measures.",
        "It exists to test SD-RPN end to end on a CPU; it knows nothing else.",
        "",
        "## Architecture",
        "",
        f"- vision: CLIP ViT, {spec['image_size']} px input, patch {spec['patch_size']} "
        f"({spec['image_size'] // spec['patch_size']}x{spec['image_size'] // spec['patch_size']} image tokens), "
        f"{spec['vision_layers']} layers of width {spec['vision_hidden']}",
        f"- language model: LLaMA, {spec['text_layers']} layers of width {spec['text_hidden']}, "
        f"{spec['text_heads']} heads, MLP {spec['text_intermediate']}; word-level tokenizer, numbers digit by digit",
        "- weights stored in float16; load and run in float32:",
        "  `LlavaForConditionalGeneration.from_pretrained(dir)`, `AutoProcessor.from_pretrained(dir)`",
        "",
        "## Training",
        "",
        f"- data: `sdrpn testbed generate --seed {data['seed']}{_design_flag(design)}` ({splits} questions)",
        f"- command: {_command(recipe, design)}",
        *_warm_start(recipe, summary.get("vision_history", [])),
        f"- recipe: {recipe['steps']} steps of {recipe['batch_size']} questions, AdamW (0.9, 0.98), peak lr "
        f"{recipe['lr']:g} after {recipe['warmup_steps']} warmup steps, cosine to {recipe['min_lr_ratio']:g}x, "
        f"weight decay {recipe['weight_decay']:g}, clipping {recipe['max_grad_norm']:g}, "
        f"bfloat16 autocast {'on' if recipe.get('bf16') else 'off'}",
        *([f"- refinement: {recipe['refine_steps']} more steps at a constant lr {recipe['refine_lr']:g}, every coarse "
           f"question in a single view"] if recipe.get("refine_steps") else []),
        f"- views per batch (single / box RoI / masked RoI): {' / '.join(f'{p:g}' for p in recipe['view_mix'])}",
        f"- time: {summary['train_seconds'] / 60:.0f} min on {env['threads']} CPU thread(s) ({env['machine']}), "
        f"torch {env['torch']}, transformers {env['transformers']}",
        "",
        f"## Validation accuracy (exact answer, {summary['val_samples']} validation questions)",
        "",
        "\"one view\" is the plain model; \"ground-truth RoI\" adds the zoomed view of the question's shape;",
        "\"coarse\" questions have numbers large enough to read at the base resolution.",
        "",
        *_accuracy_table(summary["history"]),
        "",
    ])


def write_model_card(directory: str | Path) -> Path:
    """Writes ``README.md`` beside the ``training.json`` in ``directory``; returns its path."""
    directory = Path(directory)
    summary = json.loads((directory / "training.json").read_text(encoding="utf-8"))
    path = directory / CARD_NAME
    path.write_text(model_card(summary), encoding="utf-8")
    return path
