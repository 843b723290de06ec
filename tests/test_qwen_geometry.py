"""Qwen-VL view geometry against transformers' processors and the SD-RPN authors' arithmetic.

Authors' code: YuHengsss/SD-RPN at 00876ac, directory ``Qwen2.5-VL/``. The transcriptions below
follow their arithmetic operation by operation (same dtypes, same order), written anew.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import transformers
from sdrpn.models.geometry import ViewTransform
from sdrpn.models.qwen_geometry import QwenViewGeometry, smart_resize, vl_utils_smart_resize

PIXELS_576 = 576 * 28 * 28  # the authors' budget for labels, training and most evaluations

# (min_pixels, max_pixels, factor): transformers' defaults, the checkpoints' defaults, the authors'
# budgets (labels / eval scripts), a non-square min == max budget, and Qwen3-VL's 32-pixel cells.
BUDGETS = [
    (56 * 56, 28 * 28 * 1280, 28),
    (3136, 12845056, 28),
    (PIXELS_576, PIXELS_576, 28),
    (802816, 3211264, 28),
    (802816, 2408448, 28),
    (200000, 200000, 28),
    (576 * 32 * 32, 576 * 32 * 32, 32),
    (64 * 32 * 32, 16384 * 32 * 32, 32),
]


def _sizes(count: int = 600, seed: int = 0) -> list[tuple[int, int]]:
    """(height, width): tiny, exhaustive small, portrait, landscape, 1:10, 10:1, huge, ratio 200."""
    rng = random.Random(seed)
    sizes = [(h, w) for h in range(1, 31) for w in range(1, 31)]
    sizes += [(5, 5), (28, 3), (3, 28), (14, 14), (13, 15), (42, 42), (20000, 15000), (15000, 20000)]
    sizes += [(100, 1000), (1000, 100), (336, 3360), (3360, 336), (30000, 150), (150, 30000)]
    sizes += [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(count)]
    sizes += [(side, side) for side in range(1, 2000, 7)]
    return [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200]


def _transformers_smart_resizes():
    """transformers' smart_resize from each backend module that imports here (name -> function)."""
    found = {}
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as pil_resize

        found["pil"] = pil_resize
    except ImportError:
        pass
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as main_resize

        found["image_processing_qwen2_vl"] = main_resize
    except ImportError:  # transformers 5 imports torchvision there
        pass
    if not found:
        pytest.skip("transformers has no importable Qwen2-VL smart_resize")
    return found


def _pil_processor_class():
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if cls is None:
        pytest.skip("this transformers has no Qwen2VLImageProcessorPil (the PIL backend)")
    return cls


def _torchvision_processor_class():
    pytest.importorskip("torchvision")
    cls = getattr(transformers, "Qwen2VLImageProcessorFast", None) or getattr(transformers, "Qwen2VLImageProcessor")
    return cls


def _grid_of(image_processor, image) -> tuple[int, int]:
    thw = image_processor(image, return_tensors="pt")["image_grid_thw"]
    merge = image_processor.merge_size
    return int(thw[0, 1]) // merge, int(thw[0, 2]) // merge


def authors_expand2square(image: Image.Image, color) -> Image.Image:
    """``expand2square``, ``Qwen2.5-VL/qwen_src/mm_utils.py`` 153-165: paste centred on the short axis."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, 0) if height > width else (0, (side - height) // 2))
    return canvas


def authors_get_bbox4src(boxes: torch.Tensor, src_w: int, src_h: int, feat_size, img_size) -> torch.Tensor:
    """``get_bbox4src``, ``Qwen2.5-VL/qwen_src/ana_utils.py`` 1103-1152 (feat_size and img_size are
    (h, w) in the code, whatever its docstring says)."""
    feat_h, feat_w = feat_size
    img_h, img_w = img_size
    on_view = boxes.float().clone()
    on_view[:, 0::2] *= img_w / feat_w
    on_view[:, 1::2] *= img_h / feat_h
    out = torch.zeros_like(on_view, dtype=torch.float32)
    out[:, 0::2] = on_view[:, 0::2] * (src_w / img_w)
    out[:, 1::2] = on_view[:, 1::2] * (src_h / img_h)
    out[:, 0::2] = torch.clamp(out[:, 0::2], min=0, max=src_w)
    out[:, 1::2] = torch.clamp(out[:, 1::2], min=0, max=src_h)
    return out.long()


def authors_crop_boxes(boxes: torch.Tensor, src_w: int, src_h: int, grid) -> torch.Tensor:
    """What ``image.crop`` receives in ``get_batched_sub_images`` (``qwen_src/mm_utils.py`` 946-970):
    view size = grid * 28, then get_bbox4src against the source image (int() of its int64 values
    changes nothing)."""
    rows, cols = grid
    return authors_get_bbox4src(boxes, src_w, src_h, (rows, cols), (rows * 28, cols * 28))


def authors_known_foreground(original_size, n: int) -> np.ndarray:
    """``get_foreground_mask(original_image_size, h, min_dimension_size=1)``,
    ``Qwen2.5-VL/qwen_src/mm_utils.py`` 258-327: True where the label grid shows the image."""
    width, height = original_size
    longest = max(width, height)
    new_h = max(int(height / longest * n), 1)
    new_w = max(int(width / longest * n), 1)
    if new_w > new_h:
        x1, y1, x2, y2 = 0, (n - new_h) // 2, new_w, new_h + math.ceil((n - new_h) / 2)
    elif new_h > new_w:
        x1, y1, x2, y2 = (n - new_w) // 2, 0, new_w + math.ceil((n - new_w) / 2), new_h
    else:
        x1, y1, x2, y2 = 0, 0, n, n
    mask = np.zeros((n, n), dtype=bool)
    mask[y1:min(y2, n), x1:min(x2, n)] = True
    return mask


def qwen_vl_utils_smart_resize(height, width, factor, min_pixels, max_pixels):
    """``smart_resize`` of ``Qwen2.5-VL/qwen-vl-utils/src/qwen_vl_utils/vision_process.py`` 60-83."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _unpatchify(pixel_values: torch.Tensor, grid_thw, patch: int, merge: int) -> torch.Tensor:
    """(C, H, W) view back from the packed patches of one image (the processor's patch layout)."""
    _, grid_h, grid_w = (int(v) for v in grid_thw)
    channels = 3
    temporal = pixel_values.shape[1] // (channels * patch * patch)
    shape = (grid_h // merge, grid_w // merge, merge, merge, channels, temporal, patch, patch)
    x = pixel_values.reshape(shape)[..., 0, :, :]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, grid_h * patch, grid_w * patch)


def _all_boxes(rows: int, cols: int) -> torch.Tensor:
    """Every non-empty cell box of a rows x cols grid, (N, 4) int64."""
    def spans(count):
        if count == 1:
            return torch.tensor([[0, 1]])
        return torch.combinations(torch.arange(count + 1), 2)

    xs, ys = spans(cols), spans(rows)
    x = xs.repeat_interleave(len(ys), dim=0)
    y = ys.repeat(len(xs), 1)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


# -- smart_resize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_pixels,max_pixels,factor", BUDGETS)
def test_smart_resize_equals_transformers(min_pixels, max_pixels, factor):
    for name, theirs in _transformers_smart_resizes().items():
        for height, width in _sizes():
            ours = smart_resize(height, width, factor, min_pixels, max_pixels)
            assert ours == theirs(height, width, factor, min_pixels, max_pixels), (name, height, width)


def test_smart_resize_defaults_equal_transformers():
    for name, theirs in _transformers_smart_resizes().items():
        for height, width in [(5, 5), (28, 3), (480, 640), (20000, 15000)]:
            assert smart_resize(height, width) == theirs(height, width), name


@pytest.mark.parametrize("height,width", [(201, 1), (1, 201), (20001, 100), (100, 40000)])
def test_aspect_ratio_above_200_raises_like_transformers(height, width):
    for theirs in _transformers_smart_resizes().values():
        with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200") as expected:
            theirs(height, width)
    with pytest.raises(ValueError) as ours:
        smart_resize(height, width)
    assert str(ours.value) == str(expected.value)


def test_aspect_ratio_of_exactly_200_is_accepted():
    for theirs in _transformers_smart_resizes().values():
        assert smart_resize(200, 1) == theirs(200, 1) and smart_resize(1, 200) == theirs(1, 200)


@pytest.mark.parametrize("height,width", [(0, 10), (10, 0), (-5, 10), (10.0, 10), (True, 10)])
def test_smart_resize_rejects_bad_sizes(height, width):
    # transformers divides by zero (ZeroDivisionError) on a zero side; we say what is wrong.
    with pytest.raises(ValueError, match="size must be positive|must be an int"):
        smart_resize(height, width)


def test_vl_utils_smart_resize_is_qwen_vl_utils():
    for min_pixels, max_pixels, factor in BUDGETS:
        for height, width in _sizes(count=200, seed=1):
            expected = qwen_vl_utils_smart_resize(height, width, factor, min_pixels, max_pixels)
            assert vl_utils_smart_resize(height, width, factor, min_pixels, max_pixels) == expected


# -- the processor's aspect-keeping view ------------------------------------------------------------

PROCESSOR_SIZES = [(5, 5), (3, 28), (28, 3), (300, 200), (200, 300), (640, 480), (480, 640), (1000, 100),
                   (100, 1000), (1024, 768), (3446, 3156), (4000, 3000)]  # (width, height)
PROCESSOR_BUDGETS = [(56 * 56, 28 * 28 * 1280), (PIXELS_576, PIXELS_576), (802816, 3211264)]


@pytest.mark.parametrize("min_pixels,max_pixels", PROCESSOR_BUDGETS)
def test_grid_equals_the_pil_processor(min_pixels, max_pixels):
    image_processor = _pil_processor_class()(min_pixels=min_pixels, max_pixels=max_pixels)
    geometry = QwenViewGeometry.from_image_processor(image_processor)
    assert (geometry.cell, geometry.min_pixels, geometry.max_pixels) == (28, min_pixels, max_pixels)
    for size in PROCESSOR_SIZES:
        grid = _grid_of(image_processor, Image.new("RGB", size))
        assert geometry.grid(size) == grid, size
        assert geometry.view_size(size) == (grid[1] * 28, grid[0] * 28)


@pytest.mark.parametrize("min_pixels,max_pixels", PROCESSOR_BUDGETS[1:])
def test_grid_equals_the_torchvision_processor(min_pixels, max_pixels):
    image_processor = _torchvision_processor_class()(min_pixels=min_pixels, max_pixels=max_pixels)
    geometry = QwenViewGeometry.from_image_processor(image_processor)
    for size in PROCESSOR_SIZES:
        assert geometry.grid(size) == _grid_of(image_processor, Image.new("RGB", size)), size


@pytest.mark.filterwarnings("ignore:Passing `min_pixels` and `max_pixels`:FutureWarning")
def test_from_image_processor_reads_size_and_the_attribute_override():
    cls = _pil_processor_class()
    image_processor = cls(size={"shortest_edge": 200 * 784, "longest_edge": 300 * 784})
    geometry = QwenViewGeometry.from_image_processor(image_processor)
    assert (geometry.min_pixels, geometry.max_pixels, geometry.cell) == (200 * 784, 300 * 784, 28)
    # The authors set the attributes after loading (make_pseudo_label_textual.py 63-67); the
    # processor then resizes with them, and so must we.
    image_processor.min_pixels = image_processor.max_pixels = 100 * 784
    geometry = QwenViewGeometry.from_image_processor(image_processor)
    assert (geometry.min_pixels, geometry.max_pixels) == (100 * 784, 100 * 784)
    image = Image.new("RGB", (1000, 500))
    assert geometry.grid(image.size) == _grid_of(image_processor, image) == (7, 14)


def test_from_image_processor_checks_the_cell():
    image_processor = _pil_processor_class()()
    assert QwenViewGeometry.from_image_processor(image_processor, cell=28).cell == 28
    with pytest.raises(ValueError, match="disagrees"):
        QwenViewGeometry.from_image_processor(image_processor, cell=32)
    image_processor.do_resize = False
    with pytest.raises(ValueError, match="do_resize"):
        QwenViewGeometry.from_image_processor(image_processor)


def test_aspect_view_is_a_plain_scale():
    geometry = QwenViewGeometry(min_pixels=PIXELS_576, max_pixels=PIXELS_576)
    transform = geometry.transform((1000, 700))
    assert isinstance(transform, ViewTransform)
    view_w, view_h = geometry.view_size((1000, 700))
    assert transform.input_size == (view_h, view_w) and transform.offset == (0.0, 0.0)
    assert transform.view_to_source((0, 0, view_w, view_h)) == pytest.approx((0, 0, 1000, 700))
    assert not geometry.padding_cells((1000, 700)).any()
    assert geometry.padding_cells((1000, 700)).shape == geometry.grid((1000, 700))


def test_aspect_view_transform_matches_the_processed_pixels():
    """A vertical and a horizontal step edge land where the transform says (non-integer scale)."""
    cls = _pil_processor_class()
    image_processor = cls(min_pixels=PIXELS_576, max_pixels=PIXELS_576, do_rescale=False, do_normalize=False)
    geometry = QwenViewGeometry.from_image_processor(image_processor)
    width, height, edge_x, edge_y = 1000, 700, 413, 290
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, edge_x:, 0] = 255
    array[edge_y:, :, 1] = 255
    out = image_processor(Image.fromarray(array), return_tensors="pt")
    view = _unpatchify(out["pixel_values"], out["image_grid_thw"][0], 14, 2)
    transform = geometry.transform((width, height))
    assert view.shape[1:] == transform.input_size
    expected_x = transform.source_to_view((edge_x, 0, edge_x, 0))[0]
    expected_y = transform.source_to_view((0, edge_y, 0, edge_y))[1]
    for profile, expected in ((view[0].mean(0), expected_x), (view[1].mean(1), expected_y)):
        # 50% crossing between pixel centres, linearly interpolated.
        index = int((profile < 127.5).sum()) - 1
        low, high = float(profile[index]), float(profile[index + 1])
        crossing = index + 0.5 + (127.5 - low) / (high - low)
        assert crossing == pytest.approx(expected, abs=0.1)


def test_evaluation_path_resizes_twice():
    """lmms-eval's qwen2_5_vl.py 274-315: qwen_vl_utils resizes, then the processor resizes again."""
    direct = QwenViewGeometry(min_pixels=PIXELS_576, max_pixels=PIXELS_576)
    twice = QwenViewGeometry(min_pixels=PIXELS_576, max_pixels=PIXELS_576, vl_utils_resize=True)
    for height, width in _sizes(count=300, seed=2):
        if height < 14 or width < 14:
            continue
        first = qwen_vl_utils_smart_resize(height, width, 28, PIXELS_576, PIXELS_576)
        if max(first) / min(first) > 200:
            # qwen_vl_utils keeps one cell on the short side, so the processor then refuses the
            # image (the authors' evaluation fails on it); so do we.
            with pytest.raises(ValueError, match="aspect ratio"):
                twice.view_size((width, height))
            continue
        second = smart_resize(*first, 28, PIXELS_576, PIXELS_576)
        assert twice.view_size((width, height)) == (second[1], second[0])
    assert direct.grid((3446, 3156)) == (22, 25) and twice.grid((3446, 3156)) == (23, 26)
    # At the eval scripts' 1024-4096 token budget the second resize changes nothing.
    wide = dict(min_pixels=802816, max_pixels=3211264)
    for height, width in _sizes(count=300, seed=3):
        size = (width, height)
        if max(size) / min(size) > 100:  # near 200 the first resize can push the ratio past it
            continue
        assert QwenViewGeometry(**wide).grid(size) == QwenViewGeometry(**wide, vl_utils_resize=True).grid(size)
    # The map to the source is still one scale: both resizes map pixel edges linearly.
    assert twice.transform((3446, 3156)).scale == (3446 / 728, 3156 / 644)


# -- the authors' square labelling view ---------------------------------------------------------------

SQUARE_SIZES = [(1000, 500), (500, 1000), (300, 300), (640, 480), (480, 640), (1001, 300), (300, 1001),
                (690, 690), (19, 10), (10, 632), (2000, 150), (1, 124), (468, 97)]


def test_authors_square_settings():
    geometry = QwenViewGeometry.authors_square()
    assert geometry == QwenViewGeometry(cell=28, min_pixels=PIXELS_576, max_pixels=PIXELS_576, square_side=672)
    assert geometry.pad_color == (127, 127, 127)
    assert QwenViewGeometry.authors_square(cell=32).square_side == 768


@pytest.mark.parametrize("size", SQUARE_SIZES)
def test_square_view_grid_equals_the_authors_pipeline(size):
    """make_pseudo_label_textual.py 58-76: expand2square with grey 127, processor at min = max = 576*28*28."""
    image_processor = _pil_processor_class()(min_pixels=PIXELS_576, max_pixels=PIXELS_576)
    geometry = QwenViewGeometry.authors_square()
    padded = authors_expand2square(Image.new("RGB", size, (200, 10, 10)), (127, 127, 127))
    grid = _grid_of(image_processor, padded)
    assert geometry.grid(size) == grid
    assert geometry.view_size(size) == (grid[1] * 28, grid[0] * 28)
    assert geometry.canvas(size)[0] == padded.size


def test_square_view_is_not_always_24_cells():
    geometry = QwenViewGeometry.authors_square()
    assert geometry.grid((1000, 500)) == (24, 24)
    assert geometry.grid((1001, 300)) == (23, 23)  # smart_resize floors 23.999... cells
    assert geometry.grid((19, 10)) == (25, 25)  # and ceils 24.000...1 cells
    sides = range(1, 4001)
    counts = {cells: sum(geometry.grid((side, side))[0] == cells for side in sides) for cells in (23, 24, 25)}
    assert counts[24] > 0.9 * len(sides) and counts[23] > 0 and counts[25] > 0
    assert sum(counts.values()) == len(sides)


def test_square_view_transform_and_padding_cells_on_landscape_portrait_square():
    geometry = QwenViewGeometry.authors_square()
    landscape = geometry.transform((1000, 500))
    assert landscape.scale == (1000 / 672, 1000 / 672) and landscape.offset == (0.0, -250.0)
    pad = geometry.padding_cells((1000, 500))
    assert pad.shape == (24, 24) and pad.dtype == torch.bool
    assert pad[:6].all() and pad[18:].all() and not pad[6:18].any()
    portrait = geometry.transform((500, 1000))
    assert portrait.offset == (-250.0, 0.0)
    assert torch.equal(geometry.padding_cells((500, 1000)), pad.T)
    assert not geometry.padding_cells((300, 300)).any()
    # 640 x 480: 18 rows keep the image ( int(0.75 * 24) ), 3 padding rows at each end.
    pad = geometry.padding_cells((640, 480))
    assert pad[:3].all() and pad[21:].all() and not pad[3:21].any()


@pytest.mark.parametrize("seed", [0, 1])
def test_padding_cells_equal_the_authors_rule(seed):
    geometry = QwenViewGeometry.authors_square()
    rng = random.Random(seed)
    sizes = SQUARE_SIZES + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(400)]
    for size in sizes:
        if max(size) / min(size) > 200:
            continue
        rows, cols = geometry.grid(size)
        assert rows == cols
        expected = ~authors_known_foreground(size, rows)
        assert np.array_equal(geometry.padding_cells(size).numpy(), expected), size


def test_square_view_transform_matches_the_processed_pixels():
    """A white block on black, padded grey: block, image and padding sit where the transform says."""
    cls = _pil_processor_class()
    image_processor = cls(min_pixels=PIXELS_576, max_pixels=PIXELS_576, do_rescale=False, do_normalize=False)
    geometry = QwenViewGeometry.authors_square()
    for size, block in (((1344, 672), (100, 50, 300, 150)), ((672, 1344), (50, 100, 150, 300))):
        array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        x0, y0, x1, y1 = block
        array[y0:y1, x0:x1] = 255
        padded = authors_expand2square(Image.fromarray(array), (127, 127, 127))
        out = image_processor(padded, return_tensors="pt")
        view = _unpatchify(out["pixel_values"], out["image_grid_thw"][0], 14, 2).mean(0)
        transform = geometry.transform(size)
        bx0, by0, bx1, by1 = (int(v) for v in transform.source_to_view(block))
        ix0, iy0, ix1, iy1 = (int(v) for v in transform.source_to_view((0, 0) + size))
        margin = 3  # bicubic ringing near edges

        def region(x0, y0, x1, y1, grow):
            mask = torch.zeros_like(view, dtype=torch.bool)
            mask[max(y0 - grow, 0):y1 + grow, max(x0 - grow, 0):x1 + grow] = True
            return mask

        assert torch.all(view[region(bx0, by0, bx1, by1, -margin)] == 255)
        image_only = region(ix0, iy0, ix1, iy1, -margin) & ~region(bx0, by0, bx1, by1, margin)
        assert torch.all(view[image_only] == 0)
        assert torch.all(view[~region(ix0, iy0, ix1, iy1, margin)] == 127)
        # The padding cells of the authors' rule are grey here (bar ringing next to the image).
        cells = view.reshape(24, 28, 24, 28).permute(0, 2, 1, 3).reshape(24, 24, -1)
        grey = cells[geometry.padding_cells(size)]
        assert len(grey) == 12 * 24 and (grey - 127).abs().max() <= 10
        assert (grey.mean(1) - 127).abs().max() < 0.5


# -- cell boxes to source pixels ----------------------------------------------------------------------

BOX_SIZES = [(1000, 700), (700, 1000), (640, 480), (3446, 3156), (5, 5), (28, 3), (100, 1000), (4000, 3000),
             (1920, 1080), (333, 777)]


@pytest.mark.parametrize("min_pixels,max_pixels", PROCESSOR_BUDGETS)
def test_grid_boxes_equal_the_authors_crop_on_every_box(min_pixels, max_pixels):
    geometry = QwenViewGeometry(min_pixels=min_pixels, max_pixels=max_pixels)
    for width, height in BOX_SIZES:
        grid = geometry.grid((width, height))
        if grid[0] * grid[1] > 1300:  # keep the exhaustive set small; big grids are sampled below
            continue
        boxes = _all_boxes(*grid)
        expected = authors_crop_boxes(boxes, width, height, grid)
        batch = len(boxes)
        ours = geometry.grid_boxes_to_source(
            boxes, torch.tensor([[width, height]]).expand(batch, 2), torch.tensor([grid]).expand(batch, 2))
        assert torch.equal(ours, expected), (width, height)


@pytest.mark.parametrize("min_pixels,max_pixels", PROCESSOR_BUDGETS)
def test_scalar_box_equals_the_authors_crop(min_pixels, max_pixels):
    geometry = QwenViewGeometry(min_pixels=min_pixels, max_pixels=max_pixels)
    rng = random.Random(min_pixels)
    for width, height in BOX_SIZES:
        rows, cols = geometry.grid((width, height))
        boxes = []
        for _ in range(150):
            x0, x1 = sorted(rng.sample(range(cols + 1), 2)) if cols > 1 else (0, 1)
            y0, y1 = sorted(rng.sample(range(rows + 1), 2)) if rows > 1 else (0, 1)
            boxes.append([x0, y0, x1, y1])
        boxes.append([0, 0, cols, rows])
        expected = authors_crop_boxes(torch.tensor(boxes), width, height, (rows, cols)).tolist()
        for box, crop in zip(boxes, map(tuple, expected)):
            assert geometry.grid_box_to_source(box, (width, height)) == crop, (width, height, box)


def test_square_boxes_equal_the_authors_crop_on_the_padded_image_shifted():
    geometry = QwenViewGeometry.authors_square()
    for size in SQUARE_SIZES:
        (side, _), (offset_x, offset_y) = geometry.canvas(size)
        grid = geometry.grid(size)
        boxes = _all_boxes(*grid)[::7]
        on_canvas = authors_crop_boxes(boxes, side, side, grid)
        shift = torch.tensor([offset_x, offset_y, offset_x, offset_y])
        limit = torch.tensor([size[0], size[1], size[0], size[1]])
        expected = torch.minimum((on_canvas - shift).clamp_min(0), limit)
        batch = len(boxes)
        ours = geometry.grid_boxes_to_source(
            boxes, torch.tensor([size]).expand(batch, 2), torch.tensor([grid]).expand(batch, 2))
        assert torch.equal(ours, expected), size
    # A box wholly in the top padding of a landscape image crops nothing.
    assert geometry.grid_box_to_source((0, 0, 24, 6), (1000, 500)) == (0, 0, 1000, 0)
    assert geometry.grid_box_to_source((0, 6, 24, 18), (1000, 500)) == (0, 0, 1000, 500)


def test_the_whole_grid_can_lose_the_last_source_pixel():
    """Their float32 ``view * float32(source / view)`` can land just below the source size, and
    truncation then drops the last column or row (about 10% of images); we keep that."""
    geometry = QwenViewGeometry(min_pixels=PIXELS_576, max_pixels=PIXELS_576)
    rows, cols = geometry.grid((1270, 3992))
    assert geometry.grid_box_to_source((0, 0, cols, rows), (1270, 3992)) == (0, 0, 1270, 3991)
    rows, cols = geometry.grid((1000, 700))
    assert geometry.grid_box_to_source((0, 0, cols, rows), (1000, 700)) == (0, 0, 1000, 700)


def _mixed_batch(geometry, seed: int, count: int = 300):
    rng = random.Random(seed)
    boxes, sizes, grids = [], [], []
    for _ in range(count):
        size = (rng.randint(1, 4000), rng.randint(1, 4000))
        if max(size) / min(size) > 200:
            continue
        rows, cols = geometry.grid(size)
        x0 = rng.randrange(cols)
        y0 = rng.randrange(rows)
        boxes.append([x0, y0, rng.randint(x0 + 1, cols), rng.randint(y0 + 1, rows)])
        sizes.append(size)
        grids.append((rows, cols))
    return torch.tensor(boxes), torch.tensor(sizes), torch.tensor(grids)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("square", [False, True])
def test_batched_equals_scalar(device, square):
    geometry = QwenViewGeometry.authors_square() if square else QwenViewGeometry(min_pixels=3136, max_pixels=802816)
    boxes, sizes, grids = _mixed_batch(geometry, seed=int(square))
    out = geometry.grid_boxes_to_source(boxes.to(device), sizes.to(device), grids.to(device))
    assert out.device.type == device and out.dtype == torch.int64
    expected = [geometry.grid_box_to_source(box, size) for box, size in zip(boxes.tolist(), sizes.tolist())]
    assert out.cpu().tolist() == [list(box) for box in expected]
    unchecked = geometry.grid_boxes_to_source(boxes.to(device), sizes.to(device), grids.to(device), validate=False)
    assert torch.equal(unchecked, out)


def test_boxes_agree_with_the_exact_transform():
    """The authors' float32 truncation is the exact map, floored (within float32 rounding)."""
    geometry = QwenViewGeometry(min_pixels=PIXELS_576, max_pixels=PIXELS_576)
    for size in BOX_SIZES:
        grid = geometry.grid(size)
        transform = geometry.transform(size)
        for box in _all_boxes(*grid)[::97].tolist():
            exact = transform.grid_to_source(box, grid)
            crop = geometry.grid_box_to_source(box, size)
            for value, pixel in zip(exact, crop):
                assert pixel == math.floor(value) or abs(value - round(value)) < 1e-3, (size, box)


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 5), (0, 0), (10.5, 10), (10,), "ab"])
def test_bad_sizes_raise(square, size):
    geometry = QwenViewGeometry.authors_square() if square else QwenViewGeometry()
    for method in (geometry.view_size, geometry.grid, geometry.transform, geometry.padding_cells, geometry.canvas):
        with pytest.raises(ValueError):
            method(size)
    with pytest.raises(ValueError):
        geometry.grid_box_to_source((0, 0, 1, 1), size)


def test_too_elongated_images_raise():
    with pytest.raises(ValueError, match="aspect ratio"):
        QwenViewGeometry().grid((2010, 10))
    # Padded to a square, the same image is fine.
    assert QwenViewGeometry.authors_square().grid((2000, 10)) == (24, 24)


@pytest.mark.parametrize("box", [(0, 0, 25, 1), (0, 0, 1, 25), (-1, 0, 1, 1), (3, 0, 3, 1), (0, 5, 1, 4),
                                 (0, 0, 1), (0, 0, 1.0, 1), "abcd", None])
def test_boxes_outside_the_grid_raise(box):
    geometry = QwenViewGeometry.authors_square()
    with pytest.raises(ValueError):
        geometry.grid_box_to_source(box, (1000, 500))


def test_batched_bad_input_raises():
    geometry = QwenViewGeometry.authors_square()
    sizes, grids = torch.tensor([[1000, 500]]), torch.tensor([[24, 24]])
    with pytest.raises(ValueError, match="outside"):
        geometry.grid_boxes_to_source(torch.tensor([[0, 0, 25, 1]]), sizes, grids)
    with pytest.raises(ValueError, match="outside"):
        geometry.grid_boxes_to_source(torch.tensor([[2, 0, 2, 1]]), sizes, grids)
    with pytest.raises(ValueError, match="integer"):
        geometry.grid_boxes_to_source(torch.tensor([[0.0, 0, 1, 1]]), sizes, grids)
    with pytest.raises(ValueError, match="integer"):
        geometry.grid_boxes_to_source(torch.tensor([0, 0, 1, 1]), sizes, grids)
    with pytest.raises(ValueError, match="batch sizes"):
        geometry.grid_boxes_to_source(torch.tensor([[0, 0, 1, 1]] * 2), sizes, grids)
    with pytest.raises(ValueError, match="positive"):
        geometry.grid_boxes_to_source(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 500]]), grids)


@pytest.mark.parametrize("kwargs", [
    dict(cell=0),
    dict(min_pixels=0),
    dict(min_pixels=1000, max_pixels=999),
    dict(square_side=672),  # the budget must be the square's
    dict(square_side=670, min_pixels=670**2, max_pixels=670**2),  # not whole cells
])
def test_bad_geometry_raises(kwargs):
    with pytest.raises(ValueError):
        QwenViewGeometry(**kwargs)
