"""One picture of where the model looked, for a person to judge (``sdrpn show``).

Left: the source image lit by the RoI probability map (dimmed where the map is low, never tinted,
so that the shapes keep the colours the questions name them by), the map's levels as heat-coloured
isolines, the contour of the thresholded mask and the RoI boxes. Right: the zoomed crop the model
saw in stage 2. Below: the question, the answers with and without SD-RPN, and how many regions the
mask holds against how many became RoI boxes (the RoI filters drop some). Drawn with PIL;
:func:`roi_figure` fills the figure from an engine's answers.

The figure has a fixed size for a given ``size`` (see :func:`figure_size`): both panels are
``size`` x ``size`` with the images letterboxed inside, and the caption has a fixed number of
lines (long text is cut with an ellipsis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

MARGIN = 16
CAPTION_LINES = 6
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
BOX_COLOR = (0, 230, 64)
CONTOUR_COLOR = (255, 255, 255)
GRID_COLOR = (255, 215, 0)
# Brightness where the map is 0 (1 at its maximum): dimmed, with hue and saturation kept.
DIM_FLOOR = 0.7
# Isolines of the map, as shares of its maximum.
ISOLINE_LEVELS = (0.25, 0.5, 0.75)

# Anchor colours of the heatmap, from probability 0 to 1 (dark blue -> cyan -> yellow -> red).
_HEAT_ANCHORS = np.array([[20, 30, 120], [0, 170, 230], [250, 230, 40], [230, 30, 20]], dtype=np.float32)


@dataclass
class RoIFigure:
    """Everything the picture shows.

    Attributes:
        image: the source image (RGB).
        probability: RoI probability per image token, shape (H, W) on the token grid, in [0, 1].
        mask: thresholded mask on the token grid, shape (H, W), bool.
        grid_extent: [x0, y0, x1, y1] in source pixels covered by the whole token grid (the
            processor's view; it may extend past the image for pad-to-square processors).
        boxes: RoI boxes [x0, y0, x1, y1] in source pixels.
        crop: the zoomed region the model saw in stage 2, or None when there was no RoI.
        question: the question asked.
        answer_with: the answer with SD-RPN.
        answer_without: the answer of the plain model, or None when it was not computed.
        details: one extra caption line (threshold, visual tokens, latency, ...).
    """

    image: Image.Image
    probability: np.ndarray
    mask: np.ndarray
    grid_extent: Sequence[float]
    boxes: Sequence[Sequence[float]] = field(default_factory=list)
    crop: Image.Image | None = None
    question: str = ""
    answer_with: str = ""
    answer_without: str | None = None
    details: str = ""


def _seen_crop(image: Image.Image, crop_box, cells: np.ndarray, extent, masked: bool) -> Image.Image:
    """The source crop of the RoI view; with masked upscaling, cells whose tokens were dropped are dimmed."""
    region = image.crop(crop_box)
    if not masked:
        return region
    x0, y0, x1, y1 = (round(v) for v in extent)
    cell_mask = Image.fromarray(cells.astype("uint8") * 255).resize((max(1, x1 - x0), max(1, y1 - y0)),
                                                                    Image.NEAREST)
    full = Image.new("L", image.size, 0)
    full.paste(cell_mask, (x0, y0))
    dimmed = Image.blend(region, Image.new("RGB", region.size, (0, 0, 0)), 0.65)
    return Image.composite(region, dimmed, full.crop(crop_box))


def roi_figure(engine, image: Image.Image, question: str, with_rpn, without, threshold: float,
               latency_s: float, prompt: str | None = None) -> RoIFigure:
    """The figure of one question an :class:`sdrpn.SDRPN` engine answered with and without SD-RPN.

    Args:
        engine: the engine; its stage 1 runs again here for the probability map, mask and crop.
        image: the source image.
        question: the question shown in the caption.
        with_rpn, without: the :class:`~sdrpn.eval.runner.Prediction` of ``sdrpn`` and ``baseline``.
        threshold: the RoI threshold ``with_rpn`` was answered with.
        latency_s: the latency of ``with_rpn``.
        prompt: the text the engine was sent, where it differs from ``question`` (e.g. it carries
            an answer-format instruction); the map must be that prompt's.
    """
    import torch

    from .roi import MODE_MASK

    adapter = engine.adapter
    inputs = engine.processor(images=[image], text=[engine.prompt(prompt or question)], return_tensors="pt")
    inputs = {name: value.to(adapter.device) for name, value in inputs.items() if torch.is_tensor(value)}
    vision = adapter.vision_input(inputs)
    roi = engine.predict_roi(**inputs, images=[image], threshold=threshold)
    rows, cols = adapter.view_grids(vision)[0]
    extent = view_extent(adapter, image.size, (rows, cols))
    mode = int(roi.mode[0])
    crop = None
    cells = roi.cells[0, :rows, :cols].cpu().numpy()
    if mode > 0:
        crop_box = tuple(int(v) for v in roi.crops[0].tolist())
        crop = _seen_crop(image, crop_box, cells, extent, masked=mode == MODE_MASK)
    return RoIFigure(
        image=image, probability=roi.prob[0, :rows, :cols].float().cpu().numpy(),
        mask=roi.mask[0, :rows, :cols].cpu().numpy(),
        grid_extent=extent, boxes=with_rpn.boxes, crop=crop, question=question,
        answer_with=with_rpn.shown_text, answer_without=without.shown_text,
        details=(f"threshold {threshold:g} · visual tokens {without.visual_tokens} -> {with_rpn.visual_tokens} · "
                 f"latency {latency_s:.2f} s with SD-RPN"),
    )


def view_extent(adapter, size: tuple[int, int], grid: tuple[int, int]) -> Sequence[float]:
    """``[x0, y0, x1, y1]`` in source pixels that a view's whole token ``grid`` covers, for an image of
    ``size`` (width, height). With a fixed view geometry (``adapter.geometry``, LLaVA) it may reach
    past the image (padding); views that resize the whole image (Qwen's smart resize, no ``geometry``)
    cover the image exactly."""
    rows, cols = grid
    if adapter.geometry is not None:
        return adapter.geometry.transform(size).grid_to_source((0, 0, cols, rows), (rows, cols), clip=False)
    return [0.0, 0.0, float(size[0]), float(size[1])]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _line_height(size: int) -> int:
    return max(14, size // 24) + 6


def figure_size(size: int) -> tuple[int, int]:
    """Width and height in pixels of the figure drawn with panels of ``size`` pixels."""
    return 2 * size + 3 * MARGIN, size + 3 * MARGIN + CAPTION_LINES * _line_height(size)


def heat_colors(probability: np.ndarray) -> np.ndarray:
    """RGB uint8 colours of probabilities in [0, 1] on the heatmap's colour scale."""
    p = np.clip(np.asarray(probability, dtype=np.float32), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(p).astype(int), len(_HEAT_ANCHORS) - 2)
    t = (p - low)[..., None]
    return ((1 - t) * _HEAT_ANCHORS[low] + t * _HEAT_ANCHORS[low + 1]).round().astype(np.uint8)


def _fit(image: Image.Image, size: int) -> tuple[Image.Image, float, tuple[int, int]]:
    """``image`` scaled to fit a size x size box; returns it, the scale and its offset in the box."""
    scale = min(size / image.width, size / image.height)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    return image.resize((width, height), Image.BICUBIC), scale, ((size - width) // 2, (size - height) // 2)


def _grid_layer(values: np.ndarray, extent: Sequence[float], scale: float,
                resample) -> tuple[Image.Image, tuple[int, int]]:
    """A grid-sized array stretched over ``extent`` (source pixels) at the panel's scale."""
    x0, y0, x1, y1 = (round(v * scale) for v in extent)
    layer = Image.fromarray(values).resize((max(1, x1 - x0), max(1, y1 - y0)), resample)
    return layer, (x0, y0)


def _outline(layer: Image.Image, position: tuple[int, int], size: tuple[int, int], width: int) -> Image.Image:
    """The edges of a white-on-black grid layer placed at ``position`` on a panel of ``size``; found
    on a one-pixel wider canvas so that shapes on the panel's border get an edge too."""
    canvas = Image.new("L", (size[0] + 2, size[1] + 2), 0)
    canvas.paste(layer, (position[0] + 1, position[1] + 1))
    edges = canvas.filter(ImageFilter.FIND_EDGES)
    if width > 1:
        edges = edges.filter(ImageFilter.MaxFilter(width))
    return edges.crop((1, 1, size[0] + 1, size[1] + 1))


def _spotlight(shown: Image.Image, light: Image.Image, position: tuple[int, int]) -> Image.Image:
    """``shown`` with every pixel's RGB scaled by the map's relative value (``light``, 0-255) between
    :data:`DIM_FLOOR` and 1: scaling keeps each colour's hue and saturation."""
    brightness = Image.new("L", shown.size, 0)
    brightness.paste(light, position)
    factor = brightness.point(lambda value: round(255 * (DIM_FLOOR + (1 - DIM_FLOOR) * value / 255)))
    return ImageChops.multiply(shown, Image.merge("RGB", (factor, factor, factor)))


def _overlay(figure: RoIFigure, size: int) -> Image.Image:
    shown, scale, offset = _fit(figure.image.convert("RGB"), size)
    # Levels span [0, the map's maximum] so that a weak map still shows where it peaks; the
    # caption states the maximum.
    probability = np.clip(np.asarray(figure.probability, dtype=np.float32), 0.0, 1.0)
    relative = probability / max(float(probability.max()), 1e-6)
    light, position = _grid_layer((relative * 255).round().astype(np.uint8), figure.grid_extent, scale,
                                  Image.BILINEAR)
    blended = _spotlight(shown, light, position)
    for level, color in zip(ISOLINE_LEVELS, heat_colors(np.array(ISOLINE_LEVELS))):
        above = light.point(lambda value, cut=255 * level: 255 if value >= cut else 0)
        blended.paste(Image.new("RGB", shown.size, tuple(int(c) for c in color)), (0, 0),
                      _outline(above, position, shown.size, width=1))

    mask = (np.asarray(figure.mask, dtype=bool) * 255).astype(np.uint8)
    mask_layer, position = _grid_layer(mask, figure.grid_extent, scale, Image.NEAREST)
    blended.paste(Image.new("RGB", shown.size, CONTOUR_COLOR), (0, 0),
                  _outline(mask_layer, position, shown.size, width=3))

    draw = ImageDraw.Draw(blended)
    gx0, gy0, gx1, gy1 = (v * scale for v in figure.grid_extent)
    draw.rectangle([gx0, gy0, gx1 - 1, gy1 - 1], outline=GRID_COLOR, width=1)
    for box in figure.boxes:
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOR, width=max(2, size // 170))
    panel = Image.new("RGB", (size, size), BACKGROUND)
    panel.paste(blended, offset)
    return panel


def mask_regions(mask: np.ndarray) -> int:
    """Connected regions of the thresholded mask (8-connected, as the RoI post-processing counts them)."""
    from skimage.measure import label

    return int(label(np.asarray(mask, dtype=bool), connectivity=2).max())


def legend_lines(figure: RoIFigure) -> list[str]:
    """The caption's two lines on what the left panel shows: the map, and the mask's regions against
    the RoI boxes made of them."""
    probability = np.asarray(figure.probability)
    peak = float(np.max(probability)) if probability.size else 0.0
    levels = "/".join(f"{round(100 * level)}" for level in ISOLINE_LEVELS)
    regions, boxes = mask_regions(figure.mask), len(figure.boxes)
    kept = ("each a RoI box (green)" if boxes == regions
            else f"{boxes} kept as RoI box{'es' if boxes != 1 else ''} (green), {regions - boxes} dropped by the RoI filters")
    return [f"left: RoI map (max p={peak:.2f}) as brightness and isolines at {levels}% of its max, model view (yellow)",
            f"mask (white): {regions} region{'s' if regions != 1 else ''}, {kept}; right: zoomed view"]


def _crop_panel(crop: Image.Image | None, size: int) -> Image.Image:
    panel = Image.new("RGB", (size, size), (240, 240, 240))
    if crop is None:
        draw = ImageDraw.Draw(panel)
        text = "no region above the threshold:\nanswered from the original view"
        draw.multiline_text((size // 2, size // 2), text, fill=MUTED, font=_font(max(12, size // 28)),
                            anchor="mm", align="center")
        return panel
    shown, _, offset = _fit(crop.convert("RGB"), size)
    panel.paste(shown, offset)
    return panel


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render(figure: RoIFigure, size: int = 512) -> Image.Image:
    """Draw ``figure`` into one RGB image of :func:`figure_size` ``(size)``."""
    if size < 64:
        raise ValueError(f"figure panels need at least 64 pixels, got {size}")
    probability = np.asarray(figure.probability)
    if probability.ndim != 2 or np.asarray(figure.mask).shape != probability.shape:
        raise ValueError(f"probability and mask must be (H, W) grids of the same shape, got "
                         f"{probability.shape} and {np.asarray(figure.mask).shape}")
    width, height = figure_size(size)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(_overlay(figure, size), (MARGIN, MARGIN))
    canvas.paste(_crop_panel(figure.crop, size), (2 * MARGIN + size, MARGIN))

    draw = ImageDraw.Draw(canvas)
    font = _font(max(12, size // 24))
    line_height = _line_height(size)
    lines = [("Q: " + figure.question, TEXT)]
    if figure.answer_without is not None:
        lines.append(("without SD-RPN: " + figure.answer_without, TEXT))
    lines.append(("with SD-RPN: " + figure.answer_with, TEXT))
    lines += [(line, MUTED) for line in legend_lines(figure)]
    if figure.details:
        lines.append((figure.details, MUTED))
    top = size + 2 * MARGIN
    for index, (text, color) in enumerate(lines[:CAPTION_LINES]):
        draw.text((MARGIN, top + index * line_height), _ellipsize(draw, text, font, width - 2 * MARGIN),
                  fill=color, font=font)
    return canvas
