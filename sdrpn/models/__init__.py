"""Model adapters: one per MLLM family, all implementing :class:`sdrpn.models.base.ModelAdapter`."""

from __future__ import annotations

from .base import ModelAdapter, ModelInputs
from .geometry import ImageGeometry, ViewTransform

__all__ = ["ModelAdapter", "ModelInputs", "ImageGeometry", "ViewTransform", "adapter_for", "adapter_class"]


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class of a ``config.model_type``.

    Raises:
        TypeError: the model's family is not supported.
    """
    if model_type == "llava":
        from .llava import LlavaAdapter

        return LlavaAdapter
    if model_type == "qwen2_5_vl":
        from .qwen2_5_vl import Qwen2_5_VLAdapter

        return Qwen2_5_VLAdapter
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):  # the MoE sibling differs only inside its MLPs
        from .qwen3_vl import Qwen3VLAdapter

        return Qwen3VLAdapter
    raise TypeError(f"no sdrpn adapter for config.model_type={model_type!r}; supported: llava, qwen2_5_vl, "
                    f"qwen3_vl, qwen3_vl_moe")


def adapter_for(model, processor=None) -> ModelAdapter:
    """The adapter for a loaded Hugging Face MLLM (an adapter is returned unchanged).

    Args:
        model: e.g. a ``transformers.LlavaForConditionalGeneration``, as loaded by the user.
        processor: its processor, for the image geometry (None: the family's default geometry).

    Raises:
        TypeError: the model's family is not supported.
    """
    if isinstance(model, ModelAdapter):
        return model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        cls = adapter_class(model_type)
    except TypeError as exc:
        raise TypeError(f"{type(model).__name__}: {exc}") from None
    return cls(model, processor)
