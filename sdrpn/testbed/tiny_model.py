"""The testbed's tiny LLaVA: a real ``LlavaForConditionalGeneration`` sized for a CPU.

Everything is built from public transformers classes and saved with ``save_pretrained``, so the
checkpoint loads offline like any llava-hf one::

    model = LlavaForConditionalGeneration.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)

Architecture (LLaVA-1.5's, scaled down):

* vision tower: CLIP ViT, 96x96 input, 8-pixel patches -> a 12x12 grid of image tokens (CLS
  dropped: ``vision_feature_select_strategy="default"``), 4 layers of width 128; features are
  taken from the last layer (``vision_feature_layer=-1``: with so few layers the penultimate one
  would leave a whole layer unused);
* projector: LLaVA-1.5's 2-layer GELU MLP;
* language model: LLaMA, 8 layers of width 128 with 4 heads (head dim 32), RoPE. Eight layers
  leave room for an RPN at K = 4 with T = 3 (blocks copied from layers 4-6), the same proportions
  as LLaVA-1.5-7B's K = 15 of 32.

Tokenizer: a whole-word vocabulary (the synthetic questions' words, the chat format's tokens)
where every number is read digit by digit: "47" is "4" followed by the continuation "##7"
(a ``tokenizers`` WordPiece model whose vocabulary holds whole words, so no other word is ever
split). Answers of two tokens matter for self-distillation: the fed-back first digit is the query
whose attention shows where the model reads the second one. The decoder joins the pieces back
("4", "##7" -> "47") and drops the marker of a continuation that starts an answer ("##7" -> "7"):
a model may begin with one, and a reader should not see the marker.

Image processor: llava-hf's geometry (resize the short side to 96, centre-crop 96x96, bicubic,
CLIP normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.synthetic import vocabulary

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyLlavaSpec",
    "build_config",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "continuation_decoder",
    "load_tiny_llava",
    "prompt_for",
]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
CHAT_WORDS = ("user", "assistant", ":")
DIGITS = tuple(str(digit) for digit in range(10))
CONTINUATION = "##"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny LLaVA (defaults: the shipped testbed model)."""

    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 128
    text_layers: int = 8
    text_heads: int = 4
    text_intermediate: int = 384
    max_positions: int = 1024

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


def _vocab() -> dict[str, int]:
    words = [*SPECIAL_TOKENS, *CHAT_WORDS, *DIGITS, *(CONTINUATION + d for d in DIGITS)]
    words += [word for word in vocabulary() if word not in words]
    return {word: index for index, word in enumerate(words)}


def continuation_decoder():
    """WordPiece decoding, then the marker of any continuation left over removed: the WordPiece
    decoder keeps it on a first token, which a generated answer can be."""
    from tokenizers import decoders

    return decoders.Sequence([decoders.WordPiece(prefix=CONTINUATION, cleanup=True),
                              decoders.Replace(CONTINUATION, "")])


def build_tokenizer():
    """The word-level tokenizer (``PreTrainedTokenizerFast``): lower-cases, prepends ``<s>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix=CONTINUATION))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    backend.decoder = continuation_decoder()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=1024,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    return tokenizer


def _image_processor(spec: TinyLlavaSpec):
    import transformers

    # The PIL backend is the reference the engine's device-side resampling reproduces; the saved
    # file names the generic CLIPImageProcessor either way.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": spec.image_size},
               crop_size={"height": spec.image_size, "width": spec.image_size},
               do_center_crop=True, resample=3)


def build_processor(spec: TinyLlavaSpec | None = None):
    """The ``LlavaProcessor``: image processor, tokenizer and chat template."""
    from transformers import LlavaProcessor

    spec = spec or TinyLlavaSpec()
    return LlavaProcessor(
        image_processor=_image_processor(spec), tokenizer=build_tokenizer(), patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_config(spec: TinyLlavaSpec | None = None):
    """The ``LlavaConfig`` of the tiny model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    spec = spec or TinyLlavaSpec()
    vocab = _vocab()
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads, vocab_size=len(vocab), max_position_embeddings=spec.max_positions,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    grid = spec.grid
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
        image_seq_length=grid[0] * grid[1], vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def build_model(spec: TinyLlavaSpec | None = None, seed: int = 0):
    """A freshly initialised tiny ``LlavaForConditionalGeneration`` (fp32, CPU), seeded."""
    from transformers import LlavaForConditionalGeneration

    config = build_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    text = config.text_config
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = text.bos_token_id, text.eos_token_id
    generation.pad_token_id = text.pad_token_id
    generation.max_new_tokens = 8
    generation.do_sample = False
    return model


def load_tiny_llava(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, processor)`` from a saved directory, offline, through the standard classes."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype, local_files_only=True)
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    return model.to(device).eval(), processor


def prompt_for(processor, question: str) -> str:
    """The chat prompt of one question about one image (what the engine and labeller send)."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)
