"""``sdrpn convert`` on the authors' Qwen2.5-VL release: the converted RPN scores image tokens exactly
as their forward does.

Their checkpoint, as their code writes it (YuHengsss/SD-RPN commit 00876ac, ``Qwen2.5-VL/``): their
copy of transformers 4.51's ``Qwen2_5_VLForConditionalGeneration`` (``qwen_src/qwen2_5_vl/
modeling_qwen2_5_vl.py``) saved with ``save_pretrained`` by ``merge_pruned_model.py`` (or, pruned, by
``qwen-vl-finetune/qwenvl/train/train_qwen.py:55-67``): the 4.51 flat config plus the twig keys
(``train_qwen.py:110-119``), the language model under ``model.*`` with the twig beside it
(``model.twig_layers.{i}``, initialised from layer K+i, :2483-2490; ``model.twig_norm``, :1108),
the vision tower under ``visual.*``, ``lm_head`` and ``twig_head`` (:1776), sharded safetensors with
their index.

The reference below is written from their forward: layers 0..K-1 of the frozen model (:1245-1277),
the twig layers but the last as full Qwen2 decoder layers with the model's causal mask and 3-D rotary
(:1279-1299; the layer :982-1062, its attention :668-771, MLP :595-608), the last twig layer's
``input_layernorm`` and biased q/k projections on every token (:1311-1312), M-RoPE on q and k at the
real 3-D positions (:1325-1329), the key heads repeated (:1330), the last query against the
``t*h*w/4`` tokens from the first image token (:1242, 1331-1332, 2065), and the mean over heads of
q.k/sqrt(head_dim) (:1333-1336). No ``twig_norm`` (:1302-1303). It uses plain tensor algebra on the
checkpoint's tensors, with transformers' own M-RoPE (``rotary_emb``, ``apply_rotary_pos_emb``,
``repeat_kv``) and 3-D positions (``get_rope_index``), not our modules.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

from sdrpn import RPN
from sdrpn.authors.checkpoint import AuthorsCheckpoint, CheckpointError
from sdrpn.authors.rpn_conversion import convert_rpn
from sdrpn.cli import main
from sdrpn.models import adapter_for

from helpers.authors_release import write_config
from helpers.tiny_qwen import IMAGE, qwen_images, qwen_inputs, tiny_qwen2_5_vl

K, T = 2, 3
SIZE = (224, 112)  # width, height: a 4 x 8 token grid
TEXT = ([5, 6, 7], [8, 9, 10, 11, 12])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2.5-VL and the directory it is saved in: (directory, model)."""
    model = tiny_qwen2_5_vl()
    directory = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(directory)
    return directory, model


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------------------------------
# Their checkpoint
# ------------------------------------------------------------------------------------------------


def their_config(model, start_layer: int, num_blocks: int) -> dict:
    """``config.json`` as transformers 4.51 saves their model (flat; ``rope_scaling`` as their
    config class rewrites it, ``configuration_qwen2_5_vl.py`` ~169-172) with the twig keys."""
    config, text, vision = model.config, model.config.text_config, model.config.vision_config
    rope = text.rope_parameters
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "num_hidden_layers": text.num_hidden_layers, "rms_norm_eps": text.rms_norm_eps, "hidden_act": "silu",
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "default", "mrope_section": list(rope["mrope_section"]), "rope_type": "default"},
        "max_position_embeddings": text.max_position_embeddings, "vocab_size": text.vocab_size,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": text.num_hidden_layers,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
        "use_cache": True, "attention_dropout": 0.0, "initializer_range": 0.02,
        "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
        "bos_token_id": 1, "eos_token_id": 2,
        "vision_config": {"depth": vision.depth, "hidden_size": vision.hidden_size,
                          "out_hidden_size": vision.out_hidden_size,
                          "intermediate_size": vision.intermediate_size, "num_heads": vision.num_heads,
                          "patch_size": vision.patch_size, "spatial_merge_size": vision.spatial_merge_size,
                          "temporal_patch_size": vision.temporal_patch_size, "window_size": vision.window_size,
                          "fullatt_block_indexes": list(vision.fullatt_block_indexes), "model_type": "qwen2_5_vl"},
        "enable_twig": True, "twig_K": start_layer, "twig_T": num_blocks, "roi_branch": True, "roi_source": "qk",
        "roi_loss": "bce", "roi_super_type": "v1", "roi_multi_head": True,
    }


def their_tensors(model, start_layer: int, num_blocks: int, noise: float = 0.05, seed: int = 0) -> dict:
    """Their state dict, in their module order (``visual``, ``model`` with ``embed_tokens``, ``layers``,
    ``norm``, ``twig_layers``, ``twig_norm``; ``lm_head``, ``twig_head``), bfloat16 (their ``--bf16``
    training). The twig layers are layers K..K+T-1 with noise (trained away from them); ``twig_norm``
    and ``twig_head`` keep their initial copies (nothing reads them, so training never moves them)."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    language = {name.removeprefix("model.language_model."): tensor for name, tensor in state.items()
                if name.startswith("model.language_model.")}
    tensors = {f"visual.{name.removeprefix('model.visual.')}": tensor for name, tensor in state.items()
               if name.startswith("model.visual.")}
    tensors.update({f"model.{name}": tensor for name, tensor in language.items()})
    for block in range(num_blocks):
        prefix = f"layers.{start_layer + block}."
        for name, tensor in language.items():
            if name.startswith(prefix):
                noisy = tensor + noise * tensor.std() * torch.randn(tensor.shape, generator=generator)
                tensors[f"model.twig_layers.{block}.{name.removeprefix(prefix)}"] = noisy
    tensors["model.twig_norm.weight"] = language["norm.weight"]
    tensors["lm_head.weight"] = state["lm_head.weight"]
    tensors["twig_head.weight"] = state["lm_head.weight"]
    return {name: tensor.detach().to(torch.bfloat16).clone().contiguous() for name, tensor in tensors.items()}


def write_their_checkpoint(directory, model, start_layer: int = K, num_blocks: int = T, sharded: bool = False,
                           config_changes: dict | None = None, drop=(), seed: int = 0) -> dict:
    """Writes their checkpoint; returns the tensors written. Sharded: two shards split inside the twig
    layers, and ``model.safetensors.index.json`` as ``save_pretrained`` writes it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = their_config(model, start_layer, num_blocks)
    write_config(directory, config, config_changes)
    tensors = {name: tensor for name, tensor in their_tensors(model, start_layer, num_blocks, seed=seed).items()
               if not any(name.startswith(prefix) for prefix in drop)}
    if not sharded:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return tensors
    names = list(tensors)
    cut = next(i for i, name in enumerate(names) if name.startswith("model.twig_layers.1."))
    weight_map = {}
    for number, part in enumerate((names[:cut], names[cut:]), start=1):
        file = f"model-{number:05d}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return tensors


# ------------------------------------------------------------------------------------------------
# Their RPN, written from their forward
# ------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def linear(x, w, name):
    out = x @ w[f"{name}.weight"].float().T
    return out + w[f"{name}.bias"].float() if f"{name}.bias" in w else out


def qwen2_layer(h, w, cos, sin, heads, kv_heads, eps):
    """One of their decoder layers on (S, D), causal, no padding; ``w`` maps its tensor names."""
    length, width = h.shape
    d = width // heads
    x = rms_norm(h, w["input_layernorm.weight"], eps)
    q = linear(x, w, "self_attn.q_proj").view(1, length, heads, d).transpose(1, 2)
    k = linear(x, w, "self_attn.k_proj").view(1, length, kv_heads, d).transpose(1, 2)
    v = linear(x, w, "self_attn.v_proj").view(1, length, kv_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
    scores = q @ k.transpose(2, 3) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(length, width)
    h = h + linear(attended, w, "self_attn.o_proj")
    x = rms_norm(h, w["post_attention_layernorm.weight"], eps)
    gate, up = linear(x, w, "mlp.gate_proj"), linear(x, w, "mlp.up_proj")
    return h + linear(torch.nn.functional.silu(gate) * up, w, "mlp.down_proj")


def their_map(tensors, model, hidden, inputs):
    """Their RPN score of the image tokens of one prompt; ``hidden`` (S, D) enters layer K."""
    text = model.config.text_config
    heads, kv_heads, eps = text.num_attention_heads, text.num_key_value_heads, text.rms_norm_eps

    def layer(i):
        prefix = f"model.twig_layers.{i}."
        return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}

    input_ids, grid = inputs["input_ids"], inputs["image_grid_thw"][0]
    positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == IMAGE).int(),
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    h = hidden.float()
    cos, sin = model.model.language_model.rotary_emb(h[None], positions)
    for i in range(T - 1):
        h = qwen2_layer(h, layer(i), cos, sin, heads, kv_heads, eps)
    last = layer(T - 1)
    x = rms_norm(h, last["input_layernorm.weight"], eps)
    length, d = x.shape[0], x.shape[1] // heads
    q = linear(x, last, "self_attn.q_proj").view(1, length, heads, d).transpose(1, 2)
    k = linear(x, last, "self_attn.k_proj").view(1, length, kv_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, heads // kv_heads)
    start = int(torch.where(input_ids[0] == IMAGE)[0][0])
    count = int(grid.prod()) // 4
    scores = q[:, :, -1:] @ k[:, :, start:start + count].transpose(2, 3) / math.sqrt(d)
    return scores.mean(dim=1)[0, 0]


def prompt(model):
    """One prompt with a non-square image, the hidden states entering layer K, and the image tokens."""
    inputs = qwen_inputs(qwen_images([SIZE]), [TEXT])
    _, rows, cols = inputs["image_grid_thw"][0].tolist()
    assert rows != cols
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[K][0]
    image = (inputs["input_ids"][0] == IMAGE).nonzero().flatten()
    return inputs, hidden, image


def our_map(rpn, model, inputs, hidden, image):
    adapter = adapter_for(model)
    vision = {name: inputs[name] for name in adapter.vision_input_names}
    with torch.no_grad():
        embedded = adapter.embed(inputs["input_ids"], vision, inputs["attention_mask"])
        return rpn(hidden[None], hidden.shape[0] - 1, image[None], position_ids=embedded.position_ids,
                   rope_position_ids=embedded.rope_position_ids)[0]


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["safetensors", "sharded-safetensors"])
def test_converted_rpn_scores_as_their_forward(tmp_path, capsys, tiny, sharded):
    directory, model = tiny
    tensors = write_their_checkpoint(tmp_path / "authors", model, sharded=sharded)
    status, out, err = run_cli(capsys, "convert", "--authors-checkpoint", tmp_path / "authors",
                               "--model", directory, "--out", tmp_path / "rpn")
    assert status == 0, err
    assert "Qwen2.5-VL RPN at K=2, T=3" in out and "prompt processor" in out
    assert "image start not recorded (no processor" in out and "threshold 0.25" in out

    rpn = RPN.from_pretrained(tmp_path / "rpn", model)
    function = convert_rpn(AuthorsCheckpoint(tmp_path / "authors"), model)  # the function, no processor
    for name, tensor in rpn.state_dict().items():
        assert torch.equal(function.state_dict()[name].float(), tensor.float()), name
    # bfloat16 weights, but the M-RoPE frequencies as the model has them (rounded, they would shift the map)
    assert function.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(function.rotary_emb.inv_freq, model.model.language_model.rotary_emb.inv_freq)

    inputs, hidden, image = prompt(model)
    expected = their_map(tensors, model, hidden, inputs)
    logits = our_map(rpn, model, inputs, hidden, image)
    fresh = our_map(RPN.from_model(model, K, T), model, inputs, hidden, image)
    scale = expected.abs().max()
    assert logits.shape == expected.shape == (image.numel(),)
    torch.testing.assert_close(logits, expected, atol=1e-4 * scale, rtol=1e-4)
    assert (fresh - expected).abs().max() > 0.05 * scale  # the twig weights were trained away from the layers

    config = json.loads((tmp_path / "rpn" / "config.json").read_text())
    assert (config["start_layer"], config["num_blocks"]) == (K, T)
    assert config["family"] == "qwen2_5_vl" and config["use_rope"] is True and config["use_final_norm"] is False
    assert "norm.weight" not in rpn.state_dict()  # their head reads no twig_norm
    assert config["prompt"]["name"] == "processor" and config["geometry"] is None
    assert config["image_start"] is None  # no processor: not recorded; their model finds it in the ids
    assert config["threshold"] == 0.25 and config["thresholds"] == {}
    assert config["dtype"] == "torch.bfloat16"
    source = config["converted_from"]
    assert source["release"] == "Qwen2.5-VL" and source["authors_image_start"] is None
    assert (source["config"]["twig_K"], source["config"]["twig_T"]) == (K, T)
    assert source["checkpoint"] == str((tmp_path / "authors").resolve())


def test_the_pruned_training_output_converts(tmp_path, tiny):
    """Before merge_pruned_model.py: layers from K+T on pruned (modeling_qwen2_5_vl.py:2500-2503);
    say the final norm and LM heads are gone too. The RPN reads none of them."""
    _, model = tiny
    layers = model.config.text_config.num_hidden_layers
    pruned = tuple(f"model.layers.{i}." for i in range(K + T, layers))
    write_their_checkpoint(tmp_path / "pruned", model, drop=(*pruned, "model.norm.", "lm_head.", "twig_head."))
    write_their_checkpoint(tmp_path / "full", model)
    converted, reference = (convert_rpn(AuthorsCheckpoint(tmp_path / name), model) for name in ("pruned", "full"))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor)


def test_only_the_needed_tensors_are_read(tmp_path, tiny, monkeypatch):
    _, model = tiny
    write_their_checkpoint(tmp_path / "authors", model, sharded=True)
    checkpoint = AuthorsCheckpoint(tmp_path / "authors")
    requested = []
    read = AuthorsCheckpoint.read
    monkeypatch.setattr(AuthorsCheckpoint, "read", lambda self, names: requested.extend(names) or read(self, names))
    convert_rpn(checkpoint, model)
    base = [name for name in requested if not name.startswith("model.twig_layers.")]
    assert sorted(base) == ["model.embed_tokens.weight", f"model.layers.{K - 1}.self_attn.q_proj.weight"]
    last = f"model.twig_layers.{T - 1}."
    assert sorted(name for name in requested if name.startswith(last)) == sorted(
        f"{last}{name}" for name in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                                     "self_attn.k_proj.weight", "self_attn.k_proj.bias"))


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the mismatch
# ------------------------------------------------------------------------------------------------


def assert_refused(capsys, tmp_path, model_dir, *fragments, absent=()):
    status, _, err = run_cli(capsys, "convert", "--authors-checkpoint", tmp_path / "authors", "--model", model_dir,
                             "--out", tmp_path / "rpn")
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    for fragment in absent:
        assert fragment not in err, err
    assert not (tmp_path / "rpn").exists()


@pytest.mark.parametrize("changes, fragments", [
    ({"hidden_size": 128}, ["hidden_size 128 there, 64 here"]),
    ({"num_key_value_heads": 4, "num_hidden_layers": 8}, ["num_key_value_heads 4 there, 2 here",
                                                         "num_hidden_layers 8 there, 6 here"]),
    ({"rope_theta": 10000.0}, ["rope_theta 10000.0 there, 1000000.0 here"]),
    ({"rope_scaling": {"type": "default", "mrope_section": [4, 2, 2], "rope_type": "default"}},
     ["mrope_section [4, 2, 2] there, [2, 3, 3] here"]),
    ({"twig_K": 4}, ["twig_K + twig_T = 7 goes beyond the model's 6 layers"]),
    ({"enable_twig": None}, ["enable_twig is None, expected true"]),
    ({"twig_K": "16"}, ["twig_K is '16', expected an integer >= 0"]),
    ({"roi_multi_head": None}, ["roi_multi_head is False (their default when absent)", "modeling_qwen2_5_vl.py"]),
    ({"roi_source": "hidden_states"}, ["roi_source is 'hidden_states'", "every twig layer runs in full"]),
    ({"roi_super_type": "lazy"}, ["roi_super_type is 'lazy'"]),
    ({"roi_loss": "mse"}, ["roi_loss is 'mse'", "softmax"]),
    ({"model_type": "qwen2_vl"},
     ["model_type is 'qwen2_vl'", "'qwen2_5_vl' (Qwen2.5-VL)", "'llava_llama' (LLaVA-1.5)"]),
])
def test_config_mismatches_are_refused(tmp_path, capsys, tiny, changes, fragments):
    write_their_checkpoint(tmp_path / "authors", tiny[1], config_changes=changes)
    assert_refused(capsys, tmp_path, tiny[0], "config.json", *fragments)


def test_base_weights_of_another_model_are_refused(tmp_path, capsys, tiny):
    write_their_checkpoint(tmp_path / "authors", tiny_qwen2_5_vl(seed=1))
    assert_refused(capsys, tmp_path, tiny[0], "model.embed_tokens.weight differs from the model's",
                   "trained on another checkpoint than --model")


def test_other_layer_below_k_is_refused(tmp_path, tiny):
    from safetensors.torch import save_file

    _, model = tiny
    tensors = write_their_checkpoint(tmp_path / "authors", model)
    name = f"model.layers.{K - 1}.self_attn.q_proj.weight"
    tensors[name] = torch.randn_like(tensors[name].float()).to(torch.bfloat16)
    save_file(tensors, tmp_path / "authors" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model.safetensors: {name} differs"):
        convert_rpn(AuthorsCheckpoint(tmp_path / "authors"), model)


def test_missing_twig_tensors_are_named(tmp_path, capsys, tiny):
    write_their_checkpoint(tmp_path / "authors", tiny[1], sharded=True,
                           drop=(f"model.twig_layers.{T - 1}.self_attn.k_proj.bias", "model.twig_layers.0.mlp.up_proj"))
    assert_refused(capsys, tmp_path, tiny[0], "no tensor model.twig_layers.0.mlp.up_proj.weight and 1 more",
                   "twig_T=3 promises model.twig_layers.0..2", absent=("twig_norm",))


def test_a_llava_checkpoint_is_refused_for_a_qwen_model(tmp_path, capsys, tiny):
    from helpers.authors_release import write_authors_checkpoint
    from helpers.tiny_models import tiny_llava

    llava, processor = tiny_llava()
    write_authors_checkpoint(tmp_path / "authors", llava, K, T)
    assert_refused(capsys, tmp_path, tiny[0], "holds the authors' LLaVA-1.5 RPN (model_type 'llava_llama')",
                   "--model is a qwen2_5_vl model", "llava-hf LLaVA-1.5")
    with pytest.raises(CheckpointError, match="LLaVA-1.5 RPN"):
        convert_rpn(AuthorsCheckpoint(tmp_path / "authors"), tiny[1], processor)


def test_a_qwen_checkpoint_is_refused_for_a_llava_model(tmp_path, capsys, tiny):
    from helpers.tiny_models import save_tiny_llava, tiny_llava

    write_their_checkpoint(tmp_path / "authors", tiny[1])
    llava_dir = save_tiny_llava(tmp_path / "llava")
    assert_refused(capsys, tmp_path, llava_dir, "holds the authors' Qwen2.5-VL RPN (model_type 'qwen2_5_vl')",
                   "--model is a llava model", "Qwen2_5_VLForConditionalGeneration")
    llava, processor = tiny_llava()
    with pytest.raises(CheckpointError, match="Qwen2.5-VL RPN"):
        convert_rpn(AuthorsCheckpoint(tmp_path / "authors"), llava, processor)
