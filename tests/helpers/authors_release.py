"""Small files in the layout of the SD-RPN authors' release (YuHengsss/SD-RPN, commit 00876ac).

* :func:`write_authors_checkpoint`: a LLaVA checkpoint with an RPN, as their training writes it
  (``LLaVA/llava/train/train.py`` ~952-962 for the config keys, ``llava_llama.py`` ~200-232 for the
  twig weights copied from layers K..K+T-1 and the final norm), from a tiny llava-hf model: the base
  model under the original LLaVA names, the twig tensors perturbed so that they differ from the
  layers they started from.
* :func:`write_authors_pickle`: a pseudo-label pickle as ``LLaVA/llava/eval/model_vqa_label.py``
  ~134-186 writes it: a list of dicts whose attention maps are float16 numpy arrays of 576 values.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch

LAYOUTS = ("safetensors", "sharded-safetensors", "bin", "bin-shards")


def authors_config(model, start_layer: int, num_blocks: int) -> dict:
    text = model.config.text_config
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "num_hidden_layers": text.num_hidden_layers, "rms_norm_eps": text.rms_norm_eps,
        "vocab_size": text.vocab_size, "image_aspect_ratio": "pad", "mm_projector_type": "mlp2x_gelu",
        "torch_dtype": "bfloat16", "enable_twig": True, "twig_K": start_layer, "twig_T": num_blocks,
        "roi_branch": True, "roi_source": "qk", "roi_loss": "bce", "roi_super_type": "v1", "roi_multi_head": True,
    }


def write_config(directory: Path, config: dict, changes: dict | None = None) -> None:
    """Writes ``config.json`` with ``changes`` applied (None values delete their keys)."""
    for key, value in (changes or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def authors_tensors(model, start_layer: int, num_blocks: int, noise: float = 0.05, seed: int = 0) -> dict:
    """Base model under the original LLaVA names, plus twig tensors = layers K..K+T-1 and the final
    norm with noise, all bfloat16 (their release was trained and saved in bfloat16)."""
    generator = torch.Generator().manual_seed(seed)
    language = {name.removeprefix("model.language_model."): tensor
                for name, tensor in model.state_dict().items() if name.startswith("model.language_model.")}
    tensors = {f"model.{name}": tensor for name, tensor in language.items()}
    tensors["lm_head.weight"] = model.state_dict()["lm_head.weight"]
    for block in range(num_blocks):
        prefix = f"layers.{start_layer + block}."
        for name, tensor in language.items():
            if name.startswith(prefix):
                noisy = tensor + noise * tensor.std() * torch.randn(tensor.shape, generator=generator)
                tensors[f"model.twig_layers.{block}.{name.removeprefix(prefix)}"] = noisy
    tensors["model.twig_norm.weight"] = language["norm.weight"] + noise * torch.randn(
        language["norm.weight"].shape, generator=generator)
    return {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in tensors.items()}


def write_authors_checkpoint(directory, model, start_layer: int = 2, num_blocks: int = 3, layout: str = "safetensors",
                             config_changes: dict | None = None, drop: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Writes the checkpoint into ``directory``; returns the tensors written (name -> tensor).

    ``config_changes`` overrides config keys (None values delete them); ``drop`` leaves tensors out.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = authors_config(model, start_layer, num_blocks)
    write_config(directory, config, config_changes)
    tensors = {name: tensor for name, tensor in authors_tensors(model, start_layer, num_blocks, seed=seed).items()
               if name not in drop}
    if layout == "safetensors":
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(tensors, directory / "pytorch_model.bin")
    elif layout in ("sharded-safetensors", "bin-shards"):
        names = sorted(tensors)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for number, half in enumerate(halves, start=1):
            part = {name: tensors[name] for name in half}
            if layout == "bin-shards":
                file = f"pytorch_model-{number:05d}-of-00002.bin"
                torch.save(part, directory / file)
            else:
                file = f"model-{number:05d}-of-00002.safetensors"
                save_file(part, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(half, file))
        index = "pytorch_model.bin.index.json" if layout == "bin-shards" else "model.safetensors.index.json"
        (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(f"unknown layout {layout}")
    return tensors


def authors_record(index: int, rng: np.random.Generator, grid: int = 24) -> dict:
    """One record as their labelling script writes it (model_vqa_label.py:134-180, 7B branch):
    layer-2 mean attention as ``sink_attn``, the mean of three layer-14 heads with the sinks
    already zeroed in place as ``grounding_attn_o2i``, float16 (576,) arrays."""
    cells = grid * grid
    sink = (rng.random(cells) * 8e-4).astype(np.float16)
    sink[rng.choice(cells, size=3, replace=False)] = np.float16(0.05)
    grounding = (rng.random(cells) * 1e-3).astype(np.float16)
    row, col = rng.integers(0, grid - 4, size=2)
    for r in range(row, row + int(rng.integers(1, 4))):
        for c in range(col, col + int(rng.integers(1, 4))):
            grounding[r * grid + c] = np.float16(rng.uniform(0.01, 0.05))
    grounding *= (sink < 1e-3).astype(float)  # as their script does, in place (model_vqa_label.py:142-143)
    return {"question_id": str(index), "prompt": f"What is written in region {index}?",
            "text": f"answer {index}", "image": f"ocr_vqa/images/{index:06d}.jpg", "sink_attn": sink,
            "grounding_attn_o2i": grounding, "grounding_attn_q2i": grounding.copy()}


def write_authors_pickle(path, records: list) -> Path:
    path = Path(path)
    with open(path, "wb") as handle:
        pickle.dump(records, handle)
    return path
