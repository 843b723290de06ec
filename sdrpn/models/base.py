"""The model adapter contract: how the engine, the distillation code and the baselines drive an MLLM.

Everything above this layer (``sdrpn.rpn``, ``sdrpn.engine``, ``sdrpn.distill``) sees a multimodal
LLM only through a :class:`ModelAdapter`; a new model family is one new adapter file. An adapter
wraps the Hugging Face model exactly as the user loaded it (dtype, device, ``device_map``,
attention implementation) and never patches transformers.

Conventions shared by every method:

* ``hidden`` tensors are ``(B, S, hidden_size)`` in the model's dtype.
* ``position_ids`` are ``(B, S)`` int64 positions counting each row's real tokens: what the decoder
  layers take (flash attention reads sequence boundaries from them). The rotary embedding takes
  ``rope_position_ids``: the same for 1-D RoPE (LLaVA), ``(P, B, S)`` for multi-axis RoPE (Qwen's
  M-RoPE, P = 3), passed apart where they differ. After the last image, every rope axis is the
  layer position plus a per-row ``rope_delta``, so decoding needs only that delta.
* ``attention_mask`` arguments are 2-D ``(B, past + S)`` bool *key* masks, True for real tokens,
  covering the cached keys followed by the new tokens. Attention is causal by index: a new token at
  index ``past + i`` sees the valid keys at indices ``<= past + i``. Padding may sit anywhere
  (left of the prompt or in the middle of it); ``None`` means every key is a real token.
* ``additions`` (``layer_additions``) map a layer index to a (B, S, hidden) tensor added to the
  states leaving that layer: features a family injects inside early layers (Qwen3-VL's deepstack
  visual features at the image positions, zeros elsewhere).
* ``cache`` is a ``transformers.Cache`` (the adapter creates it with :meth:`ModelAdapter.new_cache`);
  layers append their keys and values to it through the public ``Cache.update``; a ``DynamicCache``
  works too.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ModelAdapter",
    "LanguageModelAdapter",
    "ModelInputs",
    "SUPPORTED_ATTENTION",
    "decoder_attention_mask",
    "run_decoder_layers",
    "default_position_ids",
    "project_qk",
    "apply_rotary",
]

# Attention implementations whose mask format we build: 4-D masks for eager (additive) and sdpa
# (boolean), 2-D padding masks for the flash-attention kernels.
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class ModelInputs:
    """A prompt embedded for the language model.

    Attributes:
        inputs_embeds: (B, S, hidden) token embeddings with the image features scattered in.
        position_ids: (B, S) int64 positions of the decoder layers (0 for padding).
        attention_mask: (B, S) bool, True for real tokens.
        image_start: (B,) int64 index of the first image token of each sample.
        image_length: number of image tokens per sample (``grid_h * grid_w``), the same for all.
        rope_position_ids: (P, B, S) int64 rotary positions where they are not ``position_ids``
            (multi-axis RoPE), else None.
        rope_delta: (B,) int64 rotary minus layer position of the tokens after the image (zeros for
            1-D RoPE).
        image_lengths: (B,) int64 image tokens of each sample.
        layer_additions: layer index -> (B, S, hidden) added to the states leaving that layer
            (features injected inside early layers), or None.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_start: torch.Tensor
    image_length: int
    rope_position_ids: torch.Tensor | None = None
    rope_delta: torch.Tensor | None = None
    image_lengths: torch.Tensor | None = None
    layer_additions: dict[int, torch.Tensor] | None = None

    @property
    def image_positions(self) -> torch.Tensor:
        """(B, image_length) int64 sequence indices of the image tokens."""
        offsets = torch.arange(self.image_length, device=self.image_start.device)
        return self.image_start[:, None] + offsets


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, as ``model.generate`` makes them: (B, S) int64."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp_min(0) * mask


def decoder_attention_mask(
    implementation: str,
    key_mask: torch.Tensor | None,
    query_length: int,
    key_length: int,
    dtype: torch.dtype,
    device: torch.device,
):
    """The ``attention_mask`` argument a decoder layer expects, for causal attention by index.

    Args:
        implementation: the model's attention implementation (one of :data:`SUPPORTED_ATTENTION`).
        key_mask: (B, key_length) bool, True for real keys; None when every key is real.
        query_length: number of new tokens; they are the last ``query_length`` keys.
        key_length: cached keys plus new tokens.
        dtype: the hidden-state dtype (eager masks are additive in it).
        device: where to build the mask.

    Returns:
        None where the kernel's own causal flag is exact, otherwise a 4-D (B or 1, 1, query_length,
        key_length) additive mask in ``dtype`` (0 or -inf for sdpa, 0 or the dtype's minimum for
        eager, as transformers builds them) or the 2-D padding mask (flash).
        Every query row keeps its own key, so padding rows never turn into NaN.
    """
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; expected one of {SUPPORTED_ATTENTION}"
        )
    if key_mask is not None and key_mask.shape[-1] != key_length:
        raise ValueError(
            f"attention_mask covers {key_mask.shape[-1]} keys, expected {key_length} (cached keys + new tokens)"
        )
    if implementation.startswith("flash_attention"):
        # Flash kernels align the causal diagonal bottom-right and unpad with a 2-D mask.
        return None if key_mask is None else key_mask.to(device=device, dtype=torch.int32)
    if key_mask is None and implementation == "sdpa" and query_length in (1, key_length):
        return None  # plain causal (or a single query): SDPA's is_causal path is exact and fastest
    past = key_length - query_length
    query_index = torch.arange(past, key_length, device=device)[:, None]
    key_index = torch.arange(key_length, device=device)[None, :]
    allowed = (key_index <= query_index)[None, None]  # (1, 1, Q, K)
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = allowed | (key_index == query_index)[None, None]
    # Additive for both: SDPA would turn a bool mask into this one (-inf where masked) in every layer.
    blocked = float("-inf") if implementation == "sdpa" else torch.finfo(dtype).min
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), blocked)  # one pass, in ``dtype``


# Decoder layer class -> its cache keyword. A plain dict, not functools.lru_cache: dynamo reads a
# dict while tracing, and warns that it traces through an lru_cache wrapper.
_CACHE_KEYWORDS: dict[type, str] = {}


def cache_keyword(layer_type: type) -> str:
    """The decoder layer's name for its key/value cache argument: ``cache`` in newer transformers,
    ``past_key_values`` before (the newer versions still take it, with a deprecation warning)."""
    if layer_type not in _CACHE_KEYWORDS:
        parameters = inspect.signature(layer_type.forward).parameters
        _CACHE_KEYWORDS[layer_type] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_KEYWORDS[layer_type]


def run_decoder_layers(
    layers: Sequence[nn.Module],
    hidden: torch.Tensor,
    position_embeddings,
    layer_mask,
    position_ids: torch.Tensor,
    cache=None,
    additions: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Runs decoder layers in order with the transformers decoder-layer call signature; ``additions``
    are keyed by the index within ``layers``."""
    for index, layer in enumerate(layers):
        output = layer(
            hidden,
            attention_mask=layer_mask,
            position_ids=position_ids,
            **{cache_keyword(type(layer)): cache},
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
        hidden = output[0] if isinstance(output, tuple) else output
        if additions and index in additions:
            hidden = hidden + additions[index].to(hidden.dtype)
    return hidden


class ModelAdapter(abc.ABC):
    """Uniform access to one loaded multimodal LLM.

    Config facts (attributes): ``family`` (e.g. "llava"), ``num_layers``, ``hidden_size``,
    ``num_heads``, ``num_kv_heads``, ``head_dim``, ``image_grid`` ((H, W) image tokens per view),
    ``image_token_id``, ``vision_input_size`` ((H, W) pixels of one view), ``rpn_uses_rope``
    (whether the RPN head applies rotary embeddings to its q/k; False for LLaVA),
    ``rpn_uses_final_norm`` (whether a copy of the final norm precedes the RPN head), ``device``,
    ``dtype``, ``geometry`` (the processor's image geometry, :class:`sdrpn.models.geometry.ImageGeometry`),
    ``default_prompt_template`` (the :mod:`sdrpn.prompts` preset the family's checkpoints were trained
    and evaluated with: what labelling uses unless told otherwise).
    """

    family: str
    default_prompt_template: str

    def __init__(self, model: nn.Module, processor=None):
        self.model = model
        self.processor = processor

    # -- config facts ------------------------------------------------------------------------------

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    image_grid: tuple[int, int]
    image_token_id: int
    vision_input_size: tuple[int, int]
    rpn_uses_rope: bool
    rpn_uses_final_norm: bool = True

    @property
    def image_length(self) -> int:
        """Image tokens per view: ``image_grid[0] * image_grid[1]``."""
        return self.image_grid[0] * self.image_grid[1]

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where prompts and image features start)."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def attention_implementation(self) -> str:
        """The language model's attention implementation, read at call time."""
        return self.text_config._attn_implementation or "eager"

    # -- modules -----------------------------------------------------------------------------------

    text_config: object
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    rotary_emb: nn.Module

    @property
    @abc.abstractmethod
    def final_norm(self) -> nn.Module:
        """The language model's final norm (applied before the LM head)."""

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` (0-based) of the language model."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer index must be in [0, {self.num_layers}), got {index}")
        return self.layers[index]

    @abc.abstractmethod
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of final-normed hidden states."""

    @abc.abstractmethod
    def config_fingerprint(self) -> dict:
        """The language-model facts an RPN checkpoint must match (JSON-serialisable)."""

    @staticmethod
    def set_processor_geometry(processor, mode: str) -> bool:
        """Makes ``processor`` build its base views in ``mode`` ("pad" or "crop", see
        :mod:`sdrpn.models.geometry`); returns whether anything changed. ``processor`` is changed in place."""
        raise NotImplementedError("this model family cannot change its processor's geometry")

    # -- vision ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) visual tokens projected to the language-model space."""

    # -- language model ----------------------------------------------------------------------------

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``input_ids`` (image placeholders included, not replaced)."""
        return self.embed_tokens(input_ids.to(self.embed_tokens.weight.device))

    @abc.abstractmethod
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        validate: bool = True,
    ) -> ModelInputs:
        """Embeds a prompt with exactly one image per sample.

        Args:
            input_ids: (B, S) token ids with the image's placeholder tokens in every sample.
            pixel_values: the vision input (the processor's outputs named by
                :attr:`vision_input_names`: a tensor for a single name, else a dict); encoded unless
                ``image_features`` is given.
            attention_mask: (B, S) 1 for real tokens (processor output); None means no padding.
            image_features: (B, image_length, hidden) already encoded views; families that add
                features inside early layers (``injection_layers``) take what
                :meth:`encode_views_full` returned instead.
            validate: check the image tokens on the host (ValueError when a row does not hold one
                image); callers that validated the prompts already skip the host round trip.
        """

    def new_cache(self):
        """An empty key/value cache for :meth:`run_layers` (appends in place, see :mod:`sdrpn.models.cache`)."""
        from .cache import AppendCache

        return AppendCache()

    # -- views of their own size (the RoI view; Qwen's aspect-keeping views) -------------------------
    #
    # The engine inserts a second view after the first as [before ids | RoI tokens | after ids],
    # then the question. The adapter says what frames a view, where its tokens sit on the rotary
    # axes, how a grid box maps to source pixels and how a crop becomes a vision input.

    # RoI post-processing that the family's released RPNs were made with (RoIOptions fields), and
    # their RoI threshold.
    roi_defaults: dict = {}
    default_threshold: float = 0.15
    # Whether the family's released RPNs use the per-benchmark thresholds of sdrpn.roi.THRESHOLDS.
    per_benchmark_thresholds: bool = True
    # Labelling defaults (sdrpn.distill presets): grounding heads, label rules, sink detector; None
    # where no single choice fits the family (e.g. heads depend on the model size).
    default_label_heads: str | None = None
    default_label_rules: str = "llava-1.5"
    default_sink_preset: str | None = None
    # The RPN depth preset (sdrpn.distill.heads.RPN_DEPTH_PRESETS: the authors' where released) by the
    # model's decoder layers.
    rpn_depth_presets: dict = {}
    # Whether RoI views have the family's fixed input size and are cut, resized and encoded on the
    # device (sync-free stage 2); False where the processor encodes each crop at a size of its own.
    roi_views_on_device: bool = True

    @property
    def roi_block_ids(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids before and after the RoI view's tokens in stage 2 (none by default)."""
        return (), ()

    # Tokens after the original image before which the RoI block goes (0: right after its last
    # image token).
    prefix_tail: int = 0

    def view_grids(self, vision_input) -> list[tuple[int, int]]:
        """Token grid ``(rows, cols)`` of each view in a vision input, on the host."""
        return [tuple(self.image_grid)] * int(vision_input.shape[0])

    def image_token_counts(self, vision_input) -> list[int]:
        """Image tokens of each view in a vision input (its grid's cells), on the host."""
        return [rows * cols for rows, cols in self.view_grids(vision_input)]

    def select_view(self, vision_input, index: int):
        """The vision input of view ``index`` alone."""
        return vision_input[index : index + 1]

    def encode_views(self, vision_input) -> list[torch.Tensor]:
        """Per view, its (tokens, hidden) features, in the language model's dtype."""
        return list(self.encode_images(vision_input))

    # Layers after which the family adds features of the image tokens (see ``additions``); an early
    # exit and the KV reuse need K beyond them.
    injection_layers: tuple[int, ...] = ()

    def encode_views_full(self, vision_input) -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]:
        """:meth:`encode_views` plus, per injection layer, each view's (tokens, hidden) features added
        to its tokens after that layer (none by default)."""
        return self.encode_views(vision_input), {}

    def image_rope_positions(self, base: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """(P, B, C) rotary positions of image tokens at grid ``(rows, cols)`` (B, C) of a view whose
        tokens start at rotary position ``base`` (B,); None where image tokens take their layer
        positions (1-D RoPE)."""
        return None

    def image_rope_advance(self, grids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """(B,) how far a view of ``grids`` (B, 2) with ``kept`` (B,) tokens in the sequence moves the
        rotary position of the text after it: its token count for 1-D RoPE."""
        return kept

    def sequence_rope_positions(self, input_ids: torch.Tensor, grids: list[tuple[int, int]],
                                attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """(P, B, S) rotary positions of sequences whose images have ``grids`` (in order, row after
        row), computed by the model's own code, with (B, S) bool ``attention_mask`` marking padding
        (None: none); None for 1-D RoPE (the layer positions)."""
        return None

    def roi_source_rects(self, regions: torch.Tensor, grids: torch.Tensor, sources) -> torch.Tensor:
        """(B, 4) int64 source-pixel rectangles ``[x0, y0, width, height]`` of (B, 4) grid boxes
        ``[x0, y0, x1, y1)`` on views of ``grids`` (B, 2), for the images of ``sources``
        (:class:`sdrpn.roi.SourceImages`)."""
        from ..roi import grid_box_crops

        return grid_box_crops(regions, sources, self.geometry, tuple(self.image_grid))

    def roi_vision_input(self, crops, image_processor):
        """The vision input of RoI views from cropped PIL images, the plain way (the processor).
        Default: each crop stretched to the vision input with PIL's bilinear filter, then the processor."""
        from PIL import Image

        height, width = self.vision_input_size
        views = [crop.resize((width, height), Image.BILINEAR) for crop in crops]
        return image_processor(views, return_tensors="pt")["pixel_values"]

    # -- the peer methods' views (``res-scaling``, ``vicrop``) -------------------------------------
    #
    # Defaults for families with one fixed view geometry (``self.geometry``): views are cut and
    # resampled on the device, exactly as the processor would make them.

    # ViCrop reads the attention of this layer of a model this deep ((layer, depth)), at the same
    # relative depth in others: 14 of 32 for LLaVA-1.5 (ViCrop's ``ATT_LAYER`` for LLaVA).
    vicrop_attention_layer: tuple[int, int] = (14, 32)

    @property
    def vicrop_window(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of ViCrop's unit window (its six windows span 1 to 2 of it,
        in source pixels): the vision input."""
        return tuple(self.vision_input_size)

    def source_cell_sizes(self, grids: list[tuple[int, int]], images) -> list[tuple[float, float]]:
        """``(width, height)`` in source pixels of one cell of each view's grid, per PIL image."""
        cell = (self.vision_input_size[1] / self.image_grid[1], self.vision_input_size[0] / self.image_grid[0])
        scales = [self.geometry.transform(image.size).scale for image in images]
        return [(scale[0] * cell[0], scale[1] * cell[1]) for scale in scales]

    def scaled_vision_input(self, sources, grids: list[tuple[int, int]], factor: int, image_processor):
        """The vision input of each source image's view at ``factor`` times its side (``factor``^2 the
        tokens): the region the view shows, resampled to ``factor`` times the vision input (encoded
        with interpolated position embeddings)."""
        from ..roi import grid_box_squares
        from .geometry import resample_views

        geometry, (rows, cols) = self.geometry, self.image_grid
        whole = torch.tensor([[0, 0, cols, rows]], device=sources.sizes.device).expand(len(grids), 4)
        squares = grid_box_squares(whole, sources, geometry, self.image_grid)
        size = (factor * geometry.input_size[0], factor * geometry.input_size[1])
        views = resample_views(sources.pixels, sources.sizes, squares, size, geometry.resample, geometry.pad_color,
                               sources.max_side)
        return geometry.normalize(views, sources.mean, sources.std)

    def crop_vision_input(self, boxes: torch.Tensor, grids: list[tuple[int, int]], sources, image_processor):
        """``(vision input, crops)`` of the square source regions around (B, 4) grid boxes ``[x0, y0,
        x1, y1)`` (ViCrop's crops), each stretched to the vision input; ``crops`` (B, 4) int64 are
        ``[x0, y0, width, height]`` in source pixels."""
        from ..roi import grid_box_squares, roi_views

        squares = grid_box_squares(boxes, sources, self.geometry, self.image_grid)
        return roi_views(squares, sources, self.geometry, self.geometry.resample), squares

    # Names of the processor outputs that make up one view's vision input (LLaVA: pixel_values;
    # Qwen: pixel_values and image_grid_thw); generate() collects them from its keyword arguments.
    vision_input_names: tuple[str, ...] = ("pixel_values",)
    # Processor outputs the adapter derives from input_ids itself; generate() accepts and drops them.
    derived_input_names: tuple[str, ...] = ()

    def vision_input(self, processor_outputs: dict):
        """The vision input the adapter reads, from processor outputs (:attr:`vision_input_names`):
        ``pixel_values`` alone, or a dict of them (e.g. with Qwen's ``image_grid_thw``)."""
        names = self.vision_input_names
        return processor_outputs[names[0]] if len(names) == 1 else {name: processor_outputs[name] for name in names}

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The rotary ``position_embeddings`` tuple the decoder layers take, from (B, S) or
        (P, B, S) rotary positions."""
        return self.rotary_emb(hidden, position_ids)

    def text_rope_positions(self, position_ids: torch.Tensor, rope_delta: torch.Tensor | None) -> torch.Tensor | None:
        """Rotary positions of text tokens after the image, from their (B, S) layer positions and
        the rows' ``rope_delta``; None where they are the layer positions (1-D RoPE)."""
        return None

    def run_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        rope_position_ids: torch.Tensor | None = None,
        additions: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Runs decoder layers ``[start, end)`` with the model's attention and rotary embeddings.

        Args:
            hidden: (B, S, hidden) states entering layer ``start``.
            position_ids: (B, S) layer positions of the new tokens.
            rope_position_ids: (P, B, S) rotary positions where they differ (multi-axis RoPE).
            attention_mask: (B, past + S) bool key mask (see the module docstring), or None.
            cache: a cache from :meth:`new_cache`; the layers append to it. All layers in the range
                must hold the same number of cached tokens (``past``).
            additions: model layer index -> (B, S, hidden) added to the states leaving that layer
                (see the module docstring); layers outside the range are ignored.

        Returns:
            (B, S, hidden) states leaving layer ``end - 1``.
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range must satisfy 0 <= start <= end <= {self.num_layers}, got [{start}, {end})")
        if start == end:
            return hidden
        past = cache.get_seq_length(start) if cache is not None else 0
        layer_mask = decoder_attention_mask(
            self.attention_implementation, attention_mask, hidden.shape[1], past + hidden.shape[1],
            hidden.dtype, hidden.device,
        )
        position_embeddings = self.rotary(hidden, position_ids if rope_position_ids is None else rope_position_ids)
        local = {index - start: value for index, value in (additions or {}).items() if start <= index < end}
        return run_decoder_layers(self.layers[start:end], hidden, position_embeddings, layer_mask, position_ids, cache,
                                  local)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states leaving the last layer (final norm + LM head)."""
        return self.lm_head(self.final_norm(hidden))

    def attention_qk(
        self, layer_index: int, hidden: torch.Tensor, position_ids: torch.Tensor,
        rope_position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of one layer, RoPE applied, without running its attention.

        Args:
            layer_index: the layer.
            hidden: (B, S, hidden) states entering that layer.
            position_ids: (B, S) positions.
            rope_position_ids: (P, B, S) rotary positions where they differ (multi-axis RoPE).

        Returns:
            ``(q, k)``: (B, num_heads, S, head_dim) and (B, num_kv_heads, S, head_dim).
        """
        layer = self.layer(layer_index)
        normed = layer.input_layernorm(hidden)
        q, k = project_qk(layer.self_attn, normed, self.head_dim)
        cos, sin = self.rotary(hidden, position_ids if rope_position_ids is None else rope_position_ids)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    # -- the labelling view (``sdrpn label``, ``sdrpn heads``, ``sdrpn train``) ---------------------
    #
    # The view the pseudo labels are made on, and the RPN trained on: what the labelling processor
    # receives for a source image, the token grid it makes of it, and the cells of that grid that hold
    # no image (padding the view added: known background under label rules that say so). Labels are
    # stored on ``image_grid``; a view of another grid cannot be labelled (the job reports it).
    # Default: the image as it is, through the processor as it is (its own geometry), no padding cells.

    def labelling_view(self, image) -> "LabellingView":
        """The labelling view of a source PIL image (see :class:`LabellingView`)."""
        return LabellingView(image, tuple(self.image_grid), None)

    def labelling_processor(self, processor):
        """The processor that encodes labelling views (``processor`` itself by default; None stays None)."""
        return processor

    def labelling_settings(self) -> dict | None:
        """JSON-ready facts of the labelling view that a label run records (``run.json``) and a resumed
        run must share; None where the view is the processor's own (recorded as its geometry)."""
        return None


@dataclass
class LabellingView:
    """One source image as the labelling pipeline shows it to the model (:meth:`ModelAdapter.labelling_view`).

    Attributes:
        image: the PIL image the labelling processor receives.
        grid: ``(rows, cols)`` token grid the labelling processor makes of it.
        padding: ``(rows, cols)`` bool, True on the cells that hold no image (padding added by the
            view), or None for a view without such cells.
    """

    image: object
    grid: tuple[int, int]
    padding: torch.Tensor | None = None


class LanguageModelAdapter(ModelAdapter):
    """The part every transformers image-text model shares: a decoder-only language model at
    ``model.model.language_model`` (embeddings, layers, rotary embedding, final norm) and
    ``model.lm_head``. A family adapter adds its vision side."""

    def __init__(self, model: nn.Module, processor=None):
        super().__init__(model, processor)
        config = model.config
        text_config = config.get_text_config(decoder=True)
        language_model = model.model.language_model
        if getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True):
            raise ValueError("sliding-window language models are not supported (the KV reuse assumes full attention)")
        self.config = config
        self.text_config = text_config
        self.embed_tokens = language_model.embed_tokens
        self.layers = language_model.layers
        self.rotary_emb = language_model.rotary_emb
        self._norm = language_model.norm
        self.num_layers = text_config.num_hidden_layers
        self.hidden_size = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(text_config, "head_dim", None) or self.hidden_size // self.num_heads
        self.image_token_id = config.image_token_id

    def prompt_on_device(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """``(input_ids, is_image, attention_mask)`` on the model's device, the mask as bool (all
        True when None)."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        return input_ids, input_ids == self.image_token_id, attention_mask.to(device=self.device, dtype=torch.bool)

    @property
    def final_norm(self) -> nn.Module:
        return self._norm

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def config_fingerprint(self) -> dict:
        text = self.text_config
        return {
            "family": self.family,
            "model_type": text.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": text.intermediate_size,
            "vocab_size": text.vocab_size,
            "image_grid": list(self.image_grid),
        }


def project_qk(attention: nn.Module, normed: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, S, head_dim) queries and (B, kv_heads, S, head_dim) keys of an attention module,
    through its per-head q/k norms where it has them."""
    batch, length = normed.shape[:2]
    q = attention.q_proj(normed).view(batch, length, -1, head_dim)
    k = attention.k_proj(normed).view(batch, length, -1, head_dim)
    if getattr(attention, "q_norm", None) is not None:  # per-head norms before RoPE (Qwen3)
        q, k = attention.q_norm(q), attention.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, heads, S, head_dim) states with (B, S, head_dim) cos/sin (rotate-half form)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
