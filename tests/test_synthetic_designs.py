"""The generator's named designs: "classic" is the data set the shipped model was trained on, bit
for bit; "one-detail" puts a number in the named shape only, names it by a unique colour, and keeps
the number unreadable at the base resolution and readable in a zoomed view."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdrpn.data.synthetic import COLORS, DEFAULT_DESIGN, DESIGNS, SyntheticConfig, generate_dataset, split_sample
from sdrpn.models.geometry import ImageGeometry
from sdrpn.testbed.tiny_model import TinyLlavaSpec, build_processor

ONE_DETAIL = DESIGNS["one-detail"]
SAMPLES = [split_sample(5, "train", index, ONE_DETAIL) for index in range(30)]


def records(directory, split):
    return [json.loads(line) for line in (directory / f"{split}.jsonl").read_text().splitlines()]


def test_the_default_design_is_the_classic_configuration():
    assert DEFAULT_DESIGN == "classic" and DESIGNS["classic"] == SyntheticConfig()


def test_the_classic_manifest_is_the_one_written_before_designs_existed(tmp_path):
    manifest = generate_dataset(tmp_path / "classic", 1, 0, 0, seed=0, progress=False)
    assert "numbered" not in manifest["config"]
    manifest = generate_dataset(tmp_path / "one", 1, 0, 0, seed=0, config=ONE_DETAIL, progress=False)
    assert manifest["config"]["numbered"] == "target"


def test_one_detail_images_share_the_classic_layout_and_leave_the_other_shapes_blank():
    for index in range(10):
        classic = split_sample(3, "test", index, SyntheticConfig(**{**vars(ONE_DETAIL), "numbered": "all"}))
        one = split_sample(3, "test", index, ONE_DETAIL)
        assert [s.box for s in one.shapes] == [s.box for s in classic.shapes]
        assert one.target == classic.target and one.question == classic.question
        assert all(shape.number == "" and shape.text_box is None for shape in one.shapes[1:])


def test_one_detail_questions_have_one_number_and_a_unique_colour():
    for sample in SAMPLES:
        numbered = [shape for shape in sample.shapes if shape.number]
        assert numbered == [sample.target] and sample.answer == sample.target.number
        assert [shape.color for shape in sample.shapes].count(sample.target.color) == 1
        assert 2 <= len(sample.shapes) <= 5
        # A blank shape is one flat colour: nothing in it to read.
        for shape in sample.shapes[1:]:
            x0, y0, x1, y1 = shape.box
            side = (x1 - x0) // 4  # the middle of every kind of shape is inside it
            middle = np.asarray(sample.image)[(y0 + y1) // 2 - side // 2:(y0 + y1) // 2 + side // 2,
                                               (x0 + x1) // 2 - side // 2:(x0 + x1) // 2 + side // 2]
            assert (middle == np.array(COLORS[shape.color], np.uint8)).all()


def test_one_detail_records_list_the_target_number_alone(tmp_path):
    generate_dataset(tmp_path, 8, 2, 3, seed=4, config=ONE_DETAIL, progress=False)
    for split in ("train", "val", "test"):
        for row in records(tmp_path, split):
            assert row["details"] == [{"number": row["answers"][0], "box": row["detail_box"]}]


def test_one_detail_generation_is_deterministic(tmp_path):
    first = generate_dataset(tmp_path / "a", 3, 1, 2, seed=9, config=ONE_DETAIL, progress=False)
    second = generate_dataset(tmp_path / "b", 3, 1, 2, seed=9, config=ONE_DETAIL, progress=False)
    assert first == second
    for split in ("train", "val", "test"):
        assert records(tmp_path / "a", split) == records(tmp_path / "b", split)
        for row in records(tmp_path / "a", split):
            a, b = (np.asarray(Image.open(tmp_path / d / row["image"])) for d in "ab")
            assert (a == b).all()


def test_the_numbered_field_is_checked():
    with pytest.raises(ValueError, match="numbered"):
        SyntheticConfig(numbered="some")


@pytest.fixture(scope="module")
def geometry() -> ImageGeometry:
    return ImageGeometry.from_processor(build_processor(), (TinyLlavaSpec().image_size,) * 2)


def test_one_detail_numbers_are_small_at_the_base_resolution_and_large_in_a_zoomed_view(geometry):
    cell = geometry.input_size[0] / TinyLlavaSpec().grid[0]
    for sample in (s for s in SAMPLES if not s.coarse):
        view = geometry.transform(sample.image.size)
        x0, y0, x1, y1 = view.source_to_view(sample.target.box)
        tx0, ty0, tx1, ty1 = view.source_to_view(sample.target.text_box)
        # 7 font rows in under 6 pixels: below one pixel per font pixel at the base resolution.
        assert ty1 - ty0 < 6.0
        assert min(x1 - x0, y1 - y0) >= 1.4 * cell
        # The RoI box of the shape (at most 3x3 cells) stretched to the input makes it 3x taller at least.
        assert (ty1 - ty0) * geometry.input_size[0] / (3 * cell) >= 12.0
