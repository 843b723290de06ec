"""Image geometry: where each token of a view comes from in the source image, and RoI views.

A processor turns a source image of any size into one view of ``input_size`` pixels, in one of two
ways (both used by LLaVA checkpoints):

* ``"crop"`` (llava-hf): resize the short side to ``shortest_edge`` (the long side becomes
  ``int(shortest_edge * long / short)``), then centre-crop ``input_size``;
* ``"pad"`` (original LLaVA ``expand2square``): paste the image centred on a square of the mean
  colour, then resize the square to ``input_size``.

Both are an axis-aligned affine map per axis (resampling maps pixel edges linearly), so a view pixel
``v`` comes from source pixel ``a * v + b``; :class:`ViewTransform` holds ``(a, b)`` per axis and maps
token-grid boxes to source pixels exactly.

RoI views. A RoI (a box on the token grid) becomes a rectangle of source pixels
(:meth:`ImageGeometry.crop_map`, the SD-RPN authors' mapping) stretched to ``input_size`` with
bilinear resampling, as their release does. :func:`resample_views` does the resize on the device
with the arithmetic of PIL's resampling (fixed-point coefficients, horizontal pass then vertical,
rounding to 8 bits after each), so the fast path reproduces ``image.crop(...).resize(...)`` bit for
bit on the CPU. :func:`square_crop_boxes` makes aspect-keeping square crops (ViCrop's views).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ImageGeometry",
    "ViewTransform",
    "PIL_BILINEAR",
    "PIL_BICUBIC",
    "to_rgb_array",
    "square_crop_boxes",
    "resample_views",
]

PIL_BILINEAR, PIL_BICUBIC = 2, 3
_FILTER_SUPPORT = {PIL_BILINEAR: 1.0, PIL_BICUBIC: 2.0}
_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit resampling
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size_value(size, *keys):
    """Reads ``keys`` (first present) from a processor size dict or SizeDict; None if absent."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class ViewTransform:
    """The affine map from view pixels to source pixels of one image (per axis ``src = a * v + b``).

    Attributes:
        source_size: (width, height) of the source image in pixels.
        input_size: (height, width) of the view in pixels.
        scale: (a_x, a_y) source pixels per view pixel.
        offset: (b_x, b_y) source coordinate of the view's top-left corner.
    """

    source_size: tuple[int, int]
    input_size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]

    def view_to_source(self, box) -> tuple[float, float, float, float]:
        """Maps a view-pixel box ``[x0, y0, x1, y1)`` to (unclipped) source pixels."""
        (ax, ay), (bx, by) = self.scale, self.offset
        x0, y0, x1, y1 = box
        return (ax * x0 + bx, ay * y0 + by, ax * x1 + bx, ay * y1 + by)

    def source_to_view(self, box) -> tuple[float, float, float, float]:
        """Maps a source-pixel box to view pixels (the inverse of :meth:`view_to_source`)."""
        (ax, ay), (bx, by) = self.scale, self.offset
        x0, y0, x1, y1 = box
        return ((x0 - bx) / ax, (y0 - by) / ay, (x1 - bx) / ax, (y1 - by) / ay)

    def grid_to_source(self, box, grid: tuple[int, int], clip: bool = True) -> tuple[float, float, float, float]:
        """Maps a token-grid box ``[x0, y0, x1, y1)`` (cells) to source pixels.

        Args:
            box: cell box, x = column, y = row, half-open.
            grid: (rows, cols) of the token grid.
            clip: clip the result to the image (a pad-mode view also shows padding).
        """
        cell_w, cell_h = self.input_size[1] / grid[1], self.input_size[0] / grid[0]
        x0, y0, x1, y1 = box
        sx0, sy0, sx1, sy1 = self.view_to_source((x0 * cell_w, y0 * cell_h, x1 * cell_w, y1 * cell_h))
        if clip:
            width, height = self.source_size
            sx0, sx1 = min(max(sx0, 0.0), width), min(max(sx1, 0.0), width)
            sy0, sy1 = min(max(sy0, 0.0), height), min(max(sy1, 0.0), height)
        return (sx0, sy0, sx1, sy1)

    def source_to_grid(self, box, grid: tuple[int, int]) -> tuple[float, float, float, float]:
        """Maps a source-pixel box to fractional token-grid cells."""
        vx0, vy0, vx1, vy1 = self.source_to_view(box)
        cell_w, cell_h = self.input_size[1] / grid[1], self.input_size[0] / grid[0]
        return (vx0 / cell_w, vy0 / cell_h, vx1 / cell_w, vy1 / cell_h)


@dataclass(frozen=True)
class ImageGeometry:
    """What a processor does to an image, as far as pixel geometry and values go.

    Attributes:
        mode: "crop" (resize short side + centre crop) or "pad" (pad to square + resize).
        input_size: (height, width) of a view.
        shortest_edge: target of the short side before the centre crop ("crop" mode).
        resample: PIL resampling filter id (2 bilinear, 3 bicubic).
        image_mean, image_std: per-channel normalisation (values in [0, 1] units).
        rescale_factor: factor from 8-bit values to [0, 1] (1 / 255).
        pad_color: 8-bit RGB colour of the padding ("pad" mode and RoI views beyond the image).
    """

    mode: str
    input_size: tuple[int, int]
    shortest_edge: int
    resample: int = PIL_BICUBIC
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.mode not in ("crop", "pad"):
            raise ValueError(f"geometry mode must be 'crop' or 'pad', got {self.mode!r}")
        if self.resample not in _FILTER_SUPPORT:
            raise ValueError(f"only bilinear (2) and bicubic (3) resampling are supported, got {self.resample!r}")
        if self.mode == "crop" and self.shortest_edge < max(self.input_size):
            raise ValueError(
                f"the short side is resized to {self.shortest_edge}, smaller than the crop {self.input_size}; "
                f"views with padding from the centre crop are not supported"
            )

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # The processors pad with int(mean * 255) per channel.
        return tuple(int(value * 255) for value in self.image_mean)

    @classmethod
    def from_processor(cls, processor, input_size: tuple[int, int]) -> ImageGeometry:
        """Reads the geometry of a llava-style processor (or image processor).

        Args:
            processor: a ``LlavaProcessor``, its ``image_processor``, or None for the llava-hf defaults
                (short side to the vision input size, centre crop, bicubic, CLIP normalisation).
            input_size: (height, width) the vision tower takes, used when the processor is None.
        """
        if processor is None:
            return cls(mode="crop", input_size=tuple(input_size), shortest_edge=max(input_size))
        image_processor = getattr(processor, "image_processor", processor)
        crop = getattr(image_processor, "crop_size", None)
        size = getattr(image_processor, "size", None)
        do_center_crop = getattr(image_processor, "do_center_crop", False)
        height = _size_value(crop, "height") if do_center_crop else _size_value(size, "height", "shortest_edge")
        width = _size_value(crop, "width") if do_center_crop else _size_value(size, "width", "shortest_edge")
        if height is None or width is None:
            raise ValueError(f"cannot read the view size from the image processor (size={size}, crop_size={crop})")
        shortest_edge = _size_value(size, "shortest_edge")
        # Only LLaVA's image processor pads to a square; elsewhere do_pad pads a batch to one size.
        if getattr(image_processor, "do_pad", False) and hasattr(image_processor, "pad_to_square"):
            mode = "pad"
        elif shortest_edge is not None:
            mode = "crop"
        else:
            raise ValueError(f"unsupported image processor geometry: size={size}, do_pad=False, no shortest_edge")
        resample = getattr(image_processor, "resample", PIL_BICUBIC)
        resample = int(getattr(resample, "value", resample))
        return cls(
            mode=mode,
            input_size=(int(height), int(width)),
            shortest_edge=int(shortest_edge if shortest_edge is not None else max(height, width)),
            resample=resample,
            image_mean=tuple(float(v) for v in getattr(image_processor, "image_mean", CLIP_MEAN)),
            image_std=tuple(float(v) for v in getattr(image_processor, "image_std", CLIP_STD)),
            rescale_factor=float(getattr(image_processor, "rescale_factor", 1 / 255)),
        )

    # -- whole-image views -------------------------------------------------------------------------

    def transform(self, source_size: tuple[int, int]) -> ViewTransform:
        """The view transform of a source image of ``(width, height)`` pixels."""
        width, height = source_size
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        view_h, view_w = self.input_size
        if self.mode == "pad":
            side = max(width, height)
            pad_x, pad_y = (side - width) // 2, (side - height) // 2
            resized_w, resized_h = self.shortest_edge, self.shortest_edge
            canvas_w = canvas_h = side
        else:
            pad_x = pad_y = 0
            resized_w, resized_h = self._short_side_resized(width, height)
            canvas_w, canvas_h = width, height
        crop_x, crop_y = (resized_w - view_w) // 2, (resized_h - view_h) // 2
        scale_x, scale_y = canvas_w / resized_w, canvas_h / resized_h
        return ViewTransform(
            source_size=(width, height),
            input_size=(view_h, view_w),
            scale=(scale_x, scale_y),
            offset=(crop_x * scale_x - pad_x, crop_y * scale_y - pad_y),
        )

    def crop_map(self, source_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """``(pad_x, ratio_x, pad_y, ratio_y)``: view pixel ``v`` shows source pixel ``(v - pad) / ratio``.

        This is how the SD-RPN authors map a RoI back to the source image (``get_bbox4src`` in
        ``LLaVA/llava/ana_utils.py`` ~681-740, YuHengsss/SD-RPN 00876ac): in "pad" mode the scale is
        ``min(view / side)`` and the padding is half of what ``int(side * scale)`` leaves of the view
        (a fraction of a pixel off the exact inverse of ``expand2square``, which is what their crops
        follow). "crop" mode, which they never use, gets the same form with the exact centre crop.
        """
        width, height = source_size
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        view_h, view_w = self.input_size
        if self.mode == "pad":
            ratio = min(view_w / width, view_h / height)
            return ((view_w - int(width * ratio)) / 2, ratio, (view_h - int(height * ratio)) / 2, ratio)
        resized_w, resized_h = self._short_side_resized(width, height)
        return (-((resized_w - view_w) // 2), resized_w / width, -((resized_h - view_h) // 2), resized_h / height)

    def _short_side_resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after "crop" mode's resize of the short side to ``shortest_edge``."""
        short, long = min(width, height), max(width, height)
        resized_short, resized_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (resized_short, resized_long) if width <= height else (resized_long, resized_short)

    def crop_maps_tensor(self, source_sizes, device=None) -> torch.Tensor:
        """(B, 4) float32 ``[pad_x, ratio_x, pad_y, ratio_y]`` of :meth:`crop_map` per ``(width, height)``."""
        return torch.tensor([self.crop_map(tuple(size)) for size in source_sizes], dtype=torch.float32, device=device)

    def transforms_tensor(self, source_sizes, device=None) -> torch.Tensor:
        """(B, 4) float64 ``[a_x, b_x, a_y, b_y]`` of the view transforms of ``(width, height)`` sizes."""
        rows = []
        for size in source_sizes:
            t = self.transform(tuple(size))
            rows.append([t.scale[0], t.offset[0], t.scale[1], t.offset[1]])
        return torch.tensor(rows, dtype=torch.float64, device=device)

    # -- pixel values ------------------------------------------------------------------------------

    def normalize(self, views: torch.Tensor, mean: torch.Tensor | None = None,
                  std: torch.Tensor | None = None) -> torch.Tensor:
        """8-bit views (..., 3, H, W) to ``pixel_values`` the way the processor's NumPy path does it.

        ``mean`` and ``std`` ((3, 1, 1) float32 on the views' device) avoid building the constants
        on every call.
        """
        if mean is None or std is None:
            mean = torch.tensor(self.image_mean, dtype=torch.float32, device=views.device)[:, None, None]
            std = torch.tensor(self.image_std, dtype=torch.float32, device=views.device)[:, None, None]
        scaled = (views.to(torch.float64) * self.rescale_factor).to(torch.float32)
        return (scaled - mean) / std


def to_rgb_array(image) -> np.ndarray:
    """A PIL image as the processor sees it: (H, W, 3) uint8 RGB, through transformers' own conversion
    (1-channel, palette and alpha images included)."""
    from transformers.image_transforms import convert_to_rgb

    if "return_numpy" in inspect.signature(convert_to_rgb).parameters:
        converted = convert_to_rgb(image, return_numpy=True)
    else:
        converted = convert_to_rgb(image)
    array = np.asarray(converted)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image after conversion, got {array.dtype} {array.shape}")
    return array


def square_crop_boxes(source_boxes: torch.Tensor, source_sizes: torch.Tensor) -> torch.Tensor:
    """Integer square crops around source-pixel boxes.

    The box is first rounded outwards to whole pixels; the square's side is its longer side; the
    square is centred on the box, then shifted to lie inside the image, or centred on the image along
    an axis where the image is shorter than the side (that part shows the pad colour).

    Args:
        source_boxes: (..., 4) float ``[x0, y0, x1, y1)`` in source pixels.
        source_sizes: (..., 2) int ``(width, height)`` of each box's image (broadcastable).

    Returns:
        (..., 4) int64 crops ``[x0, y0, side, side]`` (``[x0, y0, width, height]``) with ``side >= 1``.
    """
    x0 = torch.floor(source_boxes[..., 0]).long()
    y0 = torch.floor(source_boxes[..., 1]).long()
    x1 = torch.ceil(source_boxes[..., 2]).long()
    y1 = torch.ceil(source_boxes[..., 3]).long()
    width, height = source_sizes[..., 0].long(), source_sizes[..., 1].long()
    side = torch.maximum(torch.maximum(x1 - x0, y1 - y0), torch.ones_like(x0))

    def place(start, extent, limit):
        start = start - (side - extent) // 2
        inside = start.clamp(min=torch.zeros_like(limit), max=(limit - side).clamp_min(0))
        centred = -((side - limit) // 2)
        return torch.where(side <= limit, inside, centred)

    return torch.stack([place(x0, x1 - x0, width), place(y0, y1 - y0, height), side, side], dim=-1)


# ------------------------------------------------------------------------------------------------
# PIL-exact resampling on the device
# ------------------------------------------------------------------------------------------------


def _filter(resample: int, x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    if resample == PIL_BILINEAR:
        return (1.0 - x).clamp_min(0.0)
    a = -0.5  # PIL's bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def max_taps(resample: int, max_side: int, out_size: int) -> int:
    """Taps per output pixel PIL uses when shrinking ``max_side`` pixels to ``out_size``."""
    support = _FILTER_SUPPORT[resample] * max(max_side / out_size, 1.0)
    return int(math.ceil(support)) * 2 + 1


def _coefficients(resample: int, side: torch.Tensor, out_size: int, taps: int):
    """PIL's fixed-point resampling coefficients along an axis of ``side`` input pixels (any shape S).

    Returns ``(first, weights)``: (S..., out) int64 first input index of each output pixel
    (relative to the crop) and (S..., out, taps) int64 weights in units of 2**-22 (zero beyond
    the output pixel's window), computed in float64 exactly as PIL's ``precompute_coeffs``.
    """
    side_f = side.to(torch.float64)[..., None]
    scale = side_f / out_size
    filterscale = scale.clamp_min(1.0)
    support = _FILTER_SUPPORT[resample] * filterscale
    out = torch.arange(out_size, dtype=torch.float64, device=side.device)
    center = (out + 0.5) * scale
    first = torch.trunc(center - support + 0.5).clamp_min(0)
    last = torch.minimum(torch.trunc(center + support + 0.5), side_f)
    count = (last - first).long()
    tap = torch.arange(taps, device=side.device)
    x = tap.to(torch.float64) + first[..., None]
    weights = _filter(resample, (x - center[..., None] + 0.5) / filterscale[..., None])
    weights = torch.where(tap < count[..., None], weights, torch.zeros_like(weights))
    total = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    unit = float(1 << _PRECISION_BITS)
    fixed = torch.where(weights < 0, torch.trunc(-0.5 + weights * unit), torch.trunc(0.5 + weights * unit))
    return first.long(), fixed.long()


def _fixed_point(acc: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a fixed-point sum to 8 bits: ``clip8((2**21 + acc) >> 22)``."""
    return ((acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS).clamp_(0, 255)


def _with_pad(index: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Shifts indices by one so that slot 0 (the pad colour) stands for everything outside [0, limit)."""
    return torch.where((index >= 0) & (index < limit[:, None, None]), index + 1, 0)


# Elements gathered at once by a pass: bounds memory for huge images (the rows are chunked).
_GATHER_CHUNK = 1 << 24


def _horizontal_pass(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values (B, C, R, 1 + L) int32 with column 0 the pad colour; index, weights (B, O, T) -> (B, C, R, O)."""
    batch, channels, rows, _ = values.shape
    outputs, taps = index.shape[1:]
    samples = torch.arange(batch, device=values.device)[:, None]
    if rows == 0:  # a crop that lies wholly outside its image: only pad rows
        return values.new_zeros(batch, channels, 0, outputs)
    flat = index.reshape(batch, outputs * taps)
    chunk = max(1, _GATHER_CHUNK // (channels * outputs * taps))
    parts = []
    for start in range(0, rows, chunk):
        # Whole columns selected per (sample, output, tap): (B, O*T, C, rows in the chunk).
        picked = values[:, :, start : start + chunk][samples, :, :, flat]
        picked = picked.view(batch, outputs, taps, channels, -1)
        acc = (picked * weights[..., None, None]).sum(2, dtype=torch.int32)  # (B, O, C, rows)
        parts.append(_fixed_point(acc).permute(0, 2, 3, 1))
    return torch.cat(parts, dim=2)


def _vertical_pass(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values (B, C, 1 + R, W) int32 with row 0 the pad row; index, weights (B, O, T) -> (B, C, O, W)."""
    batch, channels, _, width = values.shape
    outputs, taps = index.shape[1:]
    samples = torch.arange(batch, device=values.device)[:, None]
    # Whole rows selected per (sample, output, tap): (B, O*T, C, W).
    picked = values[samples, :, index.reshape(batch, outputs * taps)].view(batch, outputs, taps, channels, width)
    acc = (picked * weights[..., None, None]).sum(2, dtype=torch.int32)  # (B, O, C, W)
    return _fixed_point(acc).permute(0, 2, 1, 3)


def resample_views(
    sources: torch.Tensor,
    source_sizes: torch.Tensor,
    crops: torch.Tensor,
    out_size: tuple[int, int],
    resample: int,
    pad_color: tuple[int, int, int],
    max_side: int,
) -> torch.Tensor:
    """Crops a rectangle from each source image and resizes it, as PIL does: (B, 3, H_out, W_out) uint8.

    Static shapes, no host synchronisation: the crop position and size are device tensors. The
    arithmetic is PIL's (32-bit fixed point, horizontal pass then vertical, 8-bit rounding after
    each), so the result equals ``image.crop(box).resize(out_size)`` bit for bit.

    Args:
        sources: (B, 3, H_max, W_max) uint8 source images, top-left aligned (padding unused).
        source_sizes: (B, 2) int64 ``(width, height)`` of each image.
        crops: (B, 4) int64 ``[x0, y0, width, height]`` in source pixels, at least 1 x 1; parts
            outside the image show ``pad_color``.
        out_size: (height, width) of the views.
        resample: PIL filter id.
        pad_color: RGB colour of pixels outside the image.
        max_side: an upper bound of the crops' width and height (sets the static number of taps).
    """
    if sources.device.type == "cpu":
        return _resample_windows(sources, source_sizes, crops, out_size, resample, pad_color)
    return _resample_static(sources, source_sizes, crops, out_size, resample, pad_color, max_side)


def _resample_windows(sources, source_sizes, crops, out_size, resample, pad_color) -> torch.Tensor:
    """CPU path: each sample resampled from the window of its crop only (reading the crops is free
    on the CPU). Pixels outside the window are never read, so the result is the same."""
    views = []
    for source, (width, height), (x0, y0, crop_w, crop_h) in zip(sources, source_sizes.tolist(), crops.tolist()):
        left, top = min(max(x0, 0), width), min(max(y0, 0), height)
        right, bottom = max(min(x0 + crop_w, width), left), max(min(y0 + crop_h, height), top)
        window = source[None, :, top:bottom, left:right]
        views.append(_resample_static(
            window, torch.tensor([[right - left, bottom - top]]), torch.tensor([[x0 - left, y0 - top, crop_w, crop_h]]),
            out_size, resample, pad_color, max(crop_w, crop_h),
        ))
    return torch.cat(views)


def _resample_static(sources, source_sizes, crops, out_size, resample, pad_color, max_side) -> torch.Tensor:
    """The static-shape resampling of :func:`resample_views` (every row of every image is passed)."""
    device = sources.device
    batch = sources.shape[0]
    out_h, out_w = out_size
    taps_x, taps_y = max_taps(resample, max_side, out_w), max_taps(resample, max_side, out_h)
    first_x, weights_x = _coefficients(resample, crops[:, 2], out_w, taps_x)
    first_y, weights_y = _coefficients(resample, crops[:, 3], out_h, taps_y)
    index_x = crops[:, 0, None, None] + first_x[..., None] + torch.arange(taps_x, device=device)
    index_y = crops[:, 1, None, None] + first_y[..., None] + torch.arange(taps_y, device=device)
    index_x = _with_pad(index_x, source_sizes[:, 0])  # (B, W_out, taps) into [pad | columns]
    index_y = _with_pad(index_y, source_sizes[:, 1])  # (B, H_out, taps) into [pad row | rows]

    # Built with fills on the device (no host-to-device copy on the hot path).
    color = torch.stack([torch.full((1, 1), value, dtype=torch.int32, device=device) for value in pad_color])
    color = color[None].expand(batch, 3, -1, -1)
    values = torch.cat([color.expand(-1, -1, sources.shape[2], 1), sources.to(torch.int32)], dim=3)
    horizontal = _horizontal_pass(values, index_x, weights_x.int())
    # A canvas row outside the image is all pad colour; its horizontal pass is the pad row.
    pad_row = _horizontal_pass(color.expand(-1, -1, 1, 1 + sources.shape[3]), index_x, weights_x.int())
    vertical = _vertical_pass(torch.cat([pad_row, horizontal], dim=2), index_y, weights_y.int())
    return vertical.to(torch.uint8)
