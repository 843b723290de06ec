"""The synthetic fine-grained VQA generator: determinism, splits, boxes, the eval format, and the
property the testbed rests on (the region is easy to find at the model's resolution, the number in
it is not readable there but is in a crop)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrpn.data.synthetic import (COLORS, SPLITS, SyntheticConfig, generate_dataset, make_sample,
                                  read_manifest, sample_rng, split_sample, vocabulary)
from sdrpn.errors import UserError
from sdrpn.eval.datasets import jsonl
from sdrpn.models.geometry import ImageGeometry
from sdrpn.testbed.tiny_model import TinyLlavaSpec, build_processor

SAMPLES = [make_sample(sample_rng(7, "test", index)) for index in range(40)]
COARSE = [make_sample(sample_rng(7, "train", index), coarse=True) for index in range(10)]


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (decoded pixels for images, bytes otherwise)."""
    hashes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            data = np.asarray(Image.open(path)).tobytes() if path.suffix == ".png" else path.read_bytes()
            hashes[str(path.relative_to(directory))] = hashlib.sha256(data).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, 6, 3, 4, seed=11, progress=False)
    return out


def records(directory: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (directory / f"{split}.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# Determinism and layout
# ------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(dataset, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, 6, 3, 4, seed=11, progress=False)
    assert digest(again) == digest(dataset)


def test_another_seed_gives_other_images(dataset, tmp_path):
    other = tmp_path / "other"
    generate_dataset(other, 6, 3, 4, seed=12, progress=False)
    ours, theirs = digest(dataset), digest(other)
    images = [name for name in ours if name.endswith(".png")]
    assert sum(ours[name] == theirs[name] for name in images) == 0


def test_a_sample_depends_only_on_seed_split_and_index():
    first = make_sample(sample_rng(3, "val", 5))
    second = make_sample(sample_rng(3, "val", 5))
    assert first.image.tobytes() == second.image.tobytes()
    assert (first.question, first.answer, first.shapes) == (second.question, second.answer, second.shapes)
    assert make_sample(sample_rng(3, "test", 5)).image.tobytes() != first.image.tobytes()


def test_splits_are_disjoint_and_complete(dataset):
    manifest = read_manifest(dataset)
    assert manifest["complete"] and manifest["splits"] == {"train": 6, "val": 3, "test": 4}
    ids, images = [], []
    for split in SPLITS:
        rows = records(dataset, split)
        assert len(rows) == manifest["splits"][split]
        ids += [row["question_id"] for row in rows]
        images += [digest(dataset)[row["image"]] for row in rows]
    assert len(set(ids)) == len(ids)
    assert len(set(images)) == len(images)


def test_the_eval_reader_reads_every_split_with_boxes(dataset):
    for split in SPLITS:
        samples = jsonl.read(dataset, split)
        rows = records(dataset, split)
        for sample, row in zip(samples, rows):
            assert sample.box == tuple(float(v) for v in row["box"])
            assert sample.answers == tuple(row["answers"])
            # `sdrpn label` sends "text"; the eval harness builds the same prompt from "question".
            assert sample.prompt == row["text"]
            with Image.open(sample.image) as image:
                assert list(image.size) == row["image_size"]


def test_rerun_is_a_no_op_and_other_contents_are_refused(dataset, tmp_path):
    before = digest(dataset)
    assert generate_dataset(dataset, 6, 3, 4, seed=11, progress=False)["complete"]
    assert digest(dataset) == before
    with pytest.raises(UserError, match="another synthetic data set"):
        generate_dataset(dataset, 6, 3, 4, seed=99, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate_dataset(tmp_path, 1, 1, 1, progress=False)
    with pytest.raises(UserError, match="non-negative"):
        generate_dataset(tmp_path / "new", -1, 1, 1, progress=False)


def test_an_interrupted_run_is_completed(dataset, tmp_path):
    partial = tmp_path / "partial"
    generate_dataset(partial, 6, 3, 4, seed=11, progress=False)
    manifest = read_manifest(partial)
    (partial / "dataset.json").write_text(json.dumps({**manifest, "complete": False}))
    (partial / "test.jsonl").unlink()
    (partial / "images" / "test" / "000002.png").unlink()
    generate_dataset(partial, 6, 3, 4, seed=11, progress=False)
    assert digest(partial) == digest(dataset)


# ------------------------------------------------------------------------------------------------
# Content
# ------------------------------------------------------------------------------------------------


def pixels_of(image: Image.Image, color) -> np.ndarray:
    return np.all(np.asarray(image) == np.array(color, dtype=np.uint8), axis=-1)


@pytest.mark.parametrize("sample", SAMPLES[:15] + COARSE[:5], ids=lambda s: s.question)
def test_box_is_inside_the_image_and_holds_the_target(sample):
    width, height = sample.image.size
    x0, y0, x1, y1 = sample.target.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    colour = pixels_of(sample.image, COLORS[sample.target.color])
    inside = np.zeros_like(colour)
    inside[y0:y1, x0:x1] = True
    # The target fills much of its box; pixels of its colour elsewhere belong to a lookalike.
    assert colour[inside].mean() > 0.3
    others = np.zeros_like(colour)
    for shape in sample.shapes[1:]:
        if shape.color == sample.target.color:
            ox0, oy0, ox1, oy1 = shape.box
            others[oy0:oy1, ox0:ox1] = True
    assert not (colour & ~inside & ~others).any()
    # The digits sit inside the box and are drawn.
    tx0, ty0, tx1, ty1 = sample.target.text_box
    assert x0 <= tx0 < tx1 <= x1 and y0 <= ty0 < ty1 <= y1
    assert not colour[ty0:ty1, tx0:tx1].all()


def test_question_answer_and_vocabulary():
    words = set(vocabulary())
    for sample in SAMPLES:
        assert sample.answer == sample.target.number and len(sample.answer) == 2 and sample.answer.isdigit()
        assert sample.target.color in sample.question and sample.target.kind in sample.question
        looks = [(shape.color, shape.kind) for shape in sample.shapes]
        assert len(set(looks)) == len(looks)  # the question names exactly one shape
        tokens = sample.question.lower().replace("?", " ?").replace(".", " .").split()
        assert set(tokens) <= words


def test_images_vary_in_what_the_issue_asks():
    sizes = [sample.image.size for sample in SAMPLES]
    ratios = {round(max(w, h) / min(w, h), 1) for w, h in sizes}
    assert len(ratios) >= 4
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert len({len(sample.shapes) for sample in SAMPLES}) >= 4
    assert len({sample.target.box[2] - sample.target.box[0] for sample in SAMPLES}) >= 10
    corners = {sample.image.getpixel((0, 0)) for sample in SAMPLES}
    assert len(corners) >= 30
    assert any(sample.shapes[1].color == sample.target.color for sample in SAMPLES if len(sample.shapes) > 1)


def test_coarse_images_are_drawn_at_each_splits_rate(dataset):
    config = SyntheticConfig()
    for split, rate in zip(SPLITS, config.coarse_rates):
        coarse = [split_sample(0, split, index, config).coarse for index in range(200)]
        assert abs(sum(coarse) / len(coarse) - rate) < 0.1
    assert not any(split_sample(0, "test", index).coarse for index in range(200))
    subsets = {row["subset"] for split in SPLITS for row in records(dataset, split)}
    assert subsets <= {"fine", "coarse"} and {row["subset"] for row in records(dataset, "test")} == {"fine"}


def test_config_rejects_shapes_too_small_for_the_digits():
    with pytest.raises(ValueError, match="cannot hold"):
        SyntheticConfig(shape_size=(30, 60))
    with pytest.raises(ValueError, match="cannot hold"):
        SyntheticConfig(coarse_shape_size=(100, 160))
    with pytest.raises(ValueError, match="coarse_rates"):
        SyntheticConfig(coarse_rates=(0.5, 0.5))
    with pytest.raises(ValueError, match="shapes_per_image"):
        SyntheticConfig(shapes_per_image=(0, 3))


# ------------------------------------------------------------------------------------------------
# The detail is unreadable at the model's resolution, the region is not
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def geometry() -> ImageGeometry:
    return ImageGeometry.from_processor(build_processor(), (TinyLlavaSpec().image_size,) * 2)


def test_every_shape_is_inside_the_processors_view(geometry):
    for sample in SAMPLES:
        view = geometry.transform(sample.image.size)
        for shape in sample.shapes:
            x0, y0, x1, y1 = view.source_to_view(shape.box)
            assert x0 >= 0 and y0 >= 0 and x1 <= geometry.input_size[1] and y1 <= geometry.input_size[0]


def test_the_number_is_a_few_pixels_at_the_base_resolution_and_readable_in_a_crop(geometry):
    cell = geometry.input_size[0] / TinyLlavaSpec().grid[0]
    for sample in SAMPLES:
        view = geometry.transform(sample.image.size)
        x0, y0, x1, y1 = view.source_to_view(sample.target.box)
        tx0, ty0, tx1, ty1 = view.source_to_view(sample.target.text_box)
        # 7 font rows in at most 4 pixels: under 0.6 pixel per font pixel, below what can be resolved.
        assert ty1 - ty0 <= 4.0, "the digits must be unreadable in the base view"
        assert min(x1 - x0, y1 - y0) >= 0.8 * cell, "the shape must cover about a token or more"
        # A RoI of 3x3 cells around the shape (what the RPN's small-component rule makes of it)
        # magnifies the digits to a readable height.
        crop_side = 3 * cell
        assert (ty1 - ty0) * geometry.input_size[0] / crop_side >= 6.0
    for sample in COARSE:  # readable without a second view
        tx0, ty0, tx1, ty1 = geometry.transform(sample.image.size).source_to_view(sample.target.text_box)
        assert ty1 - ty0 >= 6.0


def test_the_base_view_blurs_the_digits_into_a_blob(geometry):
    """Two different numbers in the same shape look alike at the base resolution and differ
    clearly in a crop of the shape."""
    processor = build_processor()
    sample = SAMPLES[0]
    box = sample.target.box

    def with_number(number: str) -> Image.Image:
        from sdrpn.data import synthetic

        image = sample.image.copy()
        x0, y0, x1, y1 = sample.target.text_box
        image.paste(COLORS[sample.target.color], (x0, y0, x1, y1))
        ink = synthetic._digits_mask(number, SyntheticConfig().digit_scale)
        image.paste(synthetic._ink_color(COLORS[sample.target.color]), (x0, y0, x0 + ink.width, y0 + ink.height), ink)
        return image

    first, second = with_number("18"), with_number("70")
    side = max(box[2] - box[0], box[3] - box[1])
    square = (box[0], box[1], box[0] + side, box[1] + side)

    def views(image):
        base = processor.image_processor(image, return_tensors="np")["pixel_values"][0]
        crop = processor.image_processor(image.crop(square), return_tensors="np")["pixel_values"][0]
        return base, crop

    (base_a, crop_a), (base_b, crop_b) = views(first), views(second)
    base_change = np.abs(base_a - base_b).sum()
    crop_change = np.abs(crop_a - crop_b).sum()
    assert crop_change > 10 * base_change
