"""Grounding heads: which (layer, head) pairs the pseudo labels are read from, and how to find them.

A selection is written ``LAYER:HEAD,HEAD[;LAYER:HEAD,...]`` (``14:13,24,26``), named by a preset
(``llava-1.5-7b``), or stored in a JSON file written by ``sdrpn heads``.

**Scoring.** A grounding head looks at a small part of the image, and a different part for every
question. Over a calibration set, for each head and sample, with the head's answer-to-image
attention averaged over the answer tokens and ``p`` that map renormalised over the ``n`` image
tokens that are not detected sinks:

* ``image_share``: the fraction of the attention that lands on image tokens at all (a head that
  reads only text cannot ground anything);
* ``concentration``: ``1 - H(p) / log(n)``, 1 for a single token, 0 for a uniform spread;
* ``specificity``: ``(H(mean p) - mean H(p)) / log(N)``, with ``N`` all the image tokens: the
  Jensen-Shannon divergence of the samples' maps (the information a map carries about which
  sample it came from). It is high only for a head that is concentrated *and* looks somewhere
  else for every question.

A head's score is ``mean image_share * specificity``. Concentration alone is not enough: a head
that parks its attention on the same few tokens for every question (a positional sink that the
sink detector missed, common in small models) is concentrated yet says nothing about the
question, and its specificity is near 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from ..errors import UserError
from ..issues import report_issue
from ..prompts import PromptTemplate
from .attention import AttentionReader, CaptureRequest
from .records import Record, RecordIssue, open_record_image
from .sinks import SinkSpec

# Below this many scored samples the ranking is noise-dominated; ``sdrpn heads`` warns.
RECOMMENDED_SAMPLES = 32

PRESETS = {
    # Released setting of the SD-RPN authors for LLaVA-1.5-7B.
    "llava-1.5-7b": "14:13,24,26",
    # LLaVA-1.5-13B (LLaVA/llava/eval/model_vqa_label.py:145).
    "llava-1.5-13b": "13:21,23,26;15:2;16:2,21,30",
    # Qwen2.5-VL, by model size and image kind: text images (OCR-VQA) from
    # Qwen2.5-VL/make_pseudo_label_textual.py:91-96, natural images (GQA) from
    # Qwen2.5-VL/make_pseudo_label_natural.py:93-99. Their sink detectors: sinks.SINK_PRESETS.
    "qwen2.5-vl-7b-text": "22:1,4;23:6,11",
    "qwen2.5-vl-7b-natural": "16:1,7,17;19:17,20",
    "qwen2.5-vl-3b-text": "20:1,4;22:14",
    "qwen2.5-vl-3b-natural": "21:9,11;22:0,7",
}


class RPNDepth(NamedTuple):
    """Where the RPN sits in a model: it reads the input of layer ``start_layer`` (K) and spans
    ``num_blocks`` (T) layers (the :class:`sdrpn.rpn.RPN` arguments of the same names)."""

    start_layer: int
    num_blocks: int


RPN_DEPTH_PRESETS = {
    # LLaVA/scripts/finetune_rois.sh:49-50 and finetune_rois_13b.sh:49-50.
    "llava-1.5-7b": RPNDepth(15, 3),
    "llava-1.5-13b": RPNDepth(15, 3),
    # Qwen2.5-VL/qwen-vl-finetune/scripts/A6000/finetune_roi_fix_res_7b.sh:18-19 (twig_K, twig_T).
    "qwen2.5-vl-7b": RPNDepth(16, 3),
    # Qwen2.5-VL/qwen-vl-finetune/scripts/A6000/finetune_roi_fix_res.sh:18-19.
    "qwen2.5-vl-3b": RPNDepth(21, 3),
    # Qwen3-VL: none released. K at the relative depth of the authors' Qwen2.5-VL choices (16 of 28,
    # 21 of 36 layers: ~0.57), T 3; K >= 3 in any case, past the deepstack layers 0-2. Keyed by depth:
    # 2B has 28 decoder layers, 4B and 8B 36, 32B 64 (their config.json).
    "qwen3-vl-2b": RPNDepth(16, 3),
    "qwen3-vl-4b/8b": RPNDepth(21, 3),
    "qwen3-vl-32b": RPNDepth(37, 3),
}
"""K and T per model: the authors' where they released an RPN, else chosen by relative depth."""

SELECTION_FORMAT = "sdrpn-heads/1"


@dataclass(frozen=True)
class HeadSelection:
    """A set of (layer, head) pairs, sorted."""

    pairs: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not self.pairs:
            raise ValueError("a head selection needs at least one (layer, head) pair")
        if any(layer < 0 or head < 0 for layer, head in self.pairs):
            raise ValueError(f"layers and heads must be >= 0, got {list(self.pairs)}")
        object.__setattr__(self, "pairs", tuple(sorted(set(self.pairs))))

    @property
    def by_layer(self) -> dict[int, tuple[int, ...]]:
        """layer -> its selected heads, layers ascending."""
        layers: dict[int, list[int]] = {}
        for layer, head in self.pairs:
            layers.setdefault(layer, []).append(head)
        return {layer: tuple(heads) for layer, heads in layers.items()}

    def __str__(self) -> str:
        return ";".join(f"{layer}:{','.join(map(str, heads))}" for layer, heads in self.by_layer.items())

    @classmethod
    def parse(cls, text: str) -> "HeadSelection":
        """From ``14:13,24,26`` (``;`` between layers), a preset name or a selection file."""
        text = text.strip()
        if text in PRESETS:
            return cls.parse(PRESETS[text])
        if Path(text).is_file():
            return cls.load(text)
        pairs = []
        for part in filter(None, (piece.strip() for piece in text.split(";"))):
            layer, colon, heads = part.partition(":")
            try:
                if not colon:
                    raise ValueError
                pairs.extend((int(layer), int(head)) for head in heads.split(",") if head.strip())
            except ValueError:
                raise ValueError(f"expected LAYER:HEAD,HEAD[;LAYER:HEAD,...] (e.g. 14:13,24,26), a preset "
                                 f"({', '.join(PRESETS)}) or a file written by sdrpn heads; got {text!r}") from None
        return cls(tuple(pairs))

    @classmethod
    def load(cls, path: str | Path) -> "HeadSelection":
        """Read a selection file written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != SELECTION_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {SELECTION_FORMAT!r}")
            return cls(tuple((int(layer), int(head)) for layer, head in data["heads"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a head selection file ({exc})") from None

    def save(self, path: str | Path, scores: list[dict] | None = None, prompt: PromptTemplate | None = None) -> None:
        """Write the selection (and optionally the ranked table it came from and the conversation
        template it was scored with) as JSON."""
        data = {"format": SELECTION_FORMAT, "heads": [list(pair) for pair in self.pairs]}
        if prompt is not None:
            data["prompt"] = prompt.to_dict()
        if scores is not None:
            data["scores"] = scores
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    def check(self, num_layers: int, num_heads: int) -> None:
        """Raise ValueError if a pair does not exist in a model of that size."""
        bad = [pair for pair in self.pairs if pair[0] >= num_layers or pair[1] >= num_heads]
        if bad:
            raise ValueError(f"heads {bad} do not exist in a model with {num_layers} layers of {num_heads} heads")


class HeadScorer:
    """Accumulates per-head grounding statistics over calibration batches."""

    def __init__(self, layers: list[int], num_heads: int):
        self.layers = list(layers)
        self.num_heads = num_heads
        shape = (len(self.layers), num_heads)
        self._share = torch.zeros(shape, dtype=torch.float64)
        self._concentration = torch.zeros(shape, dtype=torch.float64)
        self._entropy = torch.zeros(shape, dtype=torch.float64)
        self._map_sum: torch.Tensor | None = None      # (layers, heads, N): the sum of the maps p
        self._samples = torch.zeros(len(self.layers), dtype=torch.float64)
        self._all_sinks = torch.zeros(len(self.layers), dtype=torch.float64)  # samples left with no map

    def update(self, layer: int, rows: torch.Tensor, query_mask: torch.Tensor, sink: torch.Tensor) -> None:
        """Add one batch of one layer.

        Args:
            rows: ``(B, num_heads, A, N)`` answer-to-image attention of every head of ``layer``.
            query_mask: ``(B, A)`` True on real answer queries.
            sink: ``(B, N)`` True on sink tokens.
        """
        keep = query_mask.any(dim=1)                      # samples with at least one query
        weights = query_mask.to(torch.float32)[:, None, :, None]
        queries = weights.sum(dim=2).clamp(min=1.0)
        image_map = (rows.float() * weights).sum(dim=2) / queries          # (B, H, N)
        share = image_map.sum(dim=-1)                                       # (B, H)
        clean = image_map.masked_fill(sink[:, None, :], 0.0)
        probabilities = clean / clean.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(dim=-1)
        tokens = (~sink).sum(dim=-1, keepdim=True).clamp(min=2).float()
        concentration = (1.0 - entropy / tokens.log()).clamp(0.0, 1.0)
        concentration = concentration.where(clean.sum(dim=-1) > 0, torch.zeros_like(concentration))
        if self._map_sum is None:
            self._map_sum = torch.zeros(len(self.layers), self.num_heads, image_map.shape[-1], dtype=torch.float64)
        elif self._map_sum.shape[-1] != image_map.shape[-1]:
            raise ValueError(f"every batch must have the same number of image tokens: "
                             f"{self._map_sum.shape[-1]}, then {image_map.shape[-1]}")
        slot = self.layers.index(layer)
        self._share[slot] += share[keep].sum(dim=0).double().cpu()
        self._concentration[slot] += concentration[keep].sum(dim=0).double().cpu()
        self._entropy[slot] += entropy[keep].sum(dim=0).double().cpu()
        self._map_sum[slot] += probabilities[keep].sum(dim=0).double().cpu()
        self._samples[slot] += int(keep.sum())
        self._all_sinks[slot] += int(sink[keep].all(dim=1).sum())

    @property
    def samples(self) -> int:
        """Samples scored (those with at least one answer query) in the least-covered layer."""
        return int(self._samples.min()) if len(self.layers) else 0

    def table(self) -> list[dict]:
        """Every (layer, head) with its mean statistics, best score first."""
        counts = self._samples.clamp(min=1.0)
        share = self._share / counts[:, None]
        specificity = torch.zeros_like(share)
        if self._map_sum is not None:
            mean_map = self._map_sum / counts[:, None, None]
            mean_entropy = -(mean_map * mean_map.clamp(min=1e-12).log()).sum(dim=-1)
            divergence = mean_entropy - self._entropy / counts[:, None]
            specificity = (divergence / math.log(max(mean_map.shape[-1], 2))).clamp(min=0.0)
        entries = [
            {"layer": layer, "head": head, "score": float(share[i, head] * specificity[i, head]),
             "image_share": float(share[i, head]), "specificity": float(specificity[i, head]),
             "concentration": float(self._concentration[i, head] / counts[i])}
            for i, layer in enumerate(self.layers) for head in range(self.num_heads)
        ]
        return sorted(entries, key=lambda entry: (-entry["score"], entry["layer"], entry["head"]))

    def select(self, top: int, min_score_ratio: float = 0.0) -> HeadSelection:
        """The ``top`` best-scoring pairs, less those scoring under ``min_score_ratio`` x the best:
        the labels average the chosen heads' maps, so a head far below the best only blurs them."""
        if self.samples == 0:
            raise ValueError("no calibration sample had an answer to score the heads on")
        table = self.table()
        if table[0]["score"] <= 0.0:
            raise ValueError(f"every head scores 0 over the {self.samples} usable calibration sample(s): "
                             + self._why_no_score())
        floor = min_score_ratio * table[0]["score"]
        # Scores are >= 0, so the best head always passes a floor of at most its own score.
        return HeadSelection(tuple((entry["layer"], entry["head"]) for entry in table[:top] if entry["score"] >= floor))

    def _why_no_score(self) -> str:
        """Why no head scored: the sink detector took every image token, or too few samples."""
        if self._all_sinks.max() > 0 and torch.equal(self._all_sinks, self._samples):
            return ("the sink detector marked every image token of every sample as a sink, which leaves no map to "
                    "score: raise --sink-threshold or detect sinks elsewhere (--sink-layer, --sink-heads, --sink none)")
        return (f"a head's score needs maps that differ between questions; give at least {RECOMMENDED_SAMPLES} "
                f"usable records")


def format_table(entries: list[dict], selected: HeadSelection | None = None, limit: int | None = 20) -> str:
    """The ranked table ``sdrpn heads`` prints."""
    chosen = set(selected.pairs) if selected else set()
    lines = [f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'score':>7}  {'image share':>11}  {'specificity':>11}  "
             f"{'concentration':>13}"]
    for rank, entry in enumerate(entries[:limit] if limit else entries, start=1):
        mark = "  *" if (entry["layer"], entry["head"]) in chosen else ""
        lines.append(f"{rank:>4}  {entry['layer']:>5}  {entry['head']:>4}  {entry['score']:>7.4f}  "
                     f"{entry['image_share']:>11.4f}  {entry['specificity']:>11.4f}  {entry['concentration']:>13.4f}{mark}")
    return "\n".join(lines)


def parse_layer_range(text: str, num_layers: int) -> list[int]:
    """``8-20`` (inclusive), ``14`` or ``8,10,12`` -> layer indices, checked against the model."""
    layers: list[int] = []
    try:
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            first, dash, last = part.partition("-")
            layers.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    except ValueError:
        raise ValueError(f"expected layers like 8-20, 14 or 8,10,12; got {text!r}") from None
    if not layers or any(not 0 <= layer < num_layers for layer in layers):
        raise ValueError(f"layers {text!r} must lie in 0-{num_layers - 1}")
    return sorted(set(layers))


def check_sink_detector(sink: SinkSpec, grounding_layer: int, num_layers: int, num_heads: int) -> None:
    """A :class:`~sdrpn.errors.UserError` naming the option when ``sink`` (read with ``grounding_layer``
    the first grounding layer) reads a layer or head that a model of that size lacks."""
    if sink.heads is not None:
        selection = HeadSelection(sink.heads)
        try:
            selection.check(num_layers, num_heads)
        except ValueError as exc:
            raise UserError(f"sink heads {selection} (--sink-heads or --sink-preset): {exc}") from None
        return
    layer = sink.resolved_layer(grounding_layer)
    if layer is not None and layer >= num_layers:
        raise UserError(f"--sink-layer {layer}: the model has {num_layers} layers (0 .. {num_layers - 1})")


def calibrate_heads(model, processor, records: Sequence[Record], image_root: str | Path, layers: Sequence[int],
                    sink: SinkSpec, batch_size: int = 8, max_new_tokens: int = 128, progress: bool = True,
                    prompt=None) -> tuple[HeadScorer, list[RecordIssue]]:
    """Score every head of ``layers`` over ``records``; returns the scorer and the skipped records.
    The questions are asked in the conversation template ``prompt`` (None: the family's default).

    Each batch is answered greedily and read in one teacher-forced pass up to the last layer
    (:class:`.attention.AttentionReader`), like ``sdrpn label`` does, on the same view: the adapter's
    labelling view through its labelling processor. A record whose view is not on the family's
    ``image_grid`` is skipped with that reason, as ``sdrpn label`` skips it. The view's padding cells
    (Qwen2.5-VL's grey square) hold no image: they are left out of the maps like sinks.
    """
    from tqdm import tqdm

    from ..models import adapter_for

    adapter = adapter_for(model, processor)
    reader = AttentionReader(model, adapter.labelling_processor(processor), max_new_tokens, adapter, prompt)
    grid = tuple(int(size) for size in adapter.image_grid)
    grounding_layer = min(layers)
    check_sink_detector(sink, grounding_layer, adapter.num_layers, adapter.num_heads)
    request = CaptureRequest({layer: tuple(range(adapter.num_heads)) for layer in layers}).merge(
        sink.request(grounding_layer, adapter.num_heads))
    scorer = HeadScorer(list(layers), adapter.num_heads)
    skipped: list[RecordIssue] = []
    bar = tqdm(total=len(records), unit="sample", desc="heads", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images, questions, paddings = [], [], []
        for record in batch:
            image, mode_or_issue = open_record_image(image_root, record)
            view = None if image is None else adapter.labelling_view(image)
            if view is not None and tuple(view.grid) != grid:
                mode_or_issue = RecordIssue(record.file, record.line, f"its labelling view of this {image.size[0]}x"
                                            f"{image.size[1]} image is {view.grid[0]}x{view.grid[1]} tokens, not "
                                            f"the {grid[0]}x{grid[1]} grid the labels are made on", record.question_id)
                view = None
            if view is None:
                skipped.append(mode_or_issue)
                report_issue("heads", mode_or_issue, bar.write)
            else:
                images.append(view.image)
                questions.append(record.question)
                paddings.append(view.padding)
        if images:
            captured = reader.read(images, questions, request).capture
            sinks = sink.detect(captured, grounding_layer, adapter.image_length)
            if any(padding is not None for padding in paddings):
                sinks = sinks | torch.stack([padding.flatten() if padding is not None
                                             else torch.zeros(sinks.shape[1], dtype=torch.bool)
                                             for padding in paddings]).to(sinks.device)
            for layer in layers:
                scorer.update(layer, captured.select({layer: range(adapter.num_heads)}), captured.query_mask, sinks)
        bar.update(len(batch))
    bar.close()
    return scorer, skipped
