"""The authors' RPN as an :class:`sdrpn.rpn.RPN` of a transformers model (``sdrpn convert``).

Their RPN, on the hidden states ``h`` entering layer K (YuHengsss/SD-RPN commit 00876ac):

    h = twig_layers[0 .. T-2](h)                  # full decoder layers (roi_source "qk")
    h = twig_norm(h)                              # LLaVA-1.5 only (roi_super_type "v1")
    h = twig_layers[T-1].input_layernorm(h)       # only the norm and q/k of the last twig layer
    q = q_proj(h[last prompt token]);  k = k_proj(h[image tokens])
    q, k = M-RoPE(q), M-RoPE(k)                   # Qwen2.5-VL only, at the real 3-D positions
    score = mean over heads of q_h . k_h / sqrt(head_dim)     # roi_multi_head; GQA: key heads repeated

* LLaVA-1.5: inference ``LLaVA/llava/llm_src/llama_src.py:1310-1356``, training ``:1670-1687``. The
  image tokens start at index 35, hard-coded (:1110).
* Qwen2.5-VL: inference ``Qwen2.5-VL/qwen_src/qwen2_5_vl/modeling_qwen2_5_vl.py:1245`` (layers
  0..K-1), 1279-1299 (``twig_layers[:-1]`` as full layers, with the model's causal mask and 3-D
  rotary), 1311-1312 (the last twig layer's ``input_layernorm`` and q/k projections, with bias, on
  every token), 1318-1330 (M-RoPE on q and k from ``rotary_emb`` at the prompt's 3-D positions, key
  heads repeated), 1331-1336 (the last query against the image tokens from the first image token,
  ``t*h*w/4`` of them, scaled, mean over heads); training ``:2174-2227`` scores the same way, over all
  question tokens. No ``twig_norm`` (its call is commented out, :1302-1303).

That is :meth:`sdrpn.rpn.RPN.forward` with ``blocks.i`` = ``model.twig_layers.i``, ``norm`` =
``model.twig_norm`` where the family's RPN has that norm (``rpn_uses_final_norm``) and ``head_norm`` /
``q_proj`` / ``k_proj`` = the last twig layer's ``input_layernorm`` / ``self_attn.q_proj`` /
``self_attn.k_proj``; rotary embeddings where the family's RPN uses them (``rpn_uses_rope``). Their K
is our ``start_layer`` and their T our ``num_blocks``. The last twig layer's v/o projections and MLP
never run and are not converted.

The converted RPN records the settings their inference uses (:class:`sdrpn.authors.checkpoint.Layout`):
the prompt template and, with the model's processor, where its image tokens start; the base view
geometry; the RoI threshold and per-benchmark presets.
"""

from __future__ import annotations

import math

import torch

from ..distill.train import prompt_image_start
from ..models import adapter_for
from ..models.base import ModelAdapter
from ..prompts import template_named
from ..rpn import RPN
from .checkpoint import AuthorsCheckpoint, CheckpointError, Layout

__all__ = ["convert_rpn", "authors_name", "check_model", "AUTHORS_IMAGE_START"]

AUTHORS_IMAGE_START = 35  # their LLaVA-1.5 model's (llama_src.py:1110); kept for callers
# Base tensors compared with the model: the same LLaVA-1.5 in another dtype (their bf16 training
# copy against an fp16 llava-hf port) differs by about 0.2%, another checkpoint by about 100%.
BASE_TOLERANCE = 1e-2
SAMPLED_ROWS = 64
# Base tensors the RPN reads (the same names in both releases): the embeddings and layer K-1's q.
EMBEDDINGS = "model.embed_tokens.weight"
BASE_LAYER_Q = "model.layers.{layer}.self_attn.q_proj.weight"


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


def check_model(checkpoint: AuthorsCheckpoint, model) -> ModelAdapter:
    """The adapter of ``model`` (a transformers model or an adapter), once the model is of the family
    the checkpoint's RPN was trained for.

    Raises:
        CheckpointError: the checkpoint is another release (e.g. a LLaVA RPN for a Qwen2.5-VL model), or
            the family's RPN disagrees with their forward on the norm before the head.
        TypeError: a model of no family sdrpn supports.
    """
    adapter = adapter_for(model)
    layout = checkpoint.layout
    if adapter.family != layout.family:
        raise CheckpointError(f"{checkpoint.config_path} holds the authors' {layout.name} RPN (model_type "
                              f"{checkpoint.config.get('model_type')!r}), but --model is a {adapter.family} model; "
                              f"it converts for {layout.model_hint}")
    if adapter.rpn_uses_final_norm != layout.twig_norm:
        raise CheckpointError(f"the {adapter.family} RPN {'has' if adapter.rpn_uses_final_norm else 'has no'} norm "
                              f"before its head, their {layout.name} forward "
                              f"{'applies' if layout.twig_norm else 'does not apply'} twig_norm ({layout.source})")
    return adapter


def _their(config: dict, key: str):
    """A language-model setting of their config: at the top level (transformers 4.51's flat configs),
    else under ``text_config``."""
    if key in config:
        return config[key]
    text = config.get("text_config")
    return text.get(key) if isinstance(text, dict) else None


def _their_rope(config: dict) -> dict:
    """``rope_theta`` and ``mrope_section`` where their config states them (transformers 4.51 keeps
    ``rope_theta`` at the top level and ``mrope_section`` in ``rope_scaling``)."""
    rope = {}
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(_their(config, key), dict):
            rope.update(_their(config, key))
    if _their(config, "rope_theta") is not None:
        rope["rope_theta"] = _their(config, "rope_theta")
    return {key: list(rope[key]) if key == "mrope_section" else rope[key]
            for key in ("rope_theta", "mrope_section") if rope.get(key) is not None}


def _our_rope(text_config) -> dict:
    """The model's ``rope_theta`` and ``mrope_section`` (None where it has none)."""
    rope = dict(getattr(text_config, "rope_scaling", None) or {})
    rope.update(getattr(text_config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(text_config, "rope_theta", None))
    section = rope.get("mrope_section")
    return {"rope_theta": theta, "mrope_section": None if section is None else list(section)}


def check_sizes(checkpoint: AuthorsCheckpoint, adapter: ModelAdapter) -> None:
    """Refuses a checkpoint made for a language model of other sizes or rotary settings, or an RPN
    beyond its layers. Settings their config does not state are not compared."""
    config, text = checkpoint.config, adapter.text_config
    heads = _their(config, "num_attention_heads")
    ours = {"hidden_size": adapter.hidden_size, "intermediate_size": text.intermediate_size,
            "num_attention_heads": adapter.num_heads, "num_key_value_heads": adapter.num_kv_heads,
            "num_hidden_layers": adapter.num_layers}
    theirs = {key: _their(config, key) for key in ours}
    if theirs["num_key_value_heads"] is None:
        theirs["num_key_value_heads"] = heads
    problems = [f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ours if theirs[key] != ours[key]]
    eps = _their(config, "rms_norm_eps")
    if eps is not None and not math.isclose(eps, text.rms_norm_eps, rel_tol=1e-6):
        problems.append(f"rms_norm_eps {eps!r} there, {text.rms_norm_eps!r} here")
    our_rope = _our_rope(text)
    for key, value in _their_rope(config).items():
        mine = our_rope[key]
        same = (math.isclose(value, mine, rel_tol=1e-6) if key == "rope_theta" and mine is not None
                else value == mine)
        if not same:
            problems.append(f"{key} {value!r} there, {mine!r} here")
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
    pairs = {EMBEDDINGS: adapter.embed_tokens.weight}
    start = checkpoint.twig.start_layer
    if start > 0:
        pairs[BASE_LAYER_Q.format(layer=start - 1)] = adapter.layer(start - 1).self_attn.q_proj.weight
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


def _recorded_image_start(layout: Layout, processor, adapter: ModelAdapter) -> int | None:
    """Where the image tokens start under the layout's prompt for this processor (None without one)."""
    if processor is None:
        if layout.needs_processor:
            raise ValueError(f"converting the authors' {layout.name} RPN needs the model's processor: their model "
                             f"takes the image tokens to start at index {layout.image_start}, and the RPN records "
                             f"where this processor puts them under the {layout.prompt} template")
        return None
    return prompt_image_start(processor, template_named(layout.prompt), adapter)


def _cast_weights(rpn: RPN, dtype: torch.dtype) -> None:
    """Casts the RPN's weights (its whole state dict) to ``dtype``. Unlike ``rpn.to(dtype)`` this keeps
    the rotary embedding's inverse frequencies (buffers, not weights) as the model has them: rounded to
    bfloat16 they are off by up to 0.2%, which turns the fast rotations by about a radian a thousand
    positions in."""
    with torch.no_grad():
        for parameter in rpn.parameters():
            parameter.data = parameter.data.to(dtype)


def convert_rpn(checkpoint: AuthorsCheckpoint, model, processor=None, dtype: torch.dtype | None = None) -> RPN:
    """The RPN of ``checkpoint`` for ``model``, the model it was trained on.

    Args:
        checkpoint: the authors' checkpoint; its layout (``model_type``) says which model it needs
            (LLaVA-1.5: a llava-hf ``LlavaForConditionalGeneration``; Qwen2.5-VL:
            ``Qwen2_5_VLForConditionalGeneration``).
        processor: the model's processor, for where the image tokens start under the authors' prompt;
            required for LLaVA-1.5, optional for Qwen2.5-VL (without it nothing is recorded).
        dtype: dtype of the RPN's weights; None keeps the checkpoint's.

    Raises:
        CheckpointError: the checkpoint's RPN is for another family, sizes or base weights differ from
            the model's, or RPN tensors are missing or have other shapes.
        ValueError: no processor where the layout needs one.
    """
    adapter = check_model(checkpoint, adapter_for(model, processor))
    layout, twig = checkpoint.layout, checkpoint.twig
    check_sizes(checkpoint, adapter)
    check_base_weights(checkpoint, adapter)
    rpn = RPN.from_model(adapter, twig.start_layer, twig.num_blocks, threshold=layout.threshold,
                         thresholds=dict(layout.thresholds), prompt=layout.prompt,
                         image_start=_recorded_image_start(layout, processor, adapter), geometry=layout.geometry)
    expected = rpn.state_dict()
    names = {ours: authors_name(ours, twig.num_blocks - 1) for ours in expected}
    available = checkpoint.names
    missing = sorted(name for name in names.values() if name not in available)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        norm = " and model.twig_norm.weight" if layout.twig_norm else ""
        raise CheckpointError(f"{checkpoint.directory}: no tensor {missing[0]}{more}; config.json's "
                              f"twig_T={twig.num_blocks} promises model.twig_layers.0..{twig.num_blocks - 1}{norm}")
    tensors = checkpoint.read(names.values())
    for ours, theirs in names.items():
        if tensors[theirs].shape != expected[ours].shape:
            raise CheckpointError(f"{checkpoint.file_of(theirs)}: {theirs} has shape {tuple(tensors[theirs].shape)}, "
                                  f"expected {tuple(expected[ours].shape)}")
    _cast_weights(rpn, dtype or tensors[names["head_norm.weight"]].dtype)
    rpn.load_state_dict({ours: tensors[theirs] for ours, theirs in names.items()})
    rpn.config["converted_from"] = {"checkpoint": str(checkpoint.directory.resolve()), "release": layout.name,
                                    "config": twig.keys, "authors_image_start": layout.image_start}
    return rpn.eval()
