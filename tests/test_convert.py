"""``sdrpn convert``: the authors' RPN, converted, scores image tokens exactly as their forward does.

The reference below is written from their code (YuHengsss/SD-RPN commit 00876ac,
``LLaVA/llava/llm_src/llama_src.py``): layers 0..K-1 of the frozen model (:1250-1285), the twig
layers but the last as full LLaMA layers (:1310-1330), ``twig_norm`` (:1331-1332), the last twig
layer's ``input_layernorm`` and q/k projections on the last prompt token and the image tokens
(:1340-1343), and the mean over heads of q.k/sqrt(head_dim) (:1347-1356). It uses plain tensor
algebra on the checkpoint's tensors, not our modules.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from sdrpn import RPN
from sdrpn.authors.checkpoint import AuthorsCheckpoint, CheckpointError
from sdrpn.authors.rpn_conversion import convert_rpn
from sdrpn.cli import main
from sdrpn.prompts import template_named
from sdrpn.roi import THRESHOLDS

from helpers.authors_release import LAYOUTS, write_authors_checkpoint
from helpers.tiny_models import save_tiny_llava

K, T = 2, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny llava-hf model, loaded back: (directory, model, processor)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    directory = save_tiny_llava(tmp_path_factory.mktemp("model"))
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    return directory, model, AutoProcessor.from_pretrained(directory)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------------------------------
# Their RPN, written from their forward
# ------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, positions, theta):
    """LLaMA's rotary embedding on (heads, S, d)."""
    dim = x.shape[-1]
    inverse = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions[:, None].float() * inverse[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1)
    return x * cos + half * sin


def llama_layer(h, w, heads, eps, theta):
    """One LLaMA decoder layer on (S, D), causal, no padding; ``w`` maps its tensor names."""
    length, width = h.shape
    d = width // heads
    x = rms_norm(h, w["input_layernorm.weight"], eps)
    q, k, v = (x @ w[f"self_attn.{p}_proj.weight"].float().T for p in "qkv")
    q, k, v = (t.view(length, heads, d).transpose(0, 1) for t in (q, k, v))
    positions = torch.arange(length)
    q, k = rotate(q, positions, theta), rotate(k, positions, theta)
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, width)
    h = h + attended @ w["self_attn.o_proj.weight"].float().T
    x = rms_norm(h, w["post_attention_layernorm.weight"], eps)
    gate, up = x @ w["mlp.gate_proj.weight"].float().T, x @ w["mlp.up_proj.weight"].float().T
    return h + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].float().T


def authors_rpn_logits(tensors, hidden, image_start, image_tokens, heads, eps, theta):
    """Their RPN score of every image token for one prompt; ``hidden`` (S, D) enters layer K."""
    def layer(i):
        prefix = f"model.twig_layers.{i}."
        return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}

    h = hidden.float()
    for i in range(T - 1):
        h = llama_layer(h, layer(i), heads, eps, theta)
    h = rms_norm(h, tensors["model.twig_norm.weight"], eps)
    last = layer(T - 1)
    h = rms_norm(h, last["input_layernorm.weight"], eps)
    q = h[-1:] @ last["self_attn.q_proj.weight"].float().T
    k = h[image_start:image_start + image_tokens] @ last["self_attn.k_proj.weight"].float().T
    d = q.shape[-1] // heads
    qh, kh = q.view(1, heads, d).transpose(0, 1), k.view(-1, heads, d).transpose(0, 1)
    return ((qh @ kh.transpose(1, 2)) / math.sqrt(d)).mean(0)[0]


def prompt_inputs(model, processor):
    prompt = template_named("vicuna_v1").render("What is written on the sign?", processor)
    image = Image.new("RGB", (160, 120), (200, 40, 40))
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[K][0]
    start = int((inputs["input_ids"][0] == model.config.image_token_id).int().argmax())
    return hidden, start


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_rpn_scores_as_their_forward(tmp_path, capsys, tiny, layout):
    directory, model, processor = tiny
    tensors = write_authors_checkpoint(tmp_path / "authors", model, K, T, layout=layout)
    status, out, err = run_cli(capsys, "convert", "--authors-checkpoint", tmp_path / "authors",
                               "--model", directory, "--out", tmp_path / "rpn")
    assert status == 0, err
    assert "K=2, T=3" in out and "vicuna_v1" in out

    rpn = RPN.from_pretrained(tmp_path / "rpn", model)
    hidden, start = prompt_inputs(model, processor)
    text = model.config.text_config
    grid = rpn.image_grid[0] * rpn.image_grid[1]
    expected = authors_rpn_logits(tensors, hidden, start, grid, text.num_attention_heads, text.rms_norm_eps,
                                  text.rope_parameters["rope_theta"])
    with torch.no_grad():
        logits = rpn(hidden[None], hidden.shape[0] - 1, torch.tensor([start]))[0]
        fresh = RPN.from_model(model, K, T)(hidden[None], hidden.shape[0] - 1, torch.tensor([start]))[0]
    scale = expected.abs().max()
    assert torch.allclose(logits, expected, atol=1e-4 * scale, rtol=1e-4)
    assert (fresh - expected).abs().max() > 0.05 * scale  # the twig weights were trained away from the layers

    config = json.loads((tmp_path / "rpn" / "config.json").read_text())
    assert (config["start_layer"], config["num_blocks"]) == (K, T)
    assert config["prompt"]["name"] == "vicuna_v1" and config["geometry"] == "pad"
    assert config["image_start"] == start  # where the engine's processed prompt puts the image
    assert config["threshold"] == 0.15 and config["thresholds"] == THRESHOLDS
    assert config["dtype"] == "torch.bfloat16"  # their stored dtype, kept
    source = config["converted_from"]
    assert source["config"]["twig_K"] == K and source["config"]["twig_T"] == T
    assert source["checkpoint"] == str((tmp_path / "authors").resolve())


def test_a_pruned_checkpoint_converts(tmp_path, tiny):
    """Their 13B release as downloaded: layers from K+T on, the final norm and the LM head were
    pruned in training (llava_llama.py:217-220, 233, 245) and are filled in by migrate_weights.py."""
    _, model, processor = tiny
    layers = model.config.text_config.num_hidden_layers
    pruned = tuple(f"model.layers.{i}.{name}" for i in range(K + T, layers)
                   for name in dict(model.model.language_model.layers[i].named_parameters()))
    write_authors_checkpoint(tmp_path / "authors", model, K, T, drop=(*pruned, "model.norm.weight", "lm_head.weight"))
    full = tmp_path / "full"
    write_authors_checkpoint(full, model, K, T)
    converted, reference = (convert_rpn(AuthorsCheckpoint(path), model, processor)
                            for path in (tmp_path / "authors", full))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor)


def test_dtype_option_sets_the_saved_weights(tmp_path, capsys, tiny):
    directory, model, _ = tiny
    write_authors_checkpoint(tmp_path / "authors", model, K, T)
    status, _, err = run_cli(capsys, "convert", "--authors-checkpoint", tmp_path / "authors", "--model", directory,
                             "--out", tmp_path / "rpn", "--dtype", "fp32")
    assert status == 0, err
    assert json.loads((tmp_path / "rpn" / "config.json").read_text())["dtype"] == "torch.float32"


def test_only_the_needed_tensors_are_read(tmp_path, tiny, monkeypatch):
    _, model, processor = tiny
    write_authors_checkpoint(tmp_path / "authors", model, K, T, layout="sharded-safetensors")
    checkpoint = AuthorsCheckpoint(tmp_path / "authors")
    requested = []
    read = AuthorsCheckpoint.read
    monkeypatch.setattr(AuthorsCheckpoint, "read", lambda self, names: requested.extend(names) or read(self, names))
    convert_rpn(checkpoint, model, processor)
    base = [name for name in requested if not name.startswith(("model.twig_layers.", "model.twig_norm."))]
    assert sorted(base) == ["model.embed_tokens.weight", f"model.layers.{K - 1}.self_attn.q_proj.weight"]
    assert not any(f"twig_layers.{T - 1}.mlp" in name or f"twig_layers.{T - 1}.self_attn.v_proj" in name
                   for name in requested)


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the mismatch
# ------------------------------------------------------------------------------------------------


def assert_refused(capsys, tmp_path, model_dir, *fragments):
    status, _, err = run_cli(capsys, "convert", "--authors-checkpoint", tmp_path / "authors", "--model", model_dir,
                             "--out", tmp_path / "rpn")
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "rpn").exists()


@pytest.mark.parametrize("changes, fragments", [
    ({"hidden_size": 128}, ["hidden_size 128 there, 64 here"]),
    ({"num_hidden_layers": 8, "intermediate_size": 256}, ["intermediate_size 256 there, 128 here",
                                                          "num_hidden_layers 8 there, 6 here"]),
    ({"twig_K": 4}, ["twig_K + twig_T = 7 goes beyond the model's 6 layers"]),
    ({"enable_twig": False}, ["enable_twig is False, expected true"]),
    ({"twig_T": None}, ["twig_T is None, expected an integer >= 1"]),
    ({"roi_multi_head": None}, ["roi_multi_head is False (their default when absent)"]),
    ({"roi_super_type": "lazy"}, ["roi_super_type is 'lazy'"]),
    ({"roi_loss": "mse"}, ["roi_loss is 'mse'"]),
])
def test_config_mismatches_are_refused(tmp_path, capsys, tiny, changes, fragments):
    write_authors_checkpoint(tmp_path / "authors", tiny[1], K, T, config_changes=changes)
    assert_refused(capsys, tmp_path, tiny[0], "config.json", *fragments)


def test_base_weights_of_another_model_are_refused(tmp_path, capsys, tiny):
    from helpers.tiny_models import tiny_llava

    other, _ = tiny_llava(seed=1)
    write_authors_checkpoint(tmp_path / "authors", other, K, T)
    assert_refused(capsys, tmp_path, tiny[0], "model.embed_tokens.weight differs from the model's",
                   "trained on another checkpoint than --model")


def test_other_layer_below_k_is_refused(tmp_path, tiny):
    _, model, processor = tiny
    tensors = write_authors_checkpoint(tmp_path / "authors", model, K, T, layout="bin")
    name = f"model.layers.{K - 1}.self_attn.q_proj.weight"
    tensors[name] = torch.randn_like(tensors[name].float()).to(torch.bfloat16)
    torch.save(tensors, tmp_path / "authors" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"pytorch_model.bin: {name} differs"):
        convert_rpn(AuthorsCheckpoint(tmp_path / "authors"), model, processor)


@pytest.mark.parametrize("layout", ["safetensors", "bin-shards"])
def test_missing_twig_tensors_are_named(tmp_path, capsys, tiny, layout):
    write_authors_checkpoint(tmp_path / "authors", tiny[1], K, T, layout=layout,
                             drop=("model.twig_norm.weight", f"model.twig_layers.{T - 1}.self_attn.k_proj.weight"))
    assert_refused(capsys, tmp_path, tiny[0], f"no tensor model.twig_layers.{T - 1}.self_attn.k_proj.weight and 1 more",
                   "twig_T=3 promises")


def test_missing_weights_and_shards_are_named(tmp_path, capsys, tiny):
    write_authors_checkpoint(tmp_path / "authors", tiny[1], K, T, layout="sharded-safetensors")
    (tmp_path / "authors" / "model-00002-of-00002.safetensors").unlink()
    assert_refused(capsys, tmp_path, tiny[0], "model-00002-of-00002.safetensors not found")
    for path in (tmp_path / "authors").iterdir():
        if path.name != "config.json":
            path.unlink()
    assert_refused(capsys, tmp_path, tiny[0], "no weights found", "model.safetensors.index.json")
    (tmp_path / "authors" / "config.json").unlink()
    assert_refused(capsys, tmp_path, tiny[0], "config.json not found")


class Payload:
    """Any object that is not a tensor: a pickle may carry code with it."""


def test_bin_with_non_tensor_objects_is_refused_under_weights_only(tmp_path, capsys, tiny):
    tensors = write_authors_checkpoint(tmp_path / "authors", tiny[1], K, T, layout="bin")
    torch.save({**tensors, "extra": Payload()}, tmp_path / "authors" / "pytorch_model.bin")
    assert_refused(capsys, tmp_path, tiny[0], "pytorch_model.bin: refused by torch.load(weights_only=True)")


def test_a_model_that_is_not_llava_is_refused(tmp_path, capsys, tiny):
    write_authors_checkpoint(tmp_path / "authors", tiny[1], K, T)
    (tmp_path / "not-a-model").mkdir()
    assert_refused(capsys, tmp_path, tmp_path / "not-a-model", "--model", "no config.json")
