"""Processors of local checkpoints where transformers' own loader needs more than images do.

transformers' Qwen2.5-VL and Qwen3-VL processors insist on a video processor, and every video
processor needs torchvision; machines without it (CPU-only setups with a CPU build of torch) can
still process images. :data:`TORCHVISION_FREE_PROCESSORS` builds such a family's processor without it.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["TORCHVISION_FREE_PROCESSORS", "only_torchvision_missing", "no_video_processor"]


def only_torchvision_missing(exc: Exception) -> bool:
    """Whether ``exc`` is transformers saying that torchvision is required, and torchvision is indeed
    not installed (an installed torchvision that fails to load is another problem, left to show)."""
    from transformers.utils import is_torchvision_available

    return "torchvision" in str(exc).lower() and not is_torchvision_available()


@functools.lru_cache(maxsize=None)
def _no_video_processor_class() -> type:
    """The class of :func:`no_video_processor` (made on first use: transformers is imported late)."""
    from transformers.utils import PushToHubMixin

    class NoVideoProcessor(PushToHubMixin):
        """Where the video processor of a processor built without torchvision would be: it refuses
        videos, saying why. It has what the processor reads of a video processor whatever the input
        (``model_input_names``, patch and merge sizes; ``to_dict`` and ``_auto_class`` for its repr
        and ``to_dict``)."""

        _auto_class = None
        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __init__(self, image_processor):
            for name in ("patch_size", "temporal_patch_size", "merge_size"):
                setattr(self, name, getattr(image_processor, name, None))

        def __call__(self, *args, **kwargs):
            raise ImportError("this processor was built without torchvision (not installed), so it has no video "
                              "processor: install torchvision to process videos")

        preprocess = __call__

        def to_dict(self) -> dict:
            return {}

        def __repr__(self) -> str:
            return "NoVideoProcessor (torchvision is not installed: videos are refused)"

    return NoVideoProcessor


def no_video_processor(image_processor):
    """A stand-in video processor that refuses videos, with ``image_processor``'s patch and merge sizes."""
    return _no_video_processor_class()(image_processor)


def _qwen_processor_without_torchvision(processor_name: str, path: Path):
    """``processor_name`` (``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) of a local checkpoint of
    its family, built without torchvision. Both families use the Qwen2-VL image processor (Qwen3-VL
    with its own patch size, mean and std, read from the checkpoint) and frame an image alike.

    What ``AutoProcessor`` would build, less the video processor: the tokenizer
    (``AutoTokenizer``), the chat template and any other processor settings the directory records
    (``get_processor_dict``: chat_template.jinja / chat_template.json / processor_config.json), and
    the PIL backend of the Qwen2-VL image processor from ``preprocessor_config.json`` (the backend
    ``AutoImageProcessor`` itself picks without torchvision in transformers >= 5.25; 5.17's
    ``AutoImageProcessor`` refuses to run without torchvision altogether).

    Why the processor's argument check is bypassed for the video processor: in transformers 5.17
    to 5.25 every video processor is a torchvision class (``BaseVideoProcessor`` derives from the
    torchvision image backend; Qwen2-VL's imports torchvision at module level), and
    ``ProcessorMixin.__init__`` checks each argument's class by name, a lookup that without
    torchvision raises before looking at the argument (5.25 resolves "VideoProcessorMixin" through the
    torchvision-only video-processor mapping; 5.17 checks against the torchvision-only
    "BaseVideoProcessor"), so no object, not even None, passes it. The narrowest way around is to skip
    that one check on this one instance while it is built, and to give it a stand-in that refuses
    videos; the tokenizer and the image processor are still checked, transformers is not changed,
    and the object is a plain ``processor_name``. With torchvision installed, ``AutoProcessor``
    is used and none of this runs.
    """
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor_class = getattr(transformers, processor_name)
    settings, _ = processor_class.get_processor_dict(path, local_files_only=True)
    image_config = settings.pop("image_processor", None)  # newer processor_config.json nests its sub-processors
    settings.pop("video_processor", None)
    settings.pop("processor_class", None)
    settings.pop("auto_map", None)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if isinstance(image_config, dict) and not (path / "preprocessor_config.json").is_file():
        image_config = {key: value for key, value in image_config.items() if key != "image_processor_type"}
        image_processor = Qwen2VLImageProcessorPil(**image_config)
    else:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    processor = processor_class.__new__(processor_class)
    checked = processor.check_argument_for_proper_class

    def check(argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, _no_video_processor_class()):
            return type(argument)
        return checked(argument_name, argument)

    processor.check_argument_for_proper_class = check  # this instance only, while it is built
    try:
        processor.__init__(image_processor=image_processor, tokenizer=tokenizer,
                           video_processor=no_video_processor(image_processor), **settings)
    finally:
        del processor.check_argument_for_proper_class
    return processor


_qwen2_5_vl_processor_without_torchvision = functools.partial(_qwen_processor_without_torchvision,
                                                              "Qwen2_5_VLProcessor")
_qwen3_vl_processor_without_torchvision = functools.partial(_qwen_processor_without_torchvision, "Qwen3VLProcessor")

# model_type -> builder of the checkpoint's processor without torchvision (see load_processor); the
# Qwen3-VL mixture-of-experts checkpoints name the dense model's processor.
TORCHVISION_FREE_PROCESSORS = {"qwen2_5_vl": _qwen2_5_vl_processor_without_torchvision,
                               "qwen3_vl": _qwen3_vl_processor_without_torchvision,
                               "qwen3_vl_moe": _qwen3_vl_processor_without_torchvision}
