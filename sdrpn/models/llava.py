"""Adapter for ``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5 and its llava-hf ports)."""

from __future__ import annotations

import torch
from torch import nn

from .base import LanguageModelAdapter, ModelInputs, default_position_ids
from .geometry import ImageGeometry

__all__ = ["LlavaAdapter"]


class LlavaAdapter(LanguageModelAdapter):
    """Drives a LLaVA model: CLIP-style vision tower + projector, LLaMA-style decoder.

    One image per sample, with ``image_length`` placeholder tokens in the prompt (the llava-hf
    processor's layout). The RPN head scores without rotary embeddings, as the authors' LLaVA RPN.
    Prompts default to LLaVA-1.5's conversation template, ``vicuna_v1``.
    """

    family = "llava"
    rpn_uses_rope = False
    default_prompt_template = "vicuna_v1"
    default_label_heads = "llava-1.5-7b"  # the authors' released heads (13B: --heads llava-1.5-13b)
    default_sink_preset = "llava-1.5-7b"
    rpn_depth_presets = {32: "llava-1.5-7b", 40: "llava-1.5-13b"}

    def __init__(self, model: nn.Module, processor=None):
        super().__init__(model, processor)
        config, vision_config = model.config, model.config.vision_config
        self.patch_size = vision_config.patch_size
        side = vision_config.image_size // self.patch_size
        self.image_grid = (side, side)
        self.vision_input_size = (vision_config.image_size, vision_config.image_size)
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
        if config.vision_feature_select_strategy == "full":
            raise ValueError("vision_feature_select_strategy='full' (CLS token kept) has no token grid; "
                             "only 'default' is supported")
        self.geometry = ImageGeometry.from_processor(processor, self.vision_input_size)

    @staticmethod
    def set_processor_geometry(processor, mode: str) -> bool:
        """Pads to a square (``"pad"``, the original LLaVA's ``expand2square``) or centre-crops
        (``"crop"``) through the image processor's ``do_pad``. A CLIP image processor has no
        pad-to-square step (its ``do_pad`` pads a batch to one size): for ``"pad"`` it is replaced
        by the LLaVA image processor of the same settings."""
        if mode not in ("pad", "crop"):
            raise ValueError(f"geometry must be 'pad' or 'crop', got {mode!r}")
        image_processor = processor.image_processor
        if ImageGeometry.from_processor(image_processor, (0, 0)).mode == mode:
            return False
        if mode == "pad" and not hasattr(image_processor, "pad_to_square"):
            processor.image_processor = _llava_image_processor(image_processor)
        processor.image_processor.do_pad = mode == "pad"
        return True

    # -- vision ------------------------------------------------------------------------------------

    def view_grids(self, vision_input: torch.Tensor) -> list[tuple[int, int]]:
        """One patch grid per view, from the views' size (the vision input's, or another one's, e.g.
        res-scaling's larger views)."""
        height, width = vision_input.shape[-2:]
        return [(height // self.patch_size, width // self.patch_size)] * int(vision_input.shape[0])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, tokens, hidden) features of (B, 3, H, W) views; views of another size than the vision
        input are encoded with interpolated position embeddings."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        vision_device = next(self.model.model.vision_tower.parameters()).device
        vision_dtype = next(self.model.model.vision_tower.parameters()).dtype
        other_size = tuple(pixel_values.shape[-2:]) != tuple(self.vision_input_size)
        extra = {"interpolate_pos_encoding": True} if other_size else {}
        output = self.model.get_image_features(
            pixel_values=pixel_values.to(device=vision_device, dtype=vision_dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            **extra,
        )
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        return features.to(device=self.device, dtype=self.dtype)

    # -- language model ----------------------------------------------------------------------------

    def check_image_tokens(self, is_image: torch.Tensor) -> None:
        """Raises ValueError unless every row holds exactly one contiguous run of ``image_length``
        image tokens. Reads the mask on the host: call it on prompts, not in a hot loop."""
        is_image = is_image.cpu()
        counts = is_image.sum(dim=1)
        first = is_image.int().argmax(dim=1)
        for row, (count, start) in enumerate(zip(counts.tolist(), first.tolist())):
            if count != self.image_length or not bool(is_image[row, start:start + count].all()):
                raise ValueError(
                    f"prompt {row} must hold exactly one image as {self.image_length} contiguous image tokens "
                    f"(id {self.image_token_id}), found {count}; build prompts with the model's processor"
                )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        validate: bool = True,
    ) -> ModelInputs:
        input_ids, is_image, attention_mask = self.prompt_on_device(input_ids, attention_mask)
        batch, length = input_ids.shape
        if image_features is None:
            if pixel_values is None:
                raise ValueError("embed needs pixel_values or image_features for the image tokens")
            image_features = self.encode_images(pixel_values)
        if image_features.shape != (batch, self.image_length, self.hidden_size):
            raise ValueError(
                f"image features must be (B={batch}, {self.image_length}, {self.hidden_size}), "
                f"got {tuple(image_features.shape)}"
            )
        if validate:
            self.check_image_tokens(is_image)
        embeds = self.embed_ids(input_ids)
        embeds = embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))
        # The first image token of each sample; the processor writes the placeholders contiguously.
        positions = torch.arange(length, device=self.device)
        image_start = torch.where(is_image, positions, length).amin(dim=1)
        return ModelInputs(
            inputs_embeds=embeds,
            position_ids=default_position_ids(attention_mask),
            attention_mask=attention_mask,
            image_start=image_start,
            image_length=self.image_length,
            image_lengths=torch.full((batch,), self.image_length, device=self.device),
        )


def _llava_image_processor(image_processor):
    """The LLaVA image processor (which can pad to a square) with ``image_processor``'s settings,
    on the same backend (PIL or torchvision)."""
    import transformers

    settings = {key: value for key, value in image_processor.to_dict().items()
                if key not in ("image_processor_type", "processor_class")}
    pil = getattr(transformers, "LlavaImageProcessorPil", None)
    on_pil = pil is not None and type(image_processor).__name__.endswith("Pil")
    return (pil if on_pil else transformers.LlavaImageProcessor)(**settings)
