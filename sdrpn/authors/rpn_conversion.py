"""The authors' RPN as an :class:`sdrpn.rpn.RPN` of a llava-hf model (``sdrpn convert``).

Their RPN, on the hidden states ``h`` entering layer K (inference ``llama_src.py:1310-1356``, training
``:1670-1687``, YuHengsss/SD-RPN commit 00876ac):

    h = twig_layers[0 .. T-2](h)                  # full decoder layers (roi_source "qk")
    h = twig_norm(h)                              # roi_super_type "v1"
    h = twig_layers[T-1].input_layernorm(h)       # only the norm and q/k of the last twig layer
    q = q_proj(h[last prompt token]);  k = k_proj(h[image tokens])
    score = mean over heads of q_h . k_h / sqrt(head_dim)     # roi_multi_head, no RoPE

which is :meth:`sdrpn.rpn.RPN.forward` with ``blocks.i`` = ``model.twig_layers.i``, ``norm`` =
``model.twig_norm`` and ``head_norm`` / ``q_proj`` / ``k_proj`` = the last twig layer's
``input_layernorm`` / ``self_attn.q_proj`` / ``self_attn.k_proj``. The last twig layer's v/o
projections and MLP never run and are not converted.

The converted RPN records the settings it was trained and evaluated with: the ``vicuna_v1``
prompt (their ``--version v1`` training, ``conv_template="vicuna_v1"`` evaluation), the
pad-to-square base view (``image_aspect_ratio pad``, ``mm_utils.py:154-166``), RoI threshold
0.15 (:data:`sdrpn.rpn.DEFAULT_THRESHOLD`, their ``roi_conf_thresh``) with the per-benchmark presets of
:data:`sdrpn.roi.THRESHOLDS`, and where the image tokens start under that prompt for this model's
processor (their model hard-codes 35, ``llama_src.py:1110``).
"""

from __future__ import annotations

import math

import torch

from ..distill.train import prompt_image_start
from ..models import adapter_for
from ..models.base import ModelAdapter
from ..prompts import template_named
from ..roi import THRESHOLDS
from ..rpn import DEFAULT_THRESHOLD, RPN
from . import AUTHORS_GEOMETRY, AUTHORS_TEMPLATE
from .checkpoint import AuthorsCheckpoint, CheckpointError

__all__ = ["convert_rpn", "authors_name", "AUTHORS_IMAGE_START"]

AUTHORS_IMAGE_START = 35
# Base tensors compared with the model: the same LLaVA-1.5 in another dtype (their bf16 training
# copy against an fp16 llava-hf port) differs by about 0.2%, another checkpoint by about 100%.
BASE_TOLERANCE = 1e-2
SAMPLED_ROWS = 64


def authors_name(name: str, last_layer: int) -> str:
    """The authors' name of our RPN tensor ``name``; ``last_layer`` is T-1."""
    prefix, _, rest = name.partition(".")
    if prefix == "blocks":
        return f"model.twig_layers.{rest}"
    if prefix == "norm":
        return f"model.twig_norm.{rest}"
    if prefix == "head_norm":
        return f"model.twig_layers.{last_layer}.input_layernorm.{rest}"
    if prefix in ("q_proj", "k_proj"):
        return f"model.twig_layers.{last_layer}.self_attn.{name}"
    raise KeyError(f"no authors' tensor corresponds to {name}")


def check_sizes(checkpoint: AuthorsCheckpoint, adapter: ModelAdapter) -> None:
    """Refuses a checkpoint made for a language model of other sizes, or an RPN beyond its layers."""
    config, text = checkpoint.config, adapter.text_config
    heads = config.get("num_attention_heads")
    ours = {"hidden_size": adapter.hidden_size, "intermediate_size": text.intermediate_size,
            "num_attention_heads": adapter.num_heads, "num_key_value_heads": adapter.num_kv_heads,
            "num_hidden_layers": adapter.num_layers}
    theirs = {key: config.get(key) for key in ours}
    theirs["num_key_value_heads"] = config.get("num_key_value_heads", heads)
    problems = [f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ours if theirs[key] != ours[key]]
    eps = config.get("rms_norm_eps")
    if eps is not None and not math.isclose(eps, text.rms_norm_eps, rel_tol=1e-6):
        problems.append(f"rms_norm_eps {eps!r} there, {text.rms_norm_eps!r} here")
    if problems:
        raise CheckpointError(f"{checkpoint.config_path} describes another language model than --model: "
                              + "; ".join(problems))
    twig = checkpoint.twig
    if twig.start_layer + twig.num_blocks > adapter.num_layers:
        raise CheckpointError(f"{checkpoint.config_path}: twig_K + twig_T = {twig.start_layer + twig.num_blocks} goes "
                              f"beyond the model's {adapter.num_layers} layers (the RPN spans layers K..K+T-1)")


def check_base_weights(checkpoint: AuthorsCheckpoint, adapter: ModelAdapter) -> None:
    """Refuses an RPN trained on another checkpoint: the embeddings and the q projection of layer
    K-1 (the frozen layers the RPN reads) must equal the model's up to dtype rounding. llava-hf
    ports add rows to the vocabulary, so the rows both have are compared."""
    pairs = {"model.embed_tokens.weight": adapter.embed_tokens.weight}
    start = checkpoint.twig.start_layer
    if start > 0:
        pairs[f"model.layers.{start - 1}.self_attn.q_proj.weight"] = adapter.layer(start - 1).self_attn.q_proj.weight
    theirs = checkpoint.read(pairs)
    for name, ours in pairs.items():
        their = theirs[name]
        rows = min(their.shape[0], ours.shape[0])
        if their.shape[1:] != ours.shape[1:]:
            raise CheckpointError(f"{checkpoint.file_of(name)}: {name} has shape {tuple(their.shape)}, the model's "
                                  f"{tuple(ours.shape)}")
        picks = torch.linspace(0, rows - 1, SAMPLED_ROWS).long().unique()
        their_rows = their[picks].float()
        our_rows = ours.detach()[picks.to(ours.device)].float().cpu()
        difference = ((their_rows - our_rows).norm() / our_rows.norm().clamp_min(1e-12)).item()
        if not difference <= BASE_TOLERANCE:
            raise CheckpointError(f"{checkpoint.file_of(name)}: {name} differs from the model's by {difference:.1%} "
                                  f"(over {len(picks)} rows): the RPN was trained on another checkpoint than --model")


def convert_rpn(checkpoint: AuthorsCheckpoint, model, processor, dtype: torch.dtype | None = None) -> RPN:
    """The RPN of ``checkpoint`` for ``model`` (llava-hf ``LlavaForConditionalGeneration``).

    Args:
        processor: the model's processor (for the image-token start under the authors' prompt).
        dtype: dtype of the RPN's weights; None keeps the checkpoint's.

    Raises:
        CheckpointError: sizes or base weights differ from the model's, or RPN tensors are missing
            or have other shapes.
    """
    adapter = adapter_for(model, processor)
    check_sizes(checkpoint, adapter)
    check_base_weights(checkpoint, adapter)
    twig, template = checkpoint.twig, template_named(AUTHORS_TEMPLATE)
    rpn = RPN.from_model(adapter, twig.start_layer, twig.num_blocks, threshold=DEFAULT_THRESHOLD,
                         thresholds=dict(THRESHOLDS), prompt=template,
                         image_start=prompt_image_start(processor, template, adapter), geometry=AUTHORS_GEOMETRY)
    expected = rpn.state_dict()
    names = {ours: authors_name(ours, twig.num_blocks - 1) for ours in expected}
    available = checkpoint.names
    missing = sorted(name for name in names.values() if name not in available)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{checkpoint.directory}: no tensor {missing[0]}{more}; config.json's "
                              f"twig_T={twig.num_blocks} promises model.twig_layers.0..{twig.num_blocks - 1} "
                              f"and model.twig_norm.weight")
    tensors = checkpoint.read(names.values())
    for ours, theirs in names.items():
        if tensors[theirs].shape != expected[ours].shape:
            raise CheckpointError(f"{checkpoint.file_of(theirs)}: {theirs} has shape {tuple(tensors[theirs].shape)}, "
                                  f"expected {tuple(expected[ours].shape)}")
    rpn.to(dtype or tensors[names["norm.weight"]].dtype)
    rpn.load_state_dict({ours: tensors[theirs] for ours, theirs in names.items()})
    rpn.config["converted_from"] = {"checkpoint": str(checkpoint.directory.resolve()), "config": twig.keys,
                                    "authors_image_start": AUTHORS_IMAGE_START}
    return rpn.eval()
