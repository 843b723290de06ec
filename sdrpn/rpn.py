"""The SD-RPN region proposal network: a few decoder blocks of the MLLM and a q/k scoring head.

The RPN reads the hidden states entering layer K of the frozen MLLM (the "backbone" is layers
0..K-1, shared with the normal prefill) and scores every image token against the query token:

    h = blocks(h)                         # copies of decoder layers K .. K+T-2 (trainable)
    h = head_norm(norm(h))                # a copy of the final norm (LLaVA), the input norm of layer K+T-1
    q = q_proj(h[query]);  k = k_proj(h[image tokens])   # the q/k projections of layer K+T-1
    logit[n] = mean_h (q_h . k_h[n]) / sqrt(head_dim)     # no RoPE for LLaVA

Checkpoints follow the transformers convention: ``save_pretrained(dir)`` writes ``config.json`` and
``model.safetensors`` (RPN weights only); ``RPN.from_pretrained(dir, model)`` rebuilds it on a
model and refuses a model of another architecture or another checkpoint.

Thresholds: ``threshold`` is the RoI threshold used by default (the authors' 0.15 for LLaVA-1.5);
``calibrated_threshold`` is the one ``sdrpn train`` chose on held-out labels, used only when asked
for (``threshold="calibrated"``). Configs written before the two were kept apart hold the
calibrated one as ``threshold``; they load with the default threshold and that calibrated one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import ops
from .models import ModelAdapter, adapter_for
from .prompts import PROCESSOR_TEMPLATE, PromptTemplate, template_named
from .models.base import apply_rotary, decoder_attention_mask, default_position_ids, run_decoder_layers

__all__ = ["RPN", "CONFIG_NAME", "WEIGHTS_NAME", "DEFAULT_THRESHOLD", "CALIBRATED"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "sdrpn-rpn"
FORMAT_VERSION = 1
# Tolerance of the weight signature: the base model loaded in another dtype (bf16 rounding) passes,
# another checkpoint does not.
SIGNATURE_RTOL = 1e-2
# The authors' RoI threshold outside the benchmarks they tuned (lmms-eval's roi_conf_thresh=0.15).
DEFAULT_THRESHOLD = 0.15
# The threshold value that selects the RPN's calibrated threshold.
CALIBRATED = "calibrated"


def _fingerprint(facts: dict) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _weight_signature(adapter: ModelAdapter, start_layer: int) -> list[float]:
    """Sixteen fixed entries of each frozen weight the RPN builds on (the embeddings and the q
    projection of layer K-1): equal up to dtype rounding for the same checkpoint, unrelated for
    another one."""
    tensors = [adapter.embed_tokens.weight]
    if start_layer > 0:
        tensors.append(adapter.layer(start_layer - 1).self_attn.q_proj.weight)
    values = []
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.detach().flatten()
            picks = torch.linspace(0, flat.numel() - 1, 16, device=flat.device).long()
            values += flat[picks].float().cpu().tolist()
    return values


def _atomic_write(path: Path, write) -> None:
    """Writes through a temporary file in the same directory, then renames it into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class RPN(nn.Module):
    """Region proposal network over the image tokens of one MLLM.

    Build it with :meth:`from_model` (weights copied from the model) or :meth:`from_pretrained`.

    Attributes:
        start_layer: K, the model layer whose input the RPN reads.
        num_blocks: T, decoder layers spanned (T - 1 full blocks + the q/k head of layer K+T-1).
        threshold: default RoI threshold of this RPN (the family's, ``adapter.default_threshold``,
            unless set: 0.15 for LLaVA-1.5).
        calibrated_threshold: the threshold calibrated on held-out labels by ``sdrpn train``, or None.
        config: the JSON-serialisable configuration written to ``config.json``.
    """

    def __init__(self, adapter: ModelAdapter, start_layer: int, num_blocks: int,
                 threshold: float | None = None, thresholds: dict | None = None, labels: dict | None = None,
                 prompt=None, image_start: int | None = None, geometry: str | None = None,
                 calibrated_threshold: float | None = None):
        super().__init__()
        adapter = adapter_for(adapter)
        if threshold is None:  # the family's released setting (0.15 for LLaVA-1.5, 0.25 for Qwen2.5-VL)
            threshold = adapter.default_threshold
        if num_blocks < 1:
            raise ValueError(f"num_blocks (T) must be >= 1, got {num_blocks}")
        if not 0 <= start_layer or start_layer + num_blocks > adapter.num_layers:
            raise ValueError(
                f"layers K={start_layer} .. K+T-1={start_layer + num_blocks - 1} must lie in the model's "
                f"{adapter.num_layers} layers"
            )
        for name, value in (("threshold", threshold), ("calibrated_threshold", calibrated_threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if geometry not in (None, "pad", "crop"):
            raise ValueError(f"geometry must be 'pad', 'crop' or None, got {geometry!r}")
        self.start_layer = start_layer
        self.num_blocks = num_blocks
        self.threshold = float(threshold)
        self.calibrated_threshold = None if calibrated_threshold is None else float(calibrated_threshold)
        self.num_heads = adapter.num_heads
        self.num_kv_heads = adapter.num_kv_heads
        self.head_dim = adapter.head_dim
        self.use_rope = adapter.rpn_uses_rope
        self.image_grid = tuple(adapter.image_grid)

        self.blocks = nn.ModuleList(copy.deepcopy(adapter.layer(i)) for i in range(start_layer, start_layer + num_blocks - 1))
        head_layer = adapter.layer(start_layer + num_blocks - 1)
        # A copy of the final norm before the head where the family's RPN has one (LLaVA), else nothing.
        self.norm = copy.deepcopy(adapter.final_norm) if adapter.rpn_uses_final_norm else nn.Identity()
        self.head_norm = copy.deepcopy(head_layer.input_layernorm)
        self.q_proj = copy.deepcopy(head_layer.self_attn.q_proj)
        self.k_proj = copy.deepcopy(head_layer.self_attn.k_proj)
        # Per-head q/k norms before RoPE where the layer has them (Qwen3); None otherwise.
        self.q_norm = copy.deepcopy(getattr(head_layer.self_attn, "q_norm", None))
        self.k_norm = copy.deepcopy(getattr(head_layer.self_attn, "k_norm", None))
        self.rotary_emb = copy.deepcopy(adapter.rotary_emb)
        self._attention_config = adapter.text_config

        facts = adapter.config_fingerprint()
        self.config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": adapter.family,
            "base_model": {**facts, "fingerprint": _fingerprint(facts)},
            "weight_signature": _weight_signature(adapter, start_layer),
            "start_layer": start_layer,
            "num_blocks": num_blocks,
            "use_final_norm": adapter.rpn_uses_final_norm,
            "use_rope": self.use_rope,
            "threshold": self.threshold,
            "calibrated_threshold": self.calibrated_threshold,
            "thresholds": dict(thresholds or {}),
            "labels": dict(labels or {}),
            # What the RPN was trained with: the prompt (and where its image tokens start) and the
            # base view's geometry. None: not recorded (checkpoints from before these were kept).
            "prompt": template_named(prompt).to_dict() if prompt is not None else None,
            "image_start": image_start,
            "geometry": geometry,
        }

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, start_layer: int, num_blocks: int, **options) -> RPN:
        """An RPN initialised from layers K..K+T-1 of ``model`` (a HF model or an adapter).

        Options: ``threshold`` (default RoI threshold), ``calibrated_threshold``, ``thresholds``
        (per-benchmark presets), ``labels`` (the label settings
        it was trained with), ``prompt`` (template name, dict or :class:`~sdrpn.prompts.PromptTemplate`),
        ``image_start`` (the first image token's index under that template), ``geometry`` ("pad" or
        "crop", the base view); all stored in ``config.json``.
        """
        return cls(adapter_for(model), start_layer, num_blocks, **options)

    @property
    def prompt_template(self) -> PromptTemplate:
        """The template the RPN was trained with (the processor's chat template when not recorded)."""
        return template_named(self.config["prompt"] or PROCESSOR_TEMPLATE)

    @property
    def geometry(self) -> str | None:
        """"pad" or "crop": the base view the RPN was trained on (None: not recorded)."""
        return self.config["geometry"]

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        hidden: torch.Tensor,
        query_index: torch.Tensor | int,
        image_positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        rope_position_ids: torch.Tensor | None = None,
        image_lengths: torch.Tensor | Sequence[int] | None = None,
        question_start: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RoI logits of the image tokens.

        Args:
            hidden: (B, S, hidden) states entering layer K (the output of layer K-1); the sequence may
                stop at the query token, later tokens are never needed.
            query_index: (B,) tensor or int index of the query token (the last prompt token).
            image_positions: (B, N) indices of the N image tokens (N = grid H * W), or (B,) index of the
                first of N contiguous image tokens.
            attention_mask: (B, S) 1/True for real tokens (padding anywhere); None: no padding.
            position_ids: (B, S) positions; by default counted over the real tokens.
            rope_position_ids: (P, B, S) rotary positions where they are not ``position_ids``
                (multi-axis RoPE, see :mod:`sdrpn.models.base`).
            image_lengths: (B,) image tokens of each sample, when they differ (views of their own
                grid) and ``image_positions`` is the (B,) first index: N is then the largest, and a
                sample's logits beyond its own count are -inf. A tensor or host ints: N sizes the
                output, so a tensor's largest count is read on the host (a graph break under
                ``torch.compile``), which host ints spare.
            question_start: where the question's tokens start (the same index in every row); given,
                the scores of every real token from there on against the image tokens are returned too.

        Returns:
            (B, N) float32 logits, differentiable in training; with ``question_start``, also (B, N)
            each image token's highest score from a question token (the authors' Qwen2.5-VL pruning
            score, ``modeling_qwen2_5_vl.py`` ~1338-1347).
        """
        if hidden.ndim != 3 or hidden.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"hidden must be (B, S, {self.q_proj.in_features}), got {tuple(hidden.shape)}")
        batch, length, _ = hidden.shape
        device = hidden.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if position_ids is None:
            position_ids = (default_position_ids(attention_mask) if attention_mask is not None
                            else torch.arange(length, device=device).expand(batch, length))
        if isinstance(query_index, int):  # a fill on the device, not a host-to-device copy
            query_index = torch.full((batch,), query_index, dtype=torch.long, device=device)
        query_index = query_index.to(device).expand(batch)
        image_positions = image_positions.to(device)
        beyond = None
        if image_positions.ndim == 1:
            if image_lengths is None:
                offsets = torch.arange(self.image_grid[0] * self.image_grid[1], device=device)
            else:
                longest = int(image_lengths.max()) if torch.is_tensor(image_lengths) else max(image_lengths)
                image_lengths = torch.as_tensor(image_lengths, device=device)
                offsets = torch.arange(longest, device=device)
                beyond = offsets >= image_lengths[:, None]
                offsets = torch.minimum(offsets, image_lengths[:, None] - 1)  # a real token, scored then masked
            image_positions = image_positions[:, None] + offsets

        rotary = None
        if len(self.blocks) or self.use_rope:
            rotary = self.rotary_emb(hidden, position_ids if rope_position_ids is None else rope_position_ids)
        if len(self.blocks):
            layer_mask = decoder_attention_mask(
                self._attention_config._attn_implementation or "eager", attention_mask, length, length,
                hidden.dtype, device,
            )
            hidden = run_decoder_layers(self.blocks, hidden, rotary, layer_mask, position_ids)
        hidden = self.head_norm(self.norm(hidden))
        q = self._project(self.q_proj, self.q_norm, hidden, query_index[:, None], rotary)  # (B, 1, heads * d)
        k = self._project(self.k_proj, self.k_norm, hidden, image_positions, rotary)
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: one key head per query group
            k = k.view(batch, -1, self.num_kv_heads, self.head_dim)
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2).flatten(2)
        scores = self.score(q, k)
        if beyond is not None:
            scores = scores.masked_fill(beyond, float("-inf"))
        if question_start is None:
            return scores
        questions = torch.arange(question_start, length, device=device).expand(batch, -1)
        per_query = self._scores_per_query(self._project(self.q_proj, self.q_norm, hidden, questions, rotary), k)
        if attention_mask is not None:  # padding is no question token
            per_query = per_query.masked_fill(~attention_mask[:, question_start:, None], float("-inf"))
        best = per_query.amax(dim=1)
        return scores, best if beyond is None else best.masked_fill(beyond, float("-inf"))

    def _project(self, projection: nn.Module, norm: nn.Module | None, hidden: torch.Tensor, index: torch.Tensor,
                 rotary) -> torch.Tensor:
        """(B, n, heads * head_dim) projections of the tokens at ``index`` (B, n), per-head normed and
        rotated by their own positions where the family does so."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        x = projection(hidden[rows, index])
        if norm is not None:
            x = _per_head(norm, x, self.head_dim)
        if self.use_rope:  # the rotations of each token's own position, as its layer would apply them
            cos, sin = rotary
            x = _rotated(x, cos[rows, index], sin[rows, index], self.head_dim)
        return x

    def _scores_per_query(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, Q, N) mean over heads of scaled q.k for (B, Q, heads * d) queries and (B, N, heads * d) keys."""
        batch = q.shape[0]
        qh = q.view(batch, q.shape[1], self.num_heads, self.head_dim).float()
        kh = k.view(batch, k.shape[1], self.num_heads, self.head_dim).float()
        return torch.einsum("bqhd,bnhd->bqn", qh, kh) / (self.num_heads * self.head_dim**0.5)

    def score(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, N) mean over heads of scaled q.k: the compiled op, or plain PyTorch under autograd."""
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            batch = q.shape[0]
            qh = q.view(batch, q.shape[1], self.num_heads, self.head_dim).float()
            kh = k.view(batch, k.shape[1], self.num_heads, self.head_dim).float()
            return torch.einsum("bqhd,bnhd->bn", qh, kh) / (self.num_heads * q.shape[1] * self.head_dim**0.5)
        return ops.rpn_scores(q, k, self.num_heads)

    # -- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, directory) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` (RPN weights only) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"}))
        config = {**self.config, "threshold": self.threshold, "calibrated_threshold": self.calibrated_threshold,
                  "dtype": str(next(self.parameters()).dtype)}
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        _atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(text))
        return directory

    @classmethod
    def from_pretrained(cls, directory, model) -> RPN:
        """Loads an RPN saved with :meth:`save_pretrained` onto ``model`` (HF model or adapter).

        The RPN takes the model's device and dtype. Only safetensors are read, never pickles.

        Raises:
            FileNotFoundError: the directory lacks ``config.json`` or ``model.safetensors``.
            ValueError: the files are not an RPN checkpoint, or were made for another base model
                (family, hidden size, layer count, architecture fingerprint or weights differ).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: not a directory written by RPN.save_pretrained")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is not valid JSON ({exc})") from None
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path} is not an SD-RPN checkpoint (format {config.get('format')!r})")
        adapter = adapter_for(model)
        cls._check_base_model(config, adapter, directory)
        rpn = cls(adapter, config["start_layer"], config["num_blocks"], **_thresholds(config),
                  thresholds=config.get("thresholds"), labels=config.get("labels"), prompt=config.get("prompt"),
                  image_start=config.get("image_start"), geometry=config.get("geometry"))
        state = load_file(weights_path)
        expected = rpn.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not hold this RPN's weights (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[name].shape)}")
        rpn.load_state_dict(state)
        rpn.config["weight_signature"] = config.get("weight_signature", rpn.config["weight_signature"])
        return rpn.eval()

    @staticmethod
    def _check_base_model(config: dict, adapter: ModelAdapter, directory: Path) -> None:
        saved = config.get("base_model", {})
        facts = adapter.config_fingerprint()
        problems = [
            f"{key}: RPN {saved.get(key)!r}, model {facts.get(key)!r}"
            for key in ("family", "hidden_size", "num_hidden_layers", "num_attention_heads", "image_grid")
            if saved.get(key) != facts.get(key)
        ]
        if not problems and saved.get("fingerprint") != _fingerprint(facts):
            problems.append(f"architecture fingerprint: RPN {saved.get('fingerprint')}, model {_fingerprint(facts)}")
        if problems:
            raise ValueError(f"the RPN in {directory} was trained for another base model ({'; '.join(problems)})")
        signature = config.get("weight_signature")
        if signature is not None:
            saved_values = torch.tensor(signature, dtype=torch.float64)
            current = torch.tensor(_weight_signature(adapter, config["start_layer"]), dtype=torch.float64)
            scale = saved_values.square().mean().sqrt().item()
            if current.shape != saved_values.shape or not torch.allclose(
                current, saved_values, rtol=SIGNATURE_RTOL, atol=SIGNATURE_RTOL * scale
            ):
                raise ValueError(f"the RPN in {directory} was trained on another checkpoint of this architecture "
                                 f"(the frozen weights it builds on differ)")

    def resolve_threshold(self, threshold: float | str | None) -> float:
        """The RoI threshold to use: a number as is, None for :attr:`threshold`, ``"calibrated"`` for
        :attr:`calibrated_threshold` (ValueError when the RPN records none)."""
        if threshold is None:
            return self.threshold
        if threshold == CALIBRATED:
            if self.calibrated_threshold is None:
                raise ValueError("this RPN records no calibrated threshold (sdrpn train calibrates one on "
                                 "held-out labels); give a number instead")
            return self.calibrated_threshold
        if isinstance(threshold, str):
            raise ValueError(f"threshold must be a number or {CALIBRATED!r}, got {threshold!r}")
        return float(threshold)

    def extra_repr(self) -> str:
        return f"K={self.start_layer}, T={self.num_blocks}, threshold={self.threshold}"


def _per_head(norm: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A norm over each head of (B, N, heads * head_dim) projections."""
    return norm(x.view(*x.shape[:2], -1, head_dim)).flatten(2)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, heads * head_dim) projections with the rotary embedding of (B, N, head_dim) cos/sin."""
    batch, count, _ = x.shape
    heads = x.view(batch, count, -1, head_dim).transpose(1, 2)
    return apply_rotary(heads, cos, sin).transpose(1, 2).reshape(batch, count, -1)


def _thresholds(config: dict) -> dict:
    """The two thresholds of a config; one written before they were kept apart holds only the
    calibrated one, as ``threshold``."""
    if "calibrated_threshold" in config:
        return {"threshold": config.get("threshold", DEFAULT_THRESHOLD),
                "calibrated_threshold": config["calibrated_threshold"]}
    return {"threshold": DEFAULT_THRESHOLD, "calibrated_threshold": config.get("threshold")}
