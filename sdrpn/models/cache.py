"""A key/value cache that appends in place.

``transformers.DynamicCache`` concatenates at every update, so each decode step copies the whole
cache of every layer: at batch 8 and a 600-token prompt that copy is a third of the labelling
time on a CPU. Here a layer's keys and values are views of buffers with spare room; an append
writes into the room and grows the buffer by a quarter when it runs out (about a quarter more memory
than the tokens held), so the copies are amortised.
The values, their order and every ``Cache`` method the engine uses (``update``,
``get_seq_length``, ``crop``) are those of ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["AppendCache", "AppendLayer"]

# Spare tokens added whenever a buffer grows (on top of a quarter of its length): enough for short answers.
MIN_ROOM = 16


def _append(buffer: torch.Tensor | None, cached: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes ``new`` after ``cached`` along dim -2; returns the buffer and the view of its filled part.

    ``cached`` is the layer's current view: the first tokens of ``buffer``, or the empty tensor
    before the first update, or a tensor of its own after an inherited batch reindexing.
    """
    length = cached.shape[-2] if cached.ndim == new.ndim else 0
    end = length + new.shape[-2]
    in_buffer = (buffer is not None and cached.data_ptr() == buffer.data_ptr()
                 and cached.shape[:-2] == buffer.shape[:-2])
    if not in_buffer or end > buffer.shape[-2]:
        # The first update is allocated to size; later ones leave room for a quarter as many tokens again.
        room = end if length == 0 else max(end, length + length // 4 + MIN_ROOM)
        grown = new.new_empty((*new.shape[:-2], room, new.shape[-1]))
        if length:
            grown[..., :length, :].copy_(cached)
        buffer = grown
    buffer[..., length:end, :].copy_(new)
    return buffer, buffer[..., :end, :]


class AppendLayer(DynamicLayer):
    """One layer of :class:`AppendCache`: ``keys`` and ``values`` are views of larger buffers.

    ``crop`` (inherited) narrows the views; the next append writes over the cropped tokens.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._key_buffer, self.keys = _append(self._key_buffer, self.keys, key_states)
        self._value_buffer, self.values = _append(self._value_buffer, self.values, value_states)
        return self.keys, self.values


class AppendCache(Cache):
    """A ``transformers.Cache`` of :class:`AppendLayer`, one per decoder layer, added as they are used."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=AppendLayer)
