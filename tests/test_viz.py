"""The RoI picture: fixed size, the map over the grid's extent without changing the image's colours,
boxes, contour, crop panel, and a caption whose region count matches the mask."""

import numpy as np
import pytest
from PIL import Image

from sdrpn.viz import BOX_COLOR, DIM_FLOOR, MARGIN, RoIFigure, figure_size, heat_colors, legend_lines, render

CYAN = (0, 200, 200)


def test_heat_colors_span_the_scale():
    colors = heat_colors(np.array([0.0, 1.0, 2.0, -1.0]))
    assert colors.dtype == np.uint8 and colors.shape == (4, 3)
    assert tuple(colors[0]) == (20, 30, 120) and tuple(colors[1]) == (230, 30, 20)
    assert (colors[2] == colors[1]).all() and (colors[3] == colors[0]).all()  # clipped


def figure(crop=True) -> RoIFigure:
    image = Image.new("RGB", (300, 200), CYAN)
    probability = np.zeros((4, 4), dtype=np.float32)
    probability[0, 3] = 1.0  # top-right cell of a grid covering the central 200x200 square
    return RoIFigure(image=image, probability=probability, mask=probability > 0.5, grid_extent=[50, 0, 250, 200],
                     boxes=[[200, 0, 250, 50]], crop=image.crop((200, 0, 250, 50)) if crop else None,
                     question="What is it?", answer_with="a cat", answer_without="a dog")


@pytest.mark.parametrize("size", [128, 256])
def test_render_size_and_content(size):
    picture = render(figure(), size=size)
    assert picture.size == figure_size(size)
    assert figure_size(size)[0] == 2 * size + 3 * MARGIN
    pixels = np.asarray(picture).astype(int)
    scale = size / 300  # the 300x200 image is letterboxed into the size x size panel
    top = MARGIN + (size - round(200 * scale)) // 2
    # The map lights the image and never tints it: the high-probability cell keeps the source colour,
    # a zero cell is dimmed with the same hue (a question names its shape by that colour).
    hot = pixels[top + round(25 * scale), MARGIN + round(235 * scale)]
    cold = pixels[top + round(150 * scale), MARGIN + round(100 * scale)]
    assert abs(hot - np.array(CYAN)).max() <= 12
    assert cold[0] == 0 and cold[1] == cold[2] == pytest.approx(DIM_FLOOR * 200, abs=2)
    # the RoI box outline is drawn in its colour on the box's left edge, and only there
    row = top + round(40 * scale)
    left = MARGIN + round(200 * scale)
    assert BOX_COLOR in [tuple(p) for p in pixels[row, left - 3:left + 4]]
    assert BOX_COLOR not in [tuple(p) for p in pixels[row, MARGIN:left - 3]]


def test_the_caption_counts_the_mask_regions_and_the_boxes_made_of_them():
    shown = figure()
    assert "mask (white): 1 region, each a RoI box (green)" in legend_lines(shown)[1]
    shown.mask = np.zeros((4, 4), dtype=bool)
    shown.mask[0, 3] = shown.mask[3, 0] = shown.mask[3, 1] = True  # two regions; one became a box
    assert "mask (white): 2 regions, 1 kept as RoI box (green), 1 dropped by the RoI filters" in legend_lines(shown)[1]


def test_render_without_roi_and_bad_grids():
    assert render(figure(crop=False), size=128).size == figure_size(128)
    bad = figure()
    bad.mask = np.zeros((3, 3), dtype=bool)
    with pytest.raises(ValueError, match="same shape"):
        render(bad)
