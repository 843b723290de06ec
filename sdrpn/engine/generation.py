"""Token selection and the decode loop shared by every method.

Token selection follows ``model.generate``: float32 logits of the last position, then (sampling
only) temperature, top-k and top-p through transformers' own public logits warpers, softmax and
``torch.multinomial``; greedy is the argmax. Finished rows receive the pad token; the loop stops
when every row has produced an end-of-sequence token or ``max_new_tokens`` tokens exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import ModelAdapter

__all__ = ["SamplingConfig", "decode"]

# The generation kwargs the engine understands (anything else is refused, not silently ignored).
SUPPORTED_KWARGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                    "pad_token_id", "num_beams", "num_return_sequences", "use_cache", "output_logits")
# transformers' defaults for unset sampling parameters.
DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 20}


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen.

    Attributes:
        max_new_tokens: tokens to generate at most.
        do_sample: sample (True) or take the argmax (False).
        temperature, top_k, top_p: sampling warpers (``top_k = 0`` and ``top_p = 1`` disable them).
        eos_token_ids: tokens that end a row.
        pad_token_id: written into finished rows.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @classmethod
    def resolve(cls, generation_config, **kwargs) -> SamplingConfig:
        """Explicit kwargs first, then the model's ``generation_config``, then transformers' defaults.

        Raises:
            ValueError: an unsupported option (beam search, several sequences per prompt, unknown kwargs).
        """
        unknown = sorted(set(kwargs) - set(SUPPORTED_KWARGS))
        if unknown:
            raise ValueError(f"unsupported generation options {unknown}; supported: {list(SUPPORTED_KWARGS)}")

        def option(name):
            value = kwargs.get(name)
            if value is None and generation_config is not None:
                value = getattr(generation_config, name, None)
            return DEFAULTS.get(name) if value is None else value

        if (option("num_beams") or 1) != 1:
            raise ValueError("beam search is not supported (num_beams must be 1)")
        if (option("num_return_sequences") or 1) != 1:
            raise ValueError("num_return_sequences must be 1")
        eos = option("eos_token_id")
        eos = () if eos is None else tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = option("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        max_new_tokens = int(option("max_new_tokens"))
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return cls(
            max_new_tokens=max_new_tokens,
            do_sample=bool(option("do_sample") or False),
            temperature=float(option("temperature")),
            top_k=int(option("top_k")),
            top_p=float(option("top_p")),
            eos_token_ids=eos,
            pad_token_id=int(pad),
        )

    def warpers(self):
        """transformers' logits warpers, in the order ``model.generate`` applies them."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        if not self.do_sample:
            return []
        warpers = []
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p))
        return warpers


def select_tokens(logits: torch.Tensor, config: SamplingConfig, warpers) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits."""
    scores = logits.float()
    if not config.do_sample:
        return scores.argmax(dim=-1)
    for warper in warpers:
        scores = warper(None, scores)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


@dataclass
class Decoded:
    """Generated tokens (B, T) and, when asked for, the (B, V) float32 logits of each step."""

    tokens: torch.Tensor
    logits: list[torch.Tensor] | None


def decode(
    adapter: ModelAdapter,
    cache,
    first_logits: torch.Tensor,
    attention_mask: torch.Tensor | None,
    next_position: torch.Tensor,
    config: SamplingConfig,
    keep_logits: bool = False,
    rope_delta: torch.Tensor | None = None,
) -> Decoded:
    """Generates after a prefill.

    Args:
        adapter: the model.
        cache: the prefill's cache (every layer holds the whole prompt); extended in place.
        first_logits: (B, V) logits of the last prompt position.
        attention_mask: (B, cached) bool key mask of the prompt, or None without padding.
        next_position: (B,) int64 position of the first generated token.
        config: token selection.
        keep_logits: also return every step's logits.
        rope_delta: (B,) rotary minus layer position of the generated tokens (multi-axis RoPE), or None.
    """
    warpers = config.warpers()
    batch = first_logits.shape[0]
    device = first_logits.device
    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    position = next_position.to(device).long().clone()
    logits = first_logits
    tokens, step_logits = [], []
    for step in range(config.max_new_tokens):
        if keep_logits:
            step_logits.append(logits.float())
        token = select_tokens(logits, config, warpers)
        token = torch.where(unfinished, token, config.pad_token_id)
        tokens.append(token)
        if step + 1 == config.max_new_tokens:
            break
        if eos.numel():  # without end-of-sequence tokens every row runs to max_new_tokens: no host read
            unfinished &= ~torch.isin(token, eos)
            if not bool(unfinished.any()):
                break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        hidden = adapter.embed_ids(token[:, None])
        rope = adapter.text_rope_positions(position[:, None], rope_delta)
        hidden = adapter.run_layers(hidden, 0, adapter.num_layers, position[:, None], attention_mask, cache, rope)
        logits = adapter.logits(hidden[:, -1])
        position += 1
    return Decoded(tokens=torch.stack(tokens, dim=1), logits=step_logits if keep_logits else None)
