"""A tiny random Qwen2.5-VL checkpoint written to disk as a real one is laid out: ``config.json`` and
weights (``save_pretrained``), a word-level tokenizer with Qwen's special tokens and chat template
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and the image processor's
``preprocessor_config.json`` in the form Qwen2.5-VL's released checkpoints ship it.

The model is :func:`helpers.tiny_qwen.tiny_qwen2_5_vl` (its token ids are the tokenizer's). No
torchvision is needed to write it; ``AutoProcessor`` reads it where torchvision is installed.
:func:`write_qwen_checkpoint` writes any tiny Qwen model with these ids (Qwen3-VL:
:mod:`helpers.tiny_qwen3_checkpoint`).

    directory = save_tiny_qwen_checkpoint(tmp_path / "qwen")
    tokenizer = tiny_qwen_tokenizer()
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers.tiny_qwen import BOS, EOS, IMAGE, PAD, VIDEO, VISION_END, VISION_START, VOCAB, tiny_qwen2_5_vl

__all__ = ["save_tiny_qwen_checkpoint", "write_qwen_checkpoint", "tiny_qwen_tokenizer", "preprocessor_config",
           "CHAT_TEMPLATE", "QWEN3_CHAT_TEMPLATE", "MIN_PIXELS", "MAX_PIXELS", "IM_START", "IM_END"]

# Token ids: the model's (helpers.tiny_qwen) plus the chat markers; <|im_end|> ends an answer as in
# Qwen's generation config.
IM_START, IM_END = 3, EOS
SPECIAL = {PAD: "<|endoftext|>", BOS: "<|bos|>", IM_END: "<|im_end|>", IM_START: "<|im_start|>",
           IMAGE: "<|image_pad|>", VIDEO: "<|video_pad|>", VISION_START: "<|vision_start|>",
           VISION_END: "<|vision_end|>"}
WORDS = (
    "system user assistant You are a helpful . , ? : ! the an of in on at to is what which who where how many "
    "color text word sign written says number name left right top bottom red green blue yellow black white "
    "one two three four five yes no answer question single phrase using image picture this that there it "
    "store street car cat dog book page table chart value price time letter board"
).split()
DEFAULT_SYSTEM_PROMPT = ("{% if loop.first and message['role'] != 'system' %}"
                         "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}")
# Qwen2.5-VL's chat template, cut to what one image and a question need (the released one also
# handles videos, tool calls and numbered pictures).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    + DEFAULT_SYSTEM_PROMPT +
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's frames messages the same way but adds no system prompt of its own.
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(DEFAULT_SYSTEM_PROMPT, "")
# Small views keep the tiny model fast: 4 to 64 tokens (28 x 28 pixels each).
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28


def _vocabulary() -> dict[str, int]:
    vocab = {token: index for index, token in SPECIAL.items()}
    free = (index for index in range(VOCAB) if index not in SPECIAL)
    for word in WORDS:
        vocab[word] = next(free)
    return vocab


def tiny_qwen_tokenizer():
    """A fast tokenizer over the words above and Qwen's special tokens (ids within the tiny model's
    vocabulary), padding on the left, with the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _vocabulary()
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    assert max(vocab.values()) < VOCAB and tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE
    return tokenizer


def preprocessor_config(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> dict:
    """``preprocessor_config.json`` as Qwen2.5-VL's released checkpoints have it (their pixel budget
    replaced by a small one)."""
    return {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }


def save_tiny_qwen_checkpoint(directory, seed: int = 0, min_pixels: int = MIN_PIXELS,
                              max_pixels: int = MAX_PIXELS) -> Path:
    """Writes the tiny model, its tokenizer, chat template and image-processor config; returns the directory."""
    return write_qwen_checkpoint(directory, tiny_qwen2_5_vl(seed=seed), CHAT_TEMPLATE,
                                 preprocessor_config(min_pixels, max_pixels))


def write_qwen_checkpoint(directory, model, chat_template: str, preprocessor: dict) -> Path:
    """Writes ``model`` (token ids of :mod:`helpers.tiny_qwen`; answers end at <|im_end|>), the
    tokenizer, ``chat_template`` and ``preprocessor`` as preprocessor_config.json; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = [IM_END]
    model.save_pretrained(directory)
    tiny_qwen_tokenizer().save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(chat_template)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return directory
