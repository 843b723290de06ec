"""Attention-sink detection on image tokens (DESIGN section 2).

A few image tokens collect a large share of every head's attention whatever the question is
("attention sinks"); left in the grounding map they would become the foreground of every label.
Two detectors:

* :func:`attention_sinks` (the authors' released code): the mean over all heads of an early
  layer's answer-to-image attention, or over given (layer, head) pairs; a token is a sink where
  that mean is ``>= threshold`` (LLaVA-1.5-7B: all heads of layer 2, 1e-3; LLaVA-1.5-13B: heads
  17 and 22 of layer 16; Qwen2.5-VL natural images: two given heads, 1e-2; Qwen2.5-VL text
  images: no sink detector).
* :func:`norm_sinks` (the paper's description): RMS-normalise each image token's hidden state
  (no weight, eps 1e-6, fp32); a token is a sink where its largest ``|value|`` over the model's
  massive-activation dimensions exceeds ``tau`` (20). LLaMA-2-7B dims: 2533 and 1415; 13B: 2100
  and 4743. Without dims the max is over all dimensions, a model-agnostic variant for new models.

:class:`SinkSpec` is the user-facing choice between them, parsed from ``sdrpn label --sink``;
:data:`SINK_PRESETS` holds the authors' settings per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import Capture, CaptureRequest

RMS_EPS = 1e-6

# Massive-activation dimensions of the LLaMA-2 language models of LLaVA-1.5, by hidden size.
MASSIVE_ACTIVATION_DIMS = {
    "llama2-7b": (2533, 1415),
    "llama2-13b": (2100, 4743),
}


def attention_sinks(image_attention: torch.Tensor, query_mask: torch.Tensor, threshold: float = 1e-3) -> torch.Tensor:
    """Sinks from the attention of an early layer.

    Args:
        image_attention: ``(B, heads, A, N)`` attention weights from the answer queries to the
            ``N`` image tokens (all heads of the sink layer).
        query_mask: ``(B, A)`` bool, True on real answer queries (False on padding).
        threshold: a token is a sink where its mean attention is ``>= threshold``.

    Returns:
        ``(B, N)`` bool. A sample without any answer query has no sinks.
    """
    if image_attention.ndim != 4:
        raise ValueError(f"image_attention must be (B, heads, A, N), got shape {tuple(image_attention.shape)}")
    batch, _, queries, _ = image_attention.shape
    if query_mask.shape != (batch, queries):
        raise ValueError(f"query_mask must be {(batch, queries)}, got {tuple(query_mask.shape)}")
    weights = query_mask.to(torch.float32)
    total = (image_attention.float().mean(dim=1) * weights[:, :, None]).sum(dim=1)
    mean = total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    return mean >= threshold


def norm_sinks(image_hidden: torch.Tensor, tau: float = 20.0, dims: Sequence[int] | None = None) -> torch.Tensor:
    """Sinks from massive activations in the image tokens' hidden states.

    Args:
        image_hidden: ``(..., N, D)`` hidden states of the image tokens.
        tau: a token is a sink where its largest normalised ``|value|`` exceeds this.
        dims: the massive-activation dimensions to look at; None looks at all of them.

    Returns:
        ``(..., N)`` bool.
    """
    hidden = image_hidden.float()
    normalised = hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)
    if dims is not None:
        dims = list(dims)
        size = hidden.shape[-1]
        if not dims or not all(-size <= d < size for d in dims):
            raise ValueError(f"dims must be a non-empty list of indices below the hidden size {size}, got {dims}")
        normalised = normalised[..., dims]
    return normalised.abs().amax(dim=-1) > tau


@dataclass(frozen=True)
class SinkSpec:
    """Which sink detector the labelling job runs, and where.

    Attributes:
        method: "attention", "norm" or "none".
        layer: the decoder layer whose input (norm) or attention (attention) is read; None for
            "norm" means the first grounding layer. None for "attention" with ``heads``.
        threshold: attention threshold (attention, compared with ``>=``) or tau (norm, ``>``).
        dims: massive-activation dimensions (norm only); None means all dimensions.
        heads: attention only: the (layer, head) pairs whose mean attention is thresholded,
            instead of every head of ``layer`` (the authors' sink heads of LLaVA-1.5-13B and
            Qwen2.5-VL). Stored sorted and without repeats.
    """

    method: str = "attention"
    layer: int | None = 2
    threshold: float = 1e-3
    dims: tuple[int, ...] | None = None
    heads: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.method not in ("attention", "norm", "none"):
            raise ValueError(f"sink method must be attention, norm or none, got {self.method!r}")
        if self.heads is not None:
            try:
                pairs = tuple(sorted({(int(layer), int(head)) for layer, head in self.heads}))
            except (TypeError, ValueError):
                raise ValueError(f"sink heads must be (layer, head) pairs, got {self.heads!r}") from None
            if not pairs or any(layer < 0 or head < 0 for layer, head in pairs):
                raise ValueError(f"sink heads must be a non-empty list of (layer, head) pairs >= 0, got {self.heads!r}")
            object.__setattr__(self, "heads", pairs)
            if self.method != "attention":
                raise ValueError("sink heads apply to the attention sink detector only")
            if self.layer is not None:
                raise ValueError("give the attention sink detector either a layer (all its heads) or heads "
                                 "(layer, head pairs), not both")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"sink layer must be >= 0, got {self.layer}")
        if self.method == "none" and self.layer is not None:
            raise ValueError("the none sink detector reads no layer")
        if self.method == "attention" and self.layer is None and self.heads is None:
            raise ValueError("the attention sink detector needs a layer or heads")
        if self.dims is not None and self.method != "norm":
            raise ValueError("massive-activation dims apply to the norm sink detector only")
        if not self.threshold > 0:
            raise ValueError(f"sink threshold must be positive, got {self.threshold}")

    @classmethod
    def create(cls, method: str = "attention", layer: int | None = None, threshold: float | None = None,
               dims: str | Sequence[int] | None = None,
               heads: str | Sequence[Sequence[int]] | None = None) -> "SinkSpec":
        """A spec with each detector's defaults filled in; ``dims`` may be a preset name
        (llama2-7b, llama2-13b) or comma-separated integers; ``heads`` (attention only, instead of
        a layer) ``LAYER:HEAD,HEAD[;LAYER:HEAD,...]`` or (layer, head) pairs."""
        if isinstance(dims, str):
            dims = MASSIVE_ACTIVATION_DIMS.get(dims) or tuple(_parse_ints(dims))
        if isinstance(heads, str):
            heads = _parse_pairs(heads)
        if method not in _DEFAULTS:
            raise ValueError(f"sink method must be attention, norm or none, got {method!r}")
        default_layer, default_threshold = _DEFAULTS[method]
        if heads is not None:
            default_layer = None
        return cls(method, default_layer if layer is None else layer,
                   default_threshold if threshold is None else threshold,
                   None if dims is None else tuple(int(d) for d in dims),
                   None if heads is None else tuple(tuple(pair) for pair in heads))

    @classmethod
    def preset(cls, name: str) -> "SinkSpec":
        """One of :data:`SINK_PRESETS` by name."""
        try:
            return SINK_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown sink preset {name!r}; presets: {', '.join(SINK_PRESETS)}") from None

    @property
    def heads_by_layer(self) -> dict[int, tuple[int, ...]] | None:
        """``heads`` as layer -> heads, layers ascending; None without heads."""
        if self.heads is None:
            return None
        layers: dict[int, list[int]] = {}
        for layer, head in self.heads:
            layers.setdefault(layer, []).append(head)
        return {layer: tuple(heads) for layer, heads in layers.items()}

    def resolved_layer(self, grounding_layer: int) -> int | None:
        """The layer this detector reads, given the first grounding layer; None for "none". With
        ``heads``, the deepest of their layers (the one a model must have)."""
        if self.method == "none":
            return None
        if self.heads is not None:
            return max(layer for layer, _ in self.heads)
        return grounding_layer if self.layer is None else self.layer

    def request(self, grounding_layer: int, num_heads: int) -> CaptureRequest:
        """What the detector needs from the teacher-forced pass."""
        if self.heads is not None:
            return CaptureRequest(self.heads_by_layer)
        layer = self.resolved_layer(grounding_layer)
        if self.method == "attention":
            return CaptureRequest({layer: tuple(range(num_heads))})
        if self.method == "norm":
            return CaptureRequest({}, (layer,))
        return CaptureRequest({})

    def detect(self, captured: Capture, grounding_layer: int, image_tokens: int) -> torch.Tensor:
        """``(B, N)`` sink mask from a capture that included :meth:`request`."""
        if self.heads is not None:
            return attention_sinks(captured.select(self.heads_by_layer), captured.query_mask, self.threshold)
        layer = self.resolved_layer(grounding_layer)
        if self.method == "attention":
            rows = captured.select({layer: captured.request.heads[layer]})
            return attention_sinks(rows, captured.query_mask, self.threshold)
        if self.method == "norm":
            return norm_sinks(captured.hidden[layer], self.threshold, self.dims)
        return torch.zeros(captured.query_mask.shape[0], image_tokens, dtype=torch.bool,
                           device=captured.query_mask.device)

    def to_dict(self) -> dict:
        """JSON-ready fields (``SinkSpec(**d)`` rebuilds the spec). ``heads`` appears only when set,
        so that the settings of a detector without heads read as before."""
        data = {"method": self.method, "layer": self.layer, "threshold": self.threshold,
                "dims": None if self.dims is None else list(self.dims)}
        if self.heads is not None:
            data["heads"] = [list(pair) for pair in self.heads]
        return data


# method -> (layer, threshold) defaults.
_DEFAULTS = {"attention": (2, 1e-3), "norm": (None, 20.0), "none": (None, 1.0)}

SINK_PRESETS = {
    # LLaVA-1.5-7B: mean over all heads of layer 2 (LLaVA/llava/eval/model_vqa_label.py:140),
    # sinks where >= 1e-3 (LLaVA/llava/train/train.py:785, mm_utils.py:383).
    "llava-1.5-7b": SinkSpec("attention", 2, 1e-3),
    # LLaVA-1.5-13B: heads 17 and 22 of layer 16 (model_vqa_label.py:147, 161-167), same threshold.
    "llava-1.5-13b": SinkSpec("attention", None, 1e-3, heads=((16, 17), (16, 22))),
    # Qwen2.5-VL natural images (GQA): the mean over the given heads (make_pseudo_label_natural.py:93-99,
    # 115-121); sinks where >= 1e-2 (qwenvl/data/data_qwen.py:724 default, never overridden at 694;
    # Qwen2.5-VL/qwen_src/mm_utils.py:362).
    "qwen2.5-vl-7b-natural": SinkSpec("attention", None, 1e-2, heads=((9, 4), (9, 22))),
    "qwen2.5-vl-3b-natural": SinkSpec("attention", None, 1e-2, heads=((8, 1), (8, 13))),
    # Qwen2.5-VL text images (OCR-VQA): no sink heads, so the stored sink map is all zeros and no
    # token reaches the threshold (make_pseudo_label_textual.py:91-96, 113-120).
    "qwen2.5-vl-7b-text": SinkSpec.create("none"),
    "qwen2.5-vl-3b-text": SinkSpec.create("none"),
}
"""The authors' sink detectors by model (and, for Qwen2.5-VL, by image kind)."""


def _parse_pairs(text: str) -> list[tuple[int, int]]:
    """``9:4,22[;LAYER:HEAD,...]`` -> (layer, head) pairs."""
    pairs = []
    try:
        for part in filter(None, (piece.strip() for piece in text.split(";"))):
            layer, colon, heads = part.partition(":")
            if not colon:
                raise ValueError
            pairs.extend((int(layer), int(head)) for head in heads.split(",") if head.strip())
    except ValueError:
        raise ValueError(f"expected sink heads as LAYER:HEAD,HEAD[;LAYER:HEAD,...] (e.g. 9:4,22), "
                         f"got {text!r}") from None
    return pairs


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers or one of {', '.join(MASSIVE_ACTIVATION_DIMS)}, "
                         f"got {text!r}") from None
