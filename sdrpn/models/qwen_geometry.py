"""Image geometry of Qwen2.5-VL (and Qwen3-VL) views: view size, token grid, cell boxes in source pixels.

A Qwen-VL processor keeps the image's aspect ratio: :func:`smart_resize` picks a view of whole
cells (``cell`` = patch x merge pixels: 28 for Qwen2.5-VL, 32 for Qwen3-VL) whose area lies within
``[min_pixels, max_pixels]``, the image is resized to it, and every cell becomes one token. The
resize maps pixel edges linearly, so a view pixel ``v`` shows source pixel ``v * source / view``
along each axis, with no offset.

Two more views follow the SD-RPN authors' release (YuHengsss/SD-RPN 00876ac, ``Qwen2.5-VL/``):

* the **labelling view** (:meth:`QwenViewGeometry.authors_square`): the image is pasted on a grey
  (127) square (``expand2square``, ``qwen_src/mm_utils.py`` 153-165) and the square goes to the
  processor at ``min_pixels = max_pixels = 576 * 28 * 28`` (``make_pseudo_label_textual.py`` 58-69,
  ``make_pseudo_label_natural.py`` 60-71, and the same settings in training,
  ``qwen-vl-finetune/qwenvl/data/data_qwen.py`` 244-251). The view is 672 x 672 pixels (24 x 24
  tokens) for most images, but not all: ``smart_resize`` computes ``side / sqrt(side**2 / budget)``
  in floating point, which lands just below 24 cells for about 5% of square sides >= 686 (e.g. 690,
  713, 1001: a 23 x 23 grid) and just above for a few small ones (e.g. 19, 632: 25 x 25). The
  authors' labels carry those grids too; this module reproduces them.
* the **evaluation path** (``vl_utils_resize=True``): their lmms-eval model
  (``lmms-eval/lmms_eval/models/simple/qwen2_5_vl.py`` 274-315) sends each image through
  ``qwen_vl_utils.fetch_image``, which resizes it with its own ``smart_resize``
  (:func:`vl_utils_smart_resize`) before the processor resizes it again. At ``min_pixels ==
  max_pixels`` the second resize almost always changes the size (the first result lies below the
  budget, so the processor scales it up once more): a 3446 x 3156 image (width x height) gets
  22 x 25 tokens (rows x cols) from the processor alone and 23 x 26 on the authors' evaluation path.

Backends. Sizes and grids are the same for transformers' PIL backend (``Qwen2VLImageProcessorPil``)
and its torchvision backend (``Qwen2VLImageProcessor`` in transformers 5, ``...Fast`` in 4.x, which
the authors used): both call the same ``smart_resize``. The view-to-source map is the one both
backends' resizes follow (pixel centres at ``(v + 0.5) * scale``); only pixel values differ between
them. The tests check grids and pixel positions against the PIL backend, and grids against the
torchvision one where it is installed (the authors ran the torchvision backend: ``use_fast=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .geometry import ViewTransform

__all__ = [
    "QwenViewGeometry",
    "square_padding_cells",
    "smart_resize",
    "vl_utils_smart_resize",
    "AUTHORS_PAD_COLOR",
    "AUTHORS_SQUARE_CELLS",
]

MAX_ASPECT_RATIO = 200  # transformers and qwen_vl_utils refuse more elongated images
AUTHORS_PAD_COLOR = (127, 127, 127)
AUTHORS_SQUARE_CELLS = 24  # 576 tokens a view
# transformers' defaults for a Qwen2-VL image processor built without settings.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def _check_size(height, width) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"image {name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"image size must be positive, got {width}x{height} (width x height)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The view ``(height, width)`` a Qwen-VL processor resizes an image to, as transformers computes it.

    Equal to ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`` (transformers 5;
    the PIL backend's module holds a copy): round each side to a multiple of ``factor``; above
    ``max_pixels`` scale both sides down by ``sqrt(area / max_pixels)`` and floor (at least one
    ``factor``); below ``min_pixels`` scale up by ``sqrt(min_pixels / area)`` and ceil. The float
    arithmetic is the same, so results agree to the pixel, including the cases where rounding
    moves a side by one cell, and ``round`` is Python's (halves go to the even number).

    Raises:
        ValueError: a side is not a positive int (transformers raises ZeroDivisionError for a zero
            side), or the aspect ratio exceeds 200 (the same error and message as transformers).
    """
    _check_size(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    return _within_budget(height, width, h_bar, w_bar, factor, min_pixels, max_pixels)


def vl_utils_smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The resize ``qwen_vl_utils.fetch_image`` applies before the processor sees the image.

    The same rule as :func:`smart_resize` except that the first rounding is at least one
    ``factor`` per side (``qwen-vl-utils/src/qwen_vl_utils/vision_process.py`` 60-83 in the
    authors' tree, 0.0.11; their requirements pin 0.0.10). It differs from :func:`smart_resize`
    only for sides below ``factor / 2`` at small ``min_pixels``.
    """
    _check_size(height, width)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    return _within_budget(height, width, h_bar, w_bar, factor, min_pixels, max_pixels)


def _within_budget(height, width, h_bar, w_bar, factor, min_pixels, max_pixels) -> tuple[int, int]:
    """The rounded size ``(h_bar, w_bar)`` rescaled into the pixel budget when it falls outside, as
    both resizes do."""
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _size_entry(size, key):
    """``size[key]`` of a processor's size dict or SizeDict; None when absent."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@dataclass(frozen=True)
class QwenViewGeometry:
    """Where the tokens of a Qwen-VL view come from in the source image.

    Sizes are ``(width, height)`` in pixels as PIL's ``image.size``; grids are ``(rows, cols)`` of
    tokens; boxes are ``[x0, y0, x1, y1)`` (x = column).

    Attributes:
        cell: pixels a side of one token (patch size x spatial merge): 28 for Qwen2.5-VL, 32 for Qwen3-VL.
        min_pixels, max_pixels: the processor's pixel budget (``size["shortest_edge"]`` and
            ``size["longest_edge"]`` in transformers 5).
        square_side: None for the processor's aspect-keeping view; an int for the authors'
            labelling view: the image is padded to a square with ``pad_color`` (centred on the
            short axis) and the square is processed at a budget of ``square_side**2`` pixels, so
            ``min_pixels == max_pixels == square_side**2`` is required. The view is then
            ``square_side`` pixels a side, or one cell less or more where smart_resize's float
            rounding says so (see the module docstring).
        pad_color: RGB of the square view's padding.
        vl_utils_resize: the image first goes through ``qwen_vl_utils.fetch_image``'s resize at the
            same budget (the authors' evaluation path), then through the processor.
    """

    cell: int = 28
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    square_side: int | None = None
    pad_color: tuple[int, int, int] = AUTHORS_PAD_COLOR
    vl_utils_resize: bool = False

    def __post_init__(self):
        if self.cell < 1:
            raise ValueError(f"cell must be a positive number of pixels, got {self.cell}")
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if self.square_side is not None:
            if self.square_side < self.cell or self.square_side % self.cell:
                raise ValueError(
                    f"square_side must be a positive multiple of cell ({self.cell}), got {self.square_side}")
            budget = self.square_side**2
            if self.min_pixels != budget or self.max_pixels != budget:
                raise ValueError(
                    f"a square view of side {self.square_side} is processed at min_pixels = max_pixels = "
                    f"{budget}, got {self.min_pixels} and {self.max_pixels}; use QwenViewGeometry.authors_square()"
                )

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_image_processor(cls, image_processor, cell: int | None = None) -> QwenViewGeometry:
        """The aspect-keeping view of a transformers Qwen2-VL image processor (either backend).

        The budget is what the processor's resize uses: its ``min_pixels`` / ``max_pixels``
        attributes when set (the authors' ``image_processor.max_pixels = ...`` idiom: transformers
        5.25 passes them on as call arguments that override ``size``, with a deprecation warning;
        4.5x did the same when both were set), else ``size["shortest_edge"]`` /
        ``size["longest_edge"]``.

        Args:
            image_processor: e.g. ``Qwen2VLImageProcessorPil`` / ``Qwen2VLImageProcessor``, or a
                processor holding one as ``.image_processor``.
            cell: pixels a token covers; None reads ``patch_size * merge_size`` from the processor.

        Raises:
            ValueError: the budget cannot be read, ``cell`` disagrees with the processor, or the
                processor does not resize.
        """
        image_processor = getattr(image_processor, "image_processor", image_processor)
        size = getattr(image_processor, "size", None)
        min_pixels = getattr(image_processor, "min_pixels", None)
        max_pixels = getattr(image_processor, "max_pixels", None)
        min_pixels = min_pixels if min_pixels is not None else _size_entry(size, "shortest_edge")
        max_pixels = max_pixels if max_pixels is not None else _size_entry(size, "longest_edge")
        if min_pixels is None or max_pixels is None:
            raise ValueError(f"cannot read min/max pixels from {type(image_processor).__name__} (size={size})")
        if getattr(image_processor, "do_resize", True) is False:
            raise ValueError("the image processor does not resize (do_resize=False); its views are not smart-resized")
        patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        processor_cell = patch * merge if patch is not None and merge is not None else None
        if cell is None:
            if processor_cell is None:
                raise ValueError("pass cell: the image processor has no patch_size/merge_size")
            cell = processor_cell
        elif processor_cell is not None and cell != processor_cell:
            raise ValueError(f"cell {cell} disagrees with the processor's patch_size x merge_size = {processor_cell}")
        return cls(cell=int(cell), min_pixels=int(min_pixels), max_pixels=int(max_pixels))

    @classmethod
    def authors_square(cls, cell: int = 28, side_cells: int = AUTHORS_SQUARE_CELLS) -> QwenViewGeometry:
        """The authors' labelling (and training) view: grey square, ``(side_cells * cell)**2`` pixels."""
        side = side_cells * cell
        return cls(cell=cell, min_pixels=side * side, max_pixels=side * side, square_side=side)

    # -- whole views -------------------------------------------------------------------------------

    def canvas(self, source_size) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((width, height), (offset_x, offset_y))``: the image the processor receives and where the
        source's top-left pixel sits in it (the square view's paste position, ``expand2square``)."""
        width, height = self._source(source_size)
        if self.square_side is None:
            return (width, height), (0, 0)
        side = max(width, height)
        return (side, side), ((side - width) // 2, (side - height) // 2)

    def view_size(self, source_size) -> tuple[int, int]:
        """``(view_w, view_h)``: pixels of the view the model sees, whole cells a side."""
        (canvas_w, canvas_h), _ = self.canvas(source_size)
        height, width = canvas_h, canvas_w
        if self.vl_utils_resize:
            height, width = vl_utils_smart_resize(height, width, self.cell, self.min_pixels, self.max_pixels)
        height, width = smart_resize(height, width, self.cell, self.min_pixels, self.max_pixels)
        return width, height

    def grid(self, source_size) -> tuple[int, int]:
        """``(rows, cols)`` of tokens (the processor's ``image_grid_thw[1:] // merge``)."""
        view_w, view_h = self.view_size(source_size)
        return view_h // self.cell, view_w // self.cell

    def transform(self, source_size) -> ViewTransform:
        """The exact view-to-source map: ``source = scale * view + offset`` per axis.

        Both resizes (processor and qwen_vl_utils) map pixel edges linearly, so the scale is
        canvas / view; the square view's offset undoes the paste position.
        """
        width, height = self._source(source_size)
        (canvas_w, canvas_h), (offset_x, offset_y) = self.canvas((width, height))
        view_w, view_h = self.view_size((width, height))
        return ViewTransform(
            source_size=(width, height),
            input_size=(view_h, view_w),
            scale=(canvas_w / view_w, canvas_h / view_h),
            offset=(-float(offset_x), -float(offset_y)),
        )

    def padding_cells(self, source_size) -> torch.Tensor:
        """(rows, cols) bool: cells the authors treat as known background (padding) of the square view.

        Their rule (``get_foreground_mask``, ``qwen_src/mm_utils.py`` 258-327, used with the label
        grid's row count in ``create_pseudo_labels`` ~365): on an n x n grid the image keeps
        ``k = max(int(short / long * n), 1)`` cells across its short axis and the padding is the
        ``(n - k) // 2`` cells at each end of that axis, the same count on both sides. It is close
        to "the cell's centre lies in the padding" but not equal to it: truncating ``k`` can mark a
        cell that holds about half a cell of image (51% for a 468 x 97 image), and for 1-pixel-thin
        images the kept band (at least ``n - 2 * ((n - 1) // 2)`` cells) includes pure padding. All
        False for the aspect-keeping view.
        """
        width, height = self._source(source_size)
        rows, cols = self.grid((width, height))
        if self.square_side is None:
            return torch.zeros(rows, cols, dtype=torch.bool)
        return square_padding_cells((width, height), rows)  # a square canvas makes a square grid
        longest = max(width, height)
        # Their float expression, truncated: the cells the short axis keeps.
        kept_rows = max(int(height / longest * rows), 1)
        kept_cols = max(int(width / longest * cols), 1)
        if width > height:
            band = (rows - kept_rows) // 2
            padding[:band] = True
            padding[rows - band:] = True
        else:
            band = (cols - kept_cols) // 2
            padding[:, :band] = True
            padding[:, cols - band:] = True
        return padding

    # -- cell boxes to source pixels ----------------------------------------------------------------

    def grid_box_to_source(self, box, source_size) -> tuple[int, int, int, int]:
        """A cell box on the view's grid as the source-pixel rectangle the authors crop.

        The arithmetic of their ``get_bbox4src`` (``qwen_src/ana_utils.py`` 1103-1152, called from
        ``get_batched_sub_images``, ``qwen_src/mm_utils.py`` 946-970): in float32, cells times
        ``cell`` give view pixels, times ``float32(canvas / view)`` give canvas pixels; clamp to the
        canvas and truncate. ``image.crop`` then gets these ints: ``[x0, x1)`` keeps a pixel the box
        only starts in and drops one it only ends in, and where the float32 product lands just
        below a whole pixel it drops that one too (the whole grid of about 10% of images loses its
        last source column or row). For the square view (which they never map
        back) the same arithmetic runs on the padded square and the result is shifted by the paste
        offset and clamped to the image: it may be empty if the box lies in the padding.

        Args:
            box: ``[x0, y0, x1, y1)`` cells, ints with ``0 <= x0 < x1 <= cols`` and ``0 <= y0 < y1 <= rows``.
            source_size: ``(width, height)`` of the source image.

        Raises:
            ValueError: a bad size, or a box that is empty or leaves the grid.
        """
        width, height = self._source(source_size)
        rows, cols = self.grid((width, height))
        x0, y0, x1, y1 = self._check_box(box, rows, cols)
        (canvas_w, canvas_h), (offset_x, offset_y) = self.canvas((width, height))
        ratio_x = np.float32(canvas_w / (cols * self.cell))
        ratio_y = np.float32(canvas_h / (rows * self.cell))

        def to_source(cells, ratio, canvas, offset, limit):
            value = np.float32(cells * self.cell) * ratio  # float32 product, as torch computes it
            pixel = int(min(max(value, np.float32(0)), np.float32(canvas)))
            return min(max(pixel - offset, 0), limit)

        return (
            to_source(x0, ratio_x, canvas_w, offset_x, width),
            to_source(y0, ratio_y, canvas_h, offset_y, height),
            to_source(x1, ratio_x, canvas_w, offset_x, width),
            to_source(y1, ratio_y, canvas_h, offset_y, height),
        )

    def grid_boxes_to_source(
        self, boxes: torch.Tensor, source_sizes: torch.Tensor, grids: torch.Tensor, validate: bool = True
    ) -> torch.Tensor:
        """Batched :meth:`grid_box_to_source` on any device: (B, 4) int64 source-pixel boxes.

        Args:
            boxes: (B, 4) int64 cell boxes ``[x0, y0, x1, y1)``.
            source_sizes: (B, 2) int64 ``(width, height)``.
            grids: (B, 2) int64 ``(rows, cols)`` of each view (e.g. ``image_grid_thw[:, 1:] // merge``).
            validate: check the boxes against the grids (reads values back to the host); pass False
                on a hot path whose boxes are known to be valid.

        Raises:
            ValueError: bad shapes or dtypes, or (with ``validate``) boxes or sizes out of range.
        """
        for name, tensor, width in (("boxes", boxes, 4), ("source_sizes", source_sizes, 2), ("grids", grids, 2)):
            if tensor.ndim != 2 or tensor.shape[1] != width or tensor.is_floating_point() or tensor.is_complex():
                raise ValueError(
                    f"{name} must be an integer (B, {width}) tensor, got {tuple(tensor.shape)} {tensor.dtype}")
        if not boxes.shape[0] == source_sizes.shape[0] == grids.shape[0]:
            raise ValueError(f"batch sizes differ: {boxes.shape[0]}, {source_sizes.shape[0]}, {grids.shape[0]}")
        boxes, sizes, grids = boxes.long(), source_sizes.long(), grids.long()
        if validate:
            self._check_boxes(boxes, sizes, grids)
        width, height = sizes[:, 0], sizes[:, 1]
        if self.square_side is None:
            canvas_w, canvas_h = width, height
            offset_x = offset_y = torch.zeros_like(width)
        else:
            side = torch.maximum(width, height)
            canvas_w = canvas_h = side
            offset_x, offset_y = (side - width) // 2, (side - height) // 2
        # float64 quotient rounded to float32: what torch does with their Python-float ratio.
        ratio_x = (canvas_w.double() / (grids[:, 1] * self.cell).double()).float()
        ratio_y = (canvas_h.double() / (grids[:, 0] * self.cell).double()).float()
        pixels = boxes.float() * self.cell
        xs = pixels[:, 0::2] * ratio_x[:, None]
        ys = pixels[:, 1::2] * ratio_y[:, None]
        xs = torch.minimum(xs.clamp_min(0), canvas_w[:, None].float()).long() - offset_x[:, None]
        ys = torch.minimum(ys.clamp_min(0), canvas_h[:, None].float()).long() - offset_y[:, None]
        xs = torch.minimum(xs.clamp_min(0), width[:, None])
        ys = torch.minimum(ys.clamp_min(0), height[:, None])
        return torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)

    # -- checks ------------------------------------------------------------------------------------

    @staticmethod
    def _source(source_size) -> tuple[int, int]:
        try:
            width, height = source_size
        except (TypeError, ValueError):
            raise ValueError(f"source_size must be (width, height), got {source_size!r}") from None
        width, height = _as_int(width, "width"), _as_int(height, "height")
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height} (width x height)")
        return width, height

    @staticmethod
    def _check_box(box, rows: int, cols: int) -> tuple[int, int, int, int]:
        values = box.tolist() if isinstance(box, torch.Tensor) else box
        try:
            values = list(values)
        except TypeError:
            values = None
        if values is None or len(values) != 4:
            raise ValueError(f"box must be [x0, y0, x1, y1) cells, got {box!r}")
        x0, y0, x1, y1 = (_as_int(value, "box coordinate") for value in values)
        if not (0 <= x0 < x1 <= cols and 0 <= y0 < y1 <= rows):
            raise ValueError(f"box {[x0, y0, x1, y1]} is empty or outside the {rows}x{cols} grid (rows x cols)")
        return x0, y0, x1, y1

    def _check_boxes(self, boxes, sizes, grids) -> None:
        if bool((sizes < 1).any()):
            raise ValueError("image sizes must be positive")
        if bool((grids < 1).any()):
            raise ValueError("grids must have at least one row and one column")
        x0, y0, x1, y1 = boxes.unbind(1)
        inside = (x0 >= 0) & (x0 < x1) & (x1 <= grids[:, 1]) & (y0 >= 0) & (y0 < y1) & (y1 <= grids[:, 0])
        if not bool(inside.all()):
            row = int((~inside).nonzero()[0, 0])
            raise ValueError(f"box {boxes[row].tolist()} (row {row}) is empty or outside its "
                             f"{grids[row, 0].item()}x{grids[row, 1].item()} grid (rows x cols)")


def _as_int(value, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def square_padding_cells(image_size: tuple[int, int], side: int) -> torch.Tensor:
    """``(side, side)`` bool, True on the cells of a pad-to-square view that the authors' Qwen2.5-VL
    labels treat as padding (``get_foreground_mask``, ``Qwen2.5-VL/qwen_src/mm_utils.py:258-326``,
    called with the grid side at 365).

    ``image_size`` is the source image's ``(width, height)`` before padding. The long side fills the
    grid; the short side covers ``n = max(1, int(short / long * side))`` cells (truncated), from cell
    ``(side - n) // 2`` up to, not including, cell ``n + ceil((side - n) / 2)``: when ``side - n`` is
    odd the image gets ``n + 1`` cells, the extra one on the far side. Cells outside that band are
    padding. A square image has none.
    """
    width, height = (int(size) for size in image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {tuple(image_size)}")
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    longest = max(width, height)
    rows = max(int(height / longest * side), 1)
    cols = max(int(width / longest * side), 1)
    image = torch.zeros(side, side, dtype=torch.bool)
    if cols > rows:      # wider than tall: padding bands above and below
        start = (side - rows) // 2
        image[start:min(rows + math.ceil((side - rows) / 2), side), :cols] = True
    elif rows > cols:    # taller than wide: padding bands left and right
        start = (side - cols) // 2
        image[:rows, start:min(cols + math.ceil((side - cols) / 2), side)] = True
    else:
        image[:, :] = True
    return ~image
