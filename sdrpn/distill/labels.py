"""Turn a grounding-attention map into a 3-valued RoI label map (DESIGN section 2).

Per sample, with ``g`` the grounding map with its sink tokens zeroed and ``m = max(g)``:

* foreground: ``g > tau_fg * m``;
* the tight box around the foreground on the token grid; with ``blur_box`` the box of the
  foreground map blurred by a 3x3 Gaussian (sigma 1), as in the authors' Qwen2.5-VL setting;
* background: ``g < tau_bg * m`` outside that box;
* label 1 on foreground, 0 on background, :data:`IGNORE_INDEX` elsewhere (non-foreground cells
  inside the box are left unsure);
* the whole sample is ignored when it has no foreground (``m <= 0``, e.g. every cell is a sink),
  when ``m < min_peak``, or when its box covers at least ``max_box_frac`` of the grid;
* optionally, cells known to hold no image (the padding of a pad-to-square view) count as sinks
  before the maximum is taken and are background wherever they lie (``known_background``).

The defaults are the authors' LLaVA-1.5 rules. :class:`LabelRules` names a whole rule set, with the
authors' presets for LLaVA-1.5 and Qwen2.5-VL (:data:`LABEL_RULE_PRESETS`);
the padding cells their Qwen2.5-VL labels use come from
:func:`sdrpn.models.qwen_geometry.square_padding_cells`, and :class:`QuestionRewrite` the question their natural-image labelling asks instead of the dataset's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100
"""Label of the cells (and of whole samples) the loss skips; the convention of torch's losses."""


def _span(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last True index along the last dim of a bool tensor (0 and -1 where none)."""
    length = occupied.shape[-1]
    first = occupied.int().argmax(dim=-1)
    last = length - 1 - occupied.flip(-1).int().argmax(dim=-1)
    any_true = occupied.any(dim=-1)
    return first.where(any_true, 0), last.where(any_true, -1)


def assign_labels(
    grounding: torch.Tensor,
    sink: torch.Tensor,
    grid: tuple[int, int],
    tau_fg: float = 0.2,
    tau_bg: float = 0.1,
    max_box_frac: float = 0.5,
    min_peak: float = 0.0,
    blur_box: bool = False,
    *,
    known_background: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label every image token of every sample as foreground (1), background (0) or ignore (-100).

    Args:
        grounding: ``(..., N)`` floating grounding attention per image token, row-major over
            ``grid``.
        sink: ``(..., N)`` bool, True on attention-sink tokens (their grounding counts as 0).
        grid: ``(H, W)`` token grid with ``H * W == N``.
        tau_fg: foreground threshold, as a fraction of the sample's maximum.
        tau_bg: background threshold, as a fraction of the sample's maximum.
        max_box_frac: a sample whose foreground box covers at least this fraction of the grid is
            ignored entirely (its attention is too diffuse to teach a RoI).
        min_peak: a sample whose maximum (after sink removal) is below this is ignored entirely
            (Qwen2.5-VL: 5e-3, ``Qwen2.5-VL/qwen_src/mm_utils.py:448``).
        blur_box: take the box of the 3x3, sigma-1 Gaussian blur of the foreground map
            (Qwen2.5-VL, ``mm_utils.py:391-394``). The blur spreads every foreground cell to
            exactly its 8 neighbours (the kernel is positive everywhere, and reflect padding adds
            nothing outside the grid), so this is the tight box grown by one cell on each side,
            clipped to the grid.
        known_background: optional bool mask of cells that hold no image, ``(..., H, W)`` and
            broadcastable to the grounding's batch dimensions (one ``(H, W)`` mask serves the
            whole batch). Such a cell's grounding counts as 0, like a sink's, before the maximum
            is taken, so it is never foreground; and it is background (0) in every sample that is
            not ignored, even inside the foreground box (where a sink is left unsure). None: no
            such cells. Qwen2.5-VL: the padding cells of their square view
            (:func:`sdrpn.models.qwen_geometry.square_padding_cells`; ``mm_utils.py:363-372`` and 431-432).

    Returns:
        int64 ``(..., H, W)`` labels. All leading dimensions are batch dimensions; the work is
        vectorised over them.
    """
    if not torch.is_floating_point(grounding):
        raise TypeError(f"grounding must be a floating tensor, got {grounding.dtype}")
    if sink.dtype != torch.bool:
        raise TypeError(f"sink must be a bool tensor, got {sink.dtype}")
    if sink.shape != grounding.shape:
        raise ValueError(f"sink has shape {tuple(sink.shape)}, expected the grounding's {tuple(grounding.shape)}")
    height, width = (int(size) for size in grid)
    if height < 1 or width < 1 or grounding.ndim < 1 or grounding.shape[-1] != height * width:
        raise ValueError(f"grid {tuple(grid)} does not match {tuple(grounding.shape)[-1:]} tokens per sample "
                         f"(expected H * W == N)")
    if tau_fg < 0.0 or tau_bg < 0.0:
        raise ValueError(f"tau_fg and tau_bg must be non-negative, got {tau_fg} and {tau_bg}")
    if not max_box_frac > 0.0:
        raise ValueError(f"max_box_frac must be positive, got {max_box_frac}")

    batch_shape = grounding.shape[:-1]
    g = grounding.masked_fill(sink, 0.0).reshape(-1, height, width)
    if known_background is not None:
        known_background = _broadcast_cells(known_background, batch_shape, height, width).to(g.device)
        g = g.masked_fill(known_background, 0.0)
    peak = g.amax(dim=(1, 2), keepdim=True)
    foreground = g > tau_fg * peak
    background = g < tau_bg * peak

    top, bottom = _span(foreground.any(dim=2))
    left, right = _span(foreground.any(dim=1))
    if blur_box:
        top, left = (top - 1).clamp(min=0), (left - 1).clamp(min=0)
        bottom, right = (bottom + 1).clamp(max=height - 1), (right + 1).clamp(max=width - 1)
    rows = torch.arange(height, device=g.device)
    cols = torch.arange(width, device=g.device)
    in_rows = (rows >= top[:, None]) & (rows <= bottom[:, None])
    in_cols = (cols >= left[:, None]) & (cols <= right[:, None])
    in_box = in_rows[:, :, None] & in_cols[:, None, :]

    box_area = (bottom - top + 1) * (right - left + 1)
    peak = peak.reshape(-1)
    valid = (peak > 0) & (peak >= min_peak) & (box_area < max_box_frac * height * width)

    labels = torch.full(g.shape, IGNORE_INDEX, dtype=torch.int64, device=g.device)
    labels[background & ~in_box] = 0
    if known_background is not None:
        labels[known_background] = 0
    labels[foreground] = 1
    labels[~valid] = IGNORE_INDEX
    return labels.reshape(*batch_shape, height, width)


def _broadcast_cells(mask: torch.Tensor, batch_shape: torch.Size, height: int, width: int) -> torch.Tensor:
    """A ``(..., H, W)`` bool cell mask expanded to ``(prod(batch_shape), H, W)``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"known_background must be a bool tensor, got {mask.dtype}")
    target = (*batch_shape, height, width)
    if mask.ndim < 2 or tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"known_background has shape {tuple(mask.shape)}, expected (..., {height}, {width})")
    try:
        mask = mask.expand(target)
    except RuntimeError:
        raise ValueError(f"known_background of shape {tuple(mask.shape)} does not broadcast to the grounding's "
                         f"batch: {target}") from None
    return mask.reshape(-1, height, width)


def is_valid(labels: torch.Tensor) -> torch.Tensor:
    """Per sample of ``(..., H, W)`` labels: True where it has any non-ignored cell."""
    return (labels != IGNORE_INDEX).flatten(-2).any(dim=-1)


@dataclass(frozen=True)
class LabelRules:
    """One model family's label rules, as data: the rule options of :func:`assign_labels`, plus
    whether the padding cells of the pad-to-square view must be passed as ``known_background``.

    The presets transcribe the authors' release (YuHengsss/SD-RPN, commit 00876ac):

    * :meth:`llava`: ``create_pseudo_labels`` in ``LLaVA/llava/mm_utils.py:350-457`` (fg above 0.2
      of the peak, bg below 0.1 of it outside the tight fg box at 389-390, sample ignored when that
      box covers half the grid or more at 431); these are :func:`assign_labels`' defaults.
    * :meth:`qwen2_5_vl`: ``create_pseudo_labels`` in ``Qwen2.5-VL/qwen_src/mm_utils.py:330-476``
      as their training calls it (``qwenvl/data/data_qwen.py:790-801``, ``roi_binary_coeff`` 0.2 at
      725, ``mask_known_bg`` = ``--fix_res True`` of both training scripts): the same thresholds;
      the box of the 3x3, sigma-1 blurred fg map (391-394); the sample also ignored when the peak
      is below 5e-3 (448); padding cells of the square view zeroed like sinks (363-372) and
      background wherever they lie (431-432). Their ``create_pseudo_labels_torch`` (517) is not
      what their Qwen training runs.
    """

    tau_fg: float = 0.2
    tau_bg: float = 0.1
    max_box_frac: float = 0.5
    min_peak: float = 0.0
    blur_box: bool = False
    padding_is_background: bool = False

    def __post_init__(self):
        if self.tau_fg < 0.0 or self.tau_bg < 0.0:
            raise ValueError(f"tau_fg and tau_bg must be non-negative, got {self.tau_fg} and {self.tau_bg}")
        if not self.max_box_frac > 0.0:
            raise ValueError(f"max_box_frac must be positive, got {self.max_box_frac}")
        if self.min_peak < 0.0:
            raise ValueError(f"min_peak must be non-negative, got {self.min_peak}")

    @classmethod
    def llava(cls) -> "LabelRules":
        """The authors' LLaVA-1.5 rules (the defaults)."""
        return cls()

    @classmethod
    def qwen2_5_vl(cls) -> "LabelRules":
        """The authors' Qwen2.5-VL rules."""
        return cls(min_peak=5e-3, blur_box=True, padding_is_background=True)

    @classmethod
    def named(cls, name: str) -> "LabelRules":
        """A preset of :data:`LABEL_RULE_PRESETS` by name."""
        try:
            return LABEL_RULE_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown label rules {name!r}; presets: {', '.join(LABEL_RULE_PRESETS)}") from None

    def options(self) -> dict:
        """The rule keyword arguments of :func:`assign_labels` (the names ``LabelOptions`` uses)."""
        return {"tau_fg": self.tau_fg, "tau_bg": self.tau_bg, "max_box_frac": self.max_box_frac,
                "min_peak": self.min_peak, "blur_box": self.blur_box}

    def to_dict(self) -> dict:
        return asdict(self)

    def assign(self, grounding: torch.Tensor, sink: torch.Tensor, grid: tuple[int, int],
               known_background: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`assign_labels` under these rules. Rules with ``padding_is_background`` need the
        padding mask (all False for a view without padding); the others refuse one."""
        if self.padding_is_background and known_background is None:
            raise ValueError("these label rules treat the padding cells of the square view as background: pass "
                             "known_background (e.g. from qwen_geometry.square_padding_cells; all False without padding)")
        if not self.padding_is_background and known_background is not None:
            raise ValueError("these label rules have no known-background cells; use rules with "
                             "padding_is_background=True or call assign_labels directly")
        return assign_labels(grounding, sink, grid, **self.options(), known_background=known_background)


LABEL_RULE_PRESETS = {
    "llava-1.5": LabelRules.llava(),
    "qwen2.5-vl": LabelRules.qwen2_5_vl(),
}
"""Label rule sets by model family (see :class:`LabelRules` for their sources)."""


ANSWER_FORMAT_SUFFIX = "Answer the question using a single word or phrase."
"""The answer-format instruction that ends the short-answer questions of the LLaVA-1.5 mix (GQA,
OCR-VQA, ...)."""

BOX_GROUNDING_INSTRUCTION = (
    "Output the grounding bounding box of Region of Interest for the question. IMPORTANT: The output MUST be "
    "raw text, one box per line. DO NOT use JSON. Follow this exact format: x_min y_min x_max y_max "
    "{detail_label}."
)
"""The instruction the authors' Qwen2.5-VL natural-image labelling asks instead of
:data:`ANSWER_FORMAT_SUFFIX` (``Qwen2.5-VL/make_pseudo_label_natural.py:49-50``), verbatim: the
braces are literal text of the prompt (their string is not formatted), never a placeholder to fill."""


@dataclass(frozen=True)
class QuestionRewrite:
    """A question asked to the teacher instead of the record's, for labelling only: every
    occurrence of ``old`` in the question becomes ``new`` (a question without ``old`` is asked
    unchanged, as their ``str.replace`` does). The grounding is then read from the answer to the
    rewritten question, while the record keeps its own question, the one the RPN is trained on
    (their natural-image labels store the unmodified question, ``make_pseudo_label_natural.py:48``
    and 123)."""

    old: str
    new: str

    def __post_init__(self):
        if not self.old:
            raise ValueError("a question rewrite needs a non-empty text to replace")

    def apply(self, question: str) -> str:
        return question.replace(self.old, self.new)

    def to_dict(self) -> dict:
        return asdict(self)


QUESTION_REWRITES = {
    # The authors' Qwen2.5-VL labels of natural images (GQA): ask for the boxes of the region of
    # interest instead of a short answer (make_pseudo_label_natural.py:49-50).
    "qwen2.5-vl-natural": QuestionRewrite(ANSWER_FORMAT_SUFFIX, BOX_GROUNDING_INSTRUCTION),
}
"""Labelling-time question rewrites by name. Text-image labels (OCR-VQA) ask the question as is."""
