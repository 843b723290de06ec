"""Processor geometry: grid cells map to the right source pixels; RoI views equal PIL's resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.tiny_models import TINY_GRID, TINY_IMAGE, tiny_processor
from sdrpn.models import geometry as geometry_module
from sdrpn.models.geometry import (
    ImageGeometry,
    resample_views,
    square_crop_boxes,
    to_rgb_array,
)

# (width, height): square, portrait, landscape, 1:10 both ways, tiny, huge.
SIZES = [(300, 300), (200, 500), (640, 360), (50, 500), (500, 50), (20, 20), (20, 13), (8000, 6000), (8000, 800)]
MODES = ["crop", "pad"]


@pytest.fixture(scope="module", params=MODES)
def processor(request):
    return tiny_processor(pad_to_square=request.param == "pad")


def _pixel_values(processor, image):
    return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]


def _intensity(processor, pixel_values):
    """Per-pixel mean over channels of the 8-bit-scaled view, in [0, 1] (undoes the normalisation)."""
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    return (pixel_values * std + mean).mean(0)


def _cell_means(view, grid):
    rows, cols = grid
    return view.reshape(rows, view.shape[0] // rows, cols, view.shape[1] // cols).mean(dim=(1, 3))


def _coverage(geometry_transform, rect, grid):
    """Exact fraction of each grid cell covered by a source-pixel rectangle."""
    gx0, gy0, gx1, gy1 = geometry_transform.source_to_grid(rect, grid)
    cells_x = np.arange(grid[1])
    cells_y = np.arange(grid[0])
    overlap_x = np.clip(np.minimum(cells_x + 1, gx1) - np.maximum(cells_x, gx0), 0, 1)
    overlap_y = np.clip(np.minimum(cells_y + 1, gy1) - np.maximum(cells_y, gy0), 0, 1)
    return torch.tensor(np.outer(overlap_y, overlap_x), dtype=torch.float32)


def test_geometry_is_read_from_the_processor(processor):
    geometry = ImageGeometry.from_processor(processor, (1, 1))
    assert geometry.mode == ("pad" if processor.image_processor.do_pad else "crop")
    assert geometry.input_size == (TINY_IMAGE, TINY_IMAGE) and geometry.shortest_edge == TINY_IMAGE
    assert geometry.resample == 3
    assert geometry.image_mean == tuple(processor.image_processor.image_mean)


def test_defaults_without_a_processor():
    geometry = ImageGeometry.from_processor(None, (336, 336))
    assert (geometry.mode, geometry.input_size, geometry.shortest_edge) == ("crop", (336, 336), 336)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_grid_box_round_trip(processor, size):
    geometry = ImageGeometry.from_processor(processor, (1, 1))
    transform = geometry.transform(size)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x0, x1 = sorted(rng.choice(TINY_GRID[1] + 1, 2, replace=False))
        y0, y1 = sorted(rng.choice(TINY_GRID[0] + 1, 2, replace=False))
        source = transform.grid_to_source((x0, y0, x1, y1), TINY_GRID, clip=False)
        np.testing.assert_allclose(transform.source_to_grid(source, TINY_GRID), (x0, y0, x1, y1), atol=1e-9)
    # The whole grid covers exactly the image region the processor keeps.
    whole = transform.grid_to_source((0, 0, TINY_GRID[1], TINY_GRID[0]), TINY_GRID)
    width, height = size
    if geometry.mode == "pad":
        np.testing.assert_allclose(whole, (0, 0, width, height), atol=1e-9)
    else:
        # The short side becomes 96 pixels, the long side int(96 * long / short) (floored, so its scale
        # differs slightly); the centre crop keeps 96 x 96 of those.
        short, long = min(width, height), max(width, height)
        resized_long = int(TINY_IMAGE * long / short)
        resized_w, resized_h = (TINY_IMAGE, resized_long) if width <= height else (resized_long, TINY_IMAGE)
        kept_w, kept_h = TINY_IMAGE * width / resized_w, TINY_IMAGE * height / resized_h
        left = (resized_w - TINY_IMAGE) // 2 * width / resized_w
        top = (resized_h - TINY_IMAGE) // 2 * height / resized_h
        np.testing.assert_allclose(whole, (left, top, left + kept_w, top + kept_h), atol=1e-9)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_grid_box_maps_to_the_pixels_the_processor_shows_there(processor, size):
    """Draw a white rectangle where the geometry says a grid box is; the processed view is white
    exactly on those cells (up to resampling blur at the rectangle's edges)."""
    geometry = ImageGeometry.from_processor(processor, (1, 1))
    transform = geometry.transform(size)
    boxes = [(2, 3, 7, 9), (8, 10, 12, 12), (0, 0, 4, 2), (5, 5, 6, 6)]
    for box in boxes[:2] if max(size) > 4000 else boxes:  # huge images: two boxes keep the test quick
        x0, y0, x1, y1 = transform.grid_to_source(box, TINY_GRID)
        rect = (round(x0), round(y0), round(x1), round(y1))
        if rect[2] <= rect[0] or rect[3] <= rect[1]:
            continue  # the box lies in pad-mode padding
        canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        canvas[rect[1]:rect[3], rect[0]:rect[2]] = 255
        view = _intensity(processor, _pixel_values(processor, Image.fromarray(canvas)))
        cells = _cell_means(view, TINY_GRID)
        expected = _coverage(transform, rect, TINY_GRID)
        if geometry.mode == "pad":
            # Cells over the padding show the pad colour (the mean), not black.
            outside = _coverage(transform, (0, 0, size[0], size[1]), TINY_GRID)
            expected = expected + (1 - outside) * torch.tensor(geometry.image_mean).mean()
        # Resampling blurs about one view pixel per side: a cell of 8 pixels moves by < 0.25.
        torch.testing.assert_close(cells, expected, atol=0.25, rtol=0)
        # A shift by one cell would not pass: check it does not.
        shifted = torch.roll(expected, 1, dims=1)
        if not torch.equal(shifted, expected):
            assert (cells - shifted).abs().max() > 0.25


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "RGB"])
def test_rgb_conversion_is_what_the_processor_sees(processor, mode):
    rng = np.random.default_rng(1)
    rgba = Image.fromarray((rng.random((40, 60, 4)) * 255).astype(np.uint8), "RGBA")
    image = rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)
    rgb = to_rgb_array(image)
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
    torch.testing.assert_close(
        _pixel_values(processor, Image.fromarray(rgb)), _pixel_values(processor, image), rtol=0, atol=0
    )


def _canvas_crop(image: np.ndarray, crop, color):
    x0, y0, width, height = crop
    canvas = Image.new("RGB", (width, height), color)
    canvas.paste(Image.fromarray(image), (-x0, -y0))
    return canvas


@pytest.mark.parametrize("static", [False, True], ids=["cpu-windows", "static-shapes"])
@pytest.mark.parametrize("resample", [3, 2])
def test_resample_views_equals_pil(resample, static):
    """Both implementations: per-sample windows (the CPU path) and static shapes (the GPU path)."""
    rng = np.random.default_rng(2)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for w, h in [(517, 300), (64, 200), (30, 20), (9, 9)]]
    # Squares and rectangles (stretched, as box upscaling does), inside the image and beyond it.
    crops = torch.tensor([[13, 40, 200, 200], [-20, 30, 100, 100], [-5, -8, 40, 40], [0, 0, 9, 9],
                          [100, 7, 417, 31], [3, 0, 1, 200], [2, 3, 25, 1], [-3, 150, 70, 90]])
    images = images + images
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    sources = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    for index, image in enumerate(images):
        sources[index, :, : image.shape[0], : image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1)
    sizes = torch.tensor([[image.shape[1], image.shape[0]] for image in images])
    color = (122, 116, 104)
    resample_fn = geometry_module._resample_static if static else resample_views
    views = resample_fn(sources, sizes, crops, (96, 80), resample, color, max_side=517)
    assert views.shape == (8, 3, 96, 80) and views.dtype == torch.uint8
    for index, image in enumerate(images):
        expected = np.asarray(_canvas_crop(image, crops[index].tolist(), color).resize((80, 96), resample))
        np.testing.assert_array_equal(views[index].permute(1, 2, 0).numpy(), expected)


def test_roi_view_pixel_values_equal_the_processor_on_the_crop(processor):
    """Normalised device views equal the processor's own output for the same square crop."""
    geometry = ImageGeometry.from_processor(processor, (1, 1))
    rng = np.random.default_rng(3)
    image = (rng.random((150, 230, 3)) * 255).astype(np.uint8)
    square = [50, -10, 120, 120]
    sources = torch.from_numpy(image).permute(2, 0, 1)[None]
    views = resample_views(sources, torch.tensor([[230, 150]]), torch.tensor([square]), geometry.input_size,
                           geometry.resample, geometry.pad_color, max_side=230)
    crop = _canvas_crop(image, square, geometry.pad_color)
    torch.testing.assert_close(geometry.normalize(views)[0], _pixel_values(processor, crop), rtol=0, atol=0)


def test_square_crop_boxes():
    boxes = torch.tensor([
        [10.2, 20.0, 30.0, 25.5],    # wide box, well inside: centred square of side 20
        [0.0, 0.0, 5.0, 40.0],       # tall box at the left edge: shifted right to stay inside
        [90.0, 10.0, 100.0, 12.0],   # at the right edge: shifted left
        [0.0, 10.0, 100.0, 20.0],    # wider than the image is tall (100 x 50): centred on the height
    ])
    squares = square_crop_boxes(boxes, torch.tensor([100, 50]))
    assert squares.tolist() == [[10, 13, 20, 20], [0, 0, 40, 40], [90, 6, 10, 10], [0, -25, 100, 100]]
    for box, (x0, y0, side, _) in zip(boxes.tolist(), squares.tolist()):
        if side <= 50:  # fits: the rounded box lies inside the square, and the square inside the image
            assert x0 <= np.floor(box[0]) and np.ceil(box[2]) <= x0 + side
            assert y0 <= np.floor(box[1]) and np.ceil(box[3]) <= y0 + side
            assert 0 <= x0 and x0 + side <= 100 and 0 <= y0 and y0 + side <= 50


def test_invalid_geometry_is_refused():
    with pytest.raises(ValueError, match="mode"):
        ImageGeometry(mode="stretch", input_size=(96, 96), shortest_edge=96)
    with pytest.raises(ValueError, match="resampling"):
        ImageGeometry(mode="crop", input_size=(96, 96), shortest_edge=96, resample=1)
    with pytest.raises(ValueError, match="positive"):
        ImageGeometry(mode="crop", input_size=(96, 96), shortest_edge=96).transform((0, 10))
