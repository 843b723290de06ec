"""The token layout of a batch of prompts for two-stage inference.

Processor outputs put padding on one side of each prompt, so the end of the image (where stage 2
inserts the RoI tokens) sits at a different index in every row. We re-lay the batch once, on the
host and before stage 1, so that every row has the same shape:

    stage 1:  [pad][system + image]  |  [pad][question]          length E + Q
              \\_____ prefix, E _____/   \\__ question block, Q __/
    stage 2:  [prefix, E] [RoI slots, C] [question block, Q]      length E + C + Q

The prefix ends at index E in every row, so stage 2 keeps the first E cached keys of stage 1 and
reuses the question block as is. Padding sits anywhere (masked keys); positions count real tokens
only, so every row computes exactly what it would compute alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PromptLayout"]


@dataclass
class PromptLayout:
    """A batch of one-image prompts laid out for stage 1 (host-built, then moved to the device).

    Attributes:
        input_ids: (B, E + Q) token ids, ``pad_token_id`` in padding.
        attention_mask: (B, E + Q) bool, True for real tokens.
        prefix_length: E, the index where the prefix ends in every row (after the last image token).
        question_length: Q, the width of the question block.
        prefix_tokens: (B,) int64 real tokens in each prefix (the position of the first RoI token).
        question_tokens: (B,) int64 real tokens in each question.
        image_start: (B,) int64 index of the first image token of each row.
        image_lengths: (B,) int64 image tokens of each row (views of their own grid differ).
        padded: whether any row holds padding (without, attention needs no mask).
        tail: tokens after the image that stay in the prefix (the image ends at E - tail).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix_length: int
    question_length: int
    prefix_tokens: torch.Tensor
    question_tokens: torch.Tensor
    image_start: torch.Tensor
    image_lengths: torch.Tensor
    padded: bool
    tail: int = 0

    @classmethod
    def build(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
              image_lengths: int | list[int], pad_token_id: int, tail: int = 0) -> PromptLayout:
        """Lays out processor outputs (left or right padded) as described in the module docstring.

        ``image_lengths``: the image tokens each row must hold (one count for all rows, or one per row).
        ``tail``: tokens after the image kept in the prefix (e.g. the image's closing token, where
        the RoI view follows it as a block of its own).
        """
        input_ids = input_ids.cpu()
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        if isinstance(image_lengths, int):
            image_lengths = [image_lengths] * input_ids.shape[0]
        if len(image_lengths) != input_ids.shape[0]:
            raise ValueError(f"got {len(image_lengths)} images for {input_ids.shape[0]} prompts; one image per prompt")
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.cpu().bool())
        prefixes, questions = [], []
        for row, (ids, real, image_length) in enumerate(zip(input_ids, mask, image_lengths)):
            tokens = ids[real]
            image = (tokens == image_token_id).nonzero().flatten()
            if image.numel() != image_length or image[-1] - image[0] + 1 != image_length:
                raise ValueError(
                    f"prompt {row} must hold exactly one image as {image_length} contiguous image tokens "
                    f"(id {image_token_id}), found {image.numel()}; build prompts with the model's processor"
                )
            end = int(image[-1]) + 1 + tail
            if end > len(tokens):
                raise ValueError(f"prompt {row} ends before the {tail} token(s) that follow its image")
            prefixes.append(tokens[:end])
            questions.append(tokens[end:])
        prefix_length = max(len(p) for p in prefixes)
        question_length = max(len(q) for q in questions)
        batch = len(prefixes)
        ids = torch.full((batch, prefix_length + question_length), pad_token_id, dtype=torch.long)
        real = torch.zeros_like(ids, dtype=torch.bool)
        for row, (prefix, question) in enumerate(zip(prefixes, questions)):
            ids[row, prefix_length - len(prefix):prefix_length] = prefix
            real[row, prefix_length - len(prefix):prefix_length] = True
            if len(question):
                ids[row, -len(question):] = question
                real[row, -len(question):] = True
        prefix_tokens = torch.tensor([len(p) for p in prefixes])
        lengths = torch.tensor(image_lengths, dtype=torch.long)
        return cls(
            input_ids=ids,
            attention_mask=real,
            prefix_length=prefix_length,
            question_length=question_length,
            prefix_tokens=prefix_tokens,
            question_tokens=torch.tensor([len(q) for q in questions]),
            image_start=prefix_length - tail - lengths,
            image_lengths=lengths,
            padded=not bool(real.all()),
            tail=tail,
        )

    def to(self, device) -> PromptLayout:
        return PromptLayout(
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            prefix_length=self.prefix_length,
            question_length=self.question_length,
            prefix_tokens=self.prefix_tokens.to(device, non_blocking=True),
            question_tokens=self.question_tokens.to(device, non_blocking=True),
            image_start=self.image_start.to(device, non_blocking=True),
            image_lengths=self.image_lengths.to(device, non_blocking=True),
            padded=self.padded,
            tail=self.tail,
        )

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]
