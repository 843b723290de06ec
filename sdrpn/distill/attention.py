"""Answer-to-image attention rows of a few heads, without running the model in eager attention.

The rows are those an eager model would return with ``output_attentions=True``: for each answer
token as it is fed back (y1 .. y_{n-1}; the last prompt token, which predicts y1, is not a query),
the softmax over all keys of ``q . k / sqrt(head_dim)`` with RoPE applied and a causal mask,
restricted to the image-token columns. They are computed from the q and k of the wanted heads
only, while every layer keeps its own attention implementation (SDPA, FlashAttention), and the
forward stops after the last layer that is needed (DESIGN section 3.5).

Multi-axis RoPE (Qwen's M-RoPE) follows the adapter contract of :mod:`sdrpn.models.base`: the prompt
keeps the rotary positions ``embed`` gave it, and every answer token sits at its layer position plus
the row's ``rope_delta``, as decoding places it; features a family adds inside early layers
(``layer_additions``) are added at the prompt positions. Images of different token counts in one
batch are read up to the largest count; a sample's columns beyond its own count are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.base import ModelAdapter, ModelInputs, default_position_ids
from ..prompts import template_for


def head_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    heads: torch.Tensor,
    query_positions: torch.Tensor,
    key_padding: torch.Tensor,
    image_start: torch.Tensor,
    image_tokens: int,
    scaling: float,
    image_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weights of ``heads`` from the query positions to the image tokens.

    Args:
        query: ``(B, num_heads, S, D)`` queries of one layer, RoPE applied.
        key: ``(B, num_kv_heads, S, D)`` keys of the same layer, RoPE applied.
        heads: ``(h,)`` int64 indices of the wanted query heads. A query head reads key head
            ``head // (num_heads // num_kv_heads)`` (grouped-query attention).
        query_positions: ``(B, A)`` int64 sequence positions of the queries.
        key_padding: ``(B, S)`` bool, True on padding keys (never attended to).
        image_start: ``(B,)`` int64 position of each sample's first image token.
        image_tokens: number of image tokens ``N`` (contiguous from ``image_start``).
        scaling: the layer's softmax scale (``head_dim ** -0.5`` for LLaMA).
        image_lengths: ``(B,)`` image tokens of each sample where they differ (``image_tokens`` is
            then the largest); the columns beyond a sample's own count are 0. None: all ``N``.

    Returns:
        ``(B, h, A, N)`` float32 attention weights; each full row (over all ``S`` keys) sums to 1.
    """
    batch, num_heads, length, _ = query.shape
    groups = num_heads // key.shape[1]
    index = query_positions[:, None, :, None].expand(batch, heads.numel(), -1, query.shape[-1])
    q = query[:, heads].gather(2, index).float()                                 # (B, h, A, D)
    k = key[:, heads // groups].float()                                          # (B, h, S, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling                      # (B, h, A, S)
    keys = torch.arange(length, device=query.device)
    hidden = (keys[None, None, :] > query_positions[:, :, None]) | key_padding[:, None, :]
    weights = scores.masked_fill(hidden[:, None], float("-inf")).softmax(dim=-1)
    offsets = torch.arange(image_tokens, device=query.device)
    columns = (image_start[:, None] + offsets).clamp(max=length - 1)
    rows = weights.gather(3, columns[:, None, None, :].expand(batch, heads.numel(), weights.shape[2], -1))
    if image_lengths is not None:
        beyond = offsets[None, :] >= image_lengths.to(query.device)[:, None]
        rows = rows.masked_fill(beyond[:, None, None, :], 0.0)
    return rows


def grounding_map(rows: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Average ``(B, h, A, N)`` rows over the heads and the real queries: ``(B, N)``.

    A sample without any query (the model answered with end-of-sequence at once) gets zeros.
    """
    weights = query_mask.to(torch.float32)
    total = (rows.float().mean(dim=1) * weights[:, :, None]).sum(dim=1)
    return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


@dataclass(frozen=True)
class TeacherForcedBatch:
    """Prompt + the model's own answers, laid out for one forward pass.

    Each row is ``[left padding][prompt][y1 .. y_{n-1}][right padding]``: the fed-back answer tokens
    follow the (left-padded) prompt, so that all queries share the positions ``P .. P + A - 1``.

    Attributes:
        inputs: the prompt's :class:`~sdrpn.models.base.ModelInputs` (image tokens included).
        answer_ids: ``(B, A)`` fed-back answer tokens (padding where ``query_mask`` is False).
        query_mask: ``(B, A)`` True on real answer tokens.
    """

    inputs: ModelInputs
    answer_ids: torch.Tensor
    query_mask: torch.Tensor

    @property
    def query_positions(self) -> torch.Tensor:
        """``(B, A)`` sequence positions of the answer queries."""
        batch, answers = self.answer_ids.shape
        start = self.inputs.inputs_embeds.shape[1]
        return torch.arange(start, start + answers, device=self.answer_ids.device).expand(batch, answers)


def teacher_forced_batch(inputs: ModelInputs, answers: Sequence[Sequence[int]], pad_id: int) -> TeacherForcedBatch:
    """Lay out prompts and answers for :func:`capture`.

    Args:
        inputs: the embedded, left-padded prompts.
        answers: per sample, the generated token ids including the final end-of-sequence token when
            there is one. All but the last are fed back and become queries; the last one is only
            ever predicted.
        pad_id: token id used for the right padding (never attended to).
    """
    device = inputs.inputs_embeds.device
    fed = [list(answer)[:-1] for answer in answers]
    width = max((len(tokens) for tokens in fed), default=0)
    answer_ids = torch.full((len(fed), width), pad_id, dtype=torch.int64)
    query_mask = torch.zeros((len(fed), width), dtype=torch.bool)
    for row, tokens in enumerate(fed):
        answer_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        query_mask[row, :len(tokens)] = True
    return TeacherForcedBatch(inputs, answer_ids.to(device), query_mask.to(device))


@dataclass(frozen=True)
class CaptureRequest:
    """What :func:`capture` reads from the forward pass.

    Attributes:
        heads: layer -> query heads whose answer-to-image rows are wanted.
        hidden_layers: layers whose *input* hidden states at the image tokens are wanted
            (norm-based sink detection).
    """

    heads: dict[int, tuple[int, ...]]
    hidden_layers: tuple[int, ...] = ()

    @property
    def last_layer(self) -> int:
        return max([*self.heads, *self.hidden_layers])

    def merge(self, other: "CaptureRequest") -> "CaptureRequest":
        """Everything either request reads (heads of a shared layer are united)."""
        heads = {layer: set(layer_heads) for layer, layer_heads in self.heads.items()}
        for layer, layer_heads in other.heads.items():
            heads.setdefault(layer, set()).update(layer_heads)
        return CaptureRequest({layer: tuple(sorted(h)) for layer, h in sorted(heads.items())},
                              tuple(sorted({*self.hidden_layers, *other.hidden_layers})))


@dataclass
class Capture:
    """Rows and hidden states read by :func:`capture`.

    Attributes:
        request: what was asked for.
        rows: layer -> ``(B, h, A, N)`` float32 attention of the requested heads (in request order)
            from the answer queries to the image tokens.
        hidden: layer -> ``(B, N, hidden)`` image-token states entering that layer.
        query_mask: ``(B, A)`` True on real answer queries.
        image_lengths: ``(B,)`` image tokens of each sample (``N`` is the largest; rows and states
            beyond a sample's own count are not its image's), or None where not recorded.
    """

    request: CaptureRequest
    rows: dict[int, torch.Tensor]
    hidden: dict[int, torch.Tensor]
    query_mask: torch.Tensor
    image_lengths: torch.Tensor | None = None

    def select(self, heads: dict[int, Sequence[int]]) -> torch.Tensor:
        """``(B, h, A, N)`` rows of the given layer -> heads, concatenated in that order."""
        parts = []
        for layer, wanted in heads.items():
            available = self.request.heads[layer]
            index = torch.tensor([available.index(head) for head in wanted], device=self.rows[layer].device)
            parts.append(self.rows[layer].index_select(1, index))
        return torch.cat(parts, dim=1)


@dataclass
class PromptPrefix:
    """The prompt's share of the teacher-forced pass, left over by a prefill that already ran it.

    Attributes:
        cache: key/value cache holding exactly the (padded) prompt in every layer below the last
            requested one (e.g. the generation cache cropped back to the prompt).
        states: layer -> ``(B, P, hidden)`` states entering that layer at the prompt positions,
            for every layer of the request.
    """

    cache: object
    states: dict[int, torch.Tensor]


@torch.no_grad()
def capture(adapter: ModelAdapter, batch: TeacherForcedBatch, request: CaptureRequest,
            prefix: PromptPrefix | None = None) -> Capture:
    """One teacher-forced pass over prompt + answers, stopped at the last requested layer.

    Every decoder layer runs with the model's own attention implementation; only the requested
    heads' rows are formed, from their q and k (:func:`head_rows`). With ``prefix`` the prompt
    part of the pass is taken from it and only the answer tokens run through the layers (against
    the cached prompt keys and values): the same pass, without computing the prompt twice.
    """
    if not request.heads and not request.hidden_layers:
        raise ValueError("nothing to capture: no heads and no hidden layers requested")
    if request.last_layer >= adapter.num_layers:
        raise ValueError(f"layer {request.last_layer} requested, the model has {adapter.num_layers} layers")
    inputs = batch.inputs
    prompt_length = inputs.inputs_embeds.shape[1]
    answers = adapter.embed_ids(batch.answer_ids).to(inputs.inputs_embeds.dtype)
    key_mask = torch.cat([inputs.attention_mask, batch.query_mask], dim=1)
    positions = default_position_ids(key_mask)
    # Rotary positions: the prompt's own, the answers' as decoding places them (None for 1-D RoPE).
    answer_rope = adapter.text_rope_positions(positions[:, prompt_length:], inputs.rope_delta)
    rope = None if inputs.rope_position_ids is None else torch.cat([inputs.rope_position_ids.to(positions.device),
                                                                    answer_rope], dim=-1)
    if prefix is None:
        hidden, running_positions, cache = torch.cat([inputs.inputs_embeds, answers], dim=1), positions, None
        running_rope, additions = rope, _extended(inputs.layer_additions, answers.shape[1])
    else:
        hidden, running_positions, cache = answers, positions[:, prompt_length:], prefix.cache
        running_rope, additions = (None if rope is None else answer_rope), None  # nothing is added to text
    image_tokens = inputs.image_length
    image_lengths = inputs.image_lengths
    offsets = torch.arange(image_tokens, device=positions.device)
    image_positions = (inputs.image_start[:, None] + offsets).clamp(max=key_mask.shape[1] - 1)
    rows: dict[int, torch.Tensor] = {}
    states: dict[int, torch.Tensor] = {}
    current = 0
    for layer in sorted({*request.heads, *request.hidden_layers}):
        if hidden.shape[1]:
            hidden = adapter.run_layers(hidden, current, layer, running_positions, key_mask, cache, running_rope,
                                        additions)
        current = layer
        full = hidden if prefix is None else torch.cat([prefix.states[layer], hidden], dim=1)
        if layer in request.hidden_layers:
            index = image_positions[:, :, None].expand(-1, -1, full.shape[-1]).to(full.device)
            states[layer] = full.gather(1, index)
        if layer in request.heads:
            query, key = adapter.attention_qk(layer, full, positions, rope)
            heads = torch.tensor(request.heads[layer], dtype=torch.int64, device=query.device)
            scaling = getattr(adapter.layer(layer).self_attn, "scaling", adapter.head_dim ** -0.5)
            rows[layer] = head_rows(query, key, heads, batch.query_positions.to(query.device),
                                    ~key_mask.to(query.device), inputs.image_start.to(query.device), image_tokens,
                                    scaling, image_lengths)
    return Capture(request, rows, states, batch.query_mask, image_lengths)


def _extended(additions: dict[int, torch.Tensor] | None, answers: int) -> dict[int, torch.Tensor] | None:
    """Prompt-length ``layer_additions`` extended with zeros over ``answers`` appended tokens."""
    if not additions:
        return None
    return {layer: torch.cat([added, added.new_zeros(added.shape[0], answers, added.shape[2])], dim=1)
            for layer, added in additions.items()}


@dataclass
class Reading:
    """What :meth:`AttentionReader.read` returns for one batch.

    Attributes:
        answers: per sample, the generated ids (ending with end-of-sequence when one was produced).
        texts: the decoded answers.
        capture: the rows and states read over prompt + answer.
    """

    answers: list[list[int]]
    texts: list[str]
    capture: Capture


class AttentionReader:
    """Lets a model answer questions greedily, then reads its attention over prompt + answer.

    The answers are greedy (the engine's decode loop, the model's own attention implementation);
    the rows come from :func:`capture`, whose prompt part is shared with the answer's prefill.
    ``processor`` is needed by :meth:`read` (prompts, images, decoding), not by
    :meth:`read_encoded`. Prompts follow ``prompt`` (a :mod:`sdrpn.prompts` preset name, recorded
    dict or template; None: the model family's default, ``vicuna_v1`` for LLaVA).
    """

    def __init__(self, model, processor=None, max_new_tokens: int = 128, adapter: ModelAdapter | None = None,
                 prompt=None):
        from ..models import adapter_for

        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.adapter = adapter or adapter_for(model, processor)
        self.template = template_for(prompt, self.adapter)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        generation = model.generation_config
        eos = generation.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else generation.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    def _cut(self, generated: torch.Tensor) -> list[list[int]]:
        """Generated ids cut after the first end-of-sequence token."""
        answers = []
        for row in generated.tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.eos_ids), len(row))
            answers.append(row[:end])
        return answers

    @torch.no_grad()
    def read_encoded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values,
                     request: CaptureRequest) -> tuple[list[list[int]], Capture]:
        """Answer processor outputs (left-padded) and capture ``request``; returns the generated
        ids per sample and the capture. ``pixel_values`` is the family's vision input
        (:meth:`vision_input`): the ``pixel_values`` tensor, or a dict of the processor outputs the
        adapter names (Qwen: with ``image_grid_thw``).

        The prefill keeps the prompt's states entering the requested layers and its cache; after
        greedy decoding the cache is cropped back to the prompt, so that the teacher-forced pass
        only runs the answer tokens (:class:`PromptPrefix`).
        """
        from ..engine.generation import SamplingConfig, decode

        adapter = self.adapter
        inputs = adapter.embed(input_ids, pixel_values, attention_mask)
        cache = adapter.new_cache()
        hidden, states, current = inputs.inputs_embeds, {}, 0
        rope, additions = inputs.rope_position_ids, inputs.layer_additions
        for layer in sorted({*request.heads, *request.hidden_layers}):
            hidden = adapter.run_layers(hidden, current, layer, inputs.position_ids, inputs.attention_mask, cache,
                                        rope, additions)
            states[layer], current = hidden, layer
        hidden = adapter.run_layers(hidden, current, adapter.num_layers, inputs.position_ids, inputs.attention_mask,
                                    cache, rope, additions)
        config = SamplingConfig(max_new_tokens=self.max_new_tokens, eos_token_ids=tuple(sorted(self.eos_ids)),
                                pad_token_id=self.pad_id)
        decoded = decode(adapter, cache, adapter.logits(hidden[:, -1]), inputs.attention_mask,
                         inputs.attention_mask.sum(dim=1), config, rope_delta=inputs.rope_delta)
        answers = self._cut(decoded.tokens)
        fed_back = cache.get_seq_length() - inputs.inputs_embeds.shape[1]
        if fed_back:
            cache.crop(-fed_back)  # back to the prompt (a negative count removes tokens in every version)
        batch = teacher_forced_batch(inputs, answers, self.pad_id)
        return answers, capture(adapter, batch, request, PromptPrefix(cache, states))

    def vision_input(self, encoded):
        """The family's vision input from processor outputs (:meth:`ModelAdapter.vision_input`)."""
        return self.adapter.vision_input(encoded)

    def read(self, images: Sequence, questions: Sequence[str], request: CaptureRequest) -> Reading:
        """Answer one batch of (image, question) and capture ``request`` over prompt + answer."""
        if self.processor is None:
            raise ValueError("AttentionReader.read needs the model's processor")
        prompts = [self.template.render(question, self.processor) for question in questions]
        encoded = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True,
                                 padding_side="left")
        answers, captured = self.read_encoded(encoded["input_ids"], encoded["attention_mask"],
                                              self.vision_input(encoded), request)
        texts = [self.tokenizer.decode([t for t in answer if t not in self.eos_ids], skip_special_tokens=True).strip()
                 for answer in answers]
        return Reading(answers, texts, captured)
