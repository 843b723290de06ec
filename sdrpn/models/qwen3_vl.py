"""Adapter for ``transformers.Qwen3VLForConditionalGeneration`` (Qwen3-VL 2B/4B/8B/32B) and its
mixture-of-experts sibling ``Qwen3VLMoeForConditionalGeneration`` (30B-A3B, 235B-A22B).

Qwen3-VL is Qwen2.5-VL's layout with three changes, the first of which the engine has to know about:

* deepstack: the vision tower also returns one feature map per ``deepstack_visual_indexes`` entry,
  and transformers adds feature map ``i`` to the image tokens' states leaving decoder layer ``i``
  (``Qwen3VLTextModel._deepstack_process``, applied for ``layer_idx in range(len(deepstack))``).
  Here they are :attr:`ModelInputs.layer_additions` and :meth:`encode_views_full`'s second part, and
  :attr:`injection_layers` is ``(0, ..., len(deepstack_visual_indexes) - 1)``: an early exit and the
  KV reuse need K beyond them. transformers 5.17 returns each map concatenated over the images,
  5.25 a tuple of per-image maps; both are split per image here;
* per-head ``q_norm``/``k_norm`` before RoPE in every attention layer (``project_qk`` and the RPN
  head apply them where the module has them);
* 16-pixel patches, 2 x 2 merge: a token covers 32 x 32 pixels; no window attention in the tower.

The rest is Qwen2.5-VL's and is inherited: the prompt frames an image as
``<|vision_start|> <|image_pad|> x n <|vision_end|>`` (the RoI view gets the same block), and
``get_rope_index`` places an image token at ``start + (0, row, col)`` with the text after it from
``start + max(rows, cols)``, exactly as Qwen2.5-VL's does (its timestamps concern videos only). The
rotary embedding interleaves the T/H/W frequencies (``mrope_interleaved``) instead of cutting them
into sections, but it returns cos/sin already combined, so rotating q and k is the same
rotate-half as before.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelInputs
from .qwen2_5_vl import Qwen2_5_VLAdapter

__all__ = ["Qwen3VLAdapter"]


def _per_image(features, counts: list[int]) -> list[torch.Tensor]:
    """Per-image feature tensors from one tensor of all images' rows (split by ``counts``) or from
    a sequence of per-image tensors."""
    if isinstance(features, torch.Tensor):
        return list(features.split(counts))
    return list(features)


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Drives a Qwen3-VL (dense or MoE) model: ViT with 2 x 2 merging and deepstack features, Qwen3
    decoder (q/k norms) with interleaved M-RoPE.

    One image per sample. The RPN head applies the q/k norms and M-RoPE to its q/k, as the layer does.
    No SD-RPN checkpoints were released for Qwen3-VL: the RoI defaults are the authors' Qwen2.5-VL
    rules (masked upscaling, threshold 0.25, edge sinks of maps above 768 cells zeroed).
    """

    family = "qwen3_vl"
    # None released: K at the authors' Qwen2.5-VL relative depth (~0.57), T 3 (sdrpn.distill.heads).
    rpn_depth_presets = {28: "qwen3-vl-2b", 36: "qwen3-vl-4b/8b", 64: "qwen3-vl-32b"}

    def __init__(self, model: nn.Module, processor=None):
        super().__init__(model, processor)
        # transformers adds deepstack map i after decoder layer i, for i < len(deepstack_visual_indexes).
        self.injection_layers = tuple(range(len(self.config.vision_config.deepstack_visual_indexes)))

    @staticmethod
    def set_processor_geometry(processor, mode: str) -> bool:
        raise ValueError("Qwen3-VL views keep the image's aspect ratio (smart resize); there is no "
                         f"{mode!r} geometry to set")

    # -- vision ------------------------------------------------------------------------------------

    def encode_views_full(self, vision_input) -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]:
        """Per view, its (n_i, hidden) tokens; per injection layer, each view's (n_i, hidden)
        deepstack features, all in the language model's dtype and on its device."""
        output = self.vision_tower_output(vision_input)
        counts = (vision_input["image_grid_thw"].prod(dim=-1) // self.merge_size**2).tolist()

        def placed(values):
            return [value.to(device=self.device, dtype=self.dtype) for value in _per_image(values, counts)]

        deepstack = list(output.deepstack_features or ())
        if len(deepstack) != len(self.injection_layers):
            raise ValueError(f"the vision tower returned {len(deepstack)} deepstack feature maps, the config names "
                             f"{len(self.injection_layers)} (vision_config.deepstack_visual_indexes)")
        return placed(output.pooler_output), {layer: placed(values) for layer, values in zip(self.injection_layers,
                                                                                             deepstack)}

    def encode_images(self, pixel_values) -> list[torch.Tensor]:
        """Per image, (n_i, hidden) tokens (the deepstack features: :meth:`encode_views_full`)."""
        return self.encode_views_full(pixel_values)[0]

    # -- language model ----------------------------------------------------------------------------

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values=None,
        attention_mask: torch.Tensor | None = None,
        image_features=None,
        validate: bool = True,
    ) -> ModelInputs:
        """Qwen2.5-VL's embedding plus ``layer_additions``: injection layer i -> (B, S, hidden), the
        image tokens' deepstack features i at their positions, zeros elsewhere.

        ``image_features``, when given, is what :meth:`encode_views_full` returned (the views'
        tokens and their deepstack features): the tokens alone cannot make the additions.
        """
        if pixel_values is None:
            raise ValueError("embed needs the vision input (pixel_values and image_grid_thw) for the image positions")
        if image_features is None:
            image_features, injected = self.encode_views_full(pixel_values)
        elif isinstance(image_features, tuple) and len(image_features) == 2 and isinstance(image_features[1], dict):
            image_features, injected = image_features
        else:
            raise ValueError("Qwen3-VL adds deepstack features inside its first layers: pass "
                             "image_features=adapter.encode_views_full(vision_input), not the tokens alone")
        embedded = super().embed(input_ids, pixel_values, attention_mask, image_features, validate)
        is_image = (input_ids.to(self.device) == self.image_token_id)[..., None]
        zeros = torch.zeros_like(embedded.inputs_embeds)
        embedded.layer_additions = {
            layer: zeros.masked_scatter(is_image, torch.cat(list(views)).to(zeros.dtype))
            for layer, views in injected.items()
        }
        return embedded
