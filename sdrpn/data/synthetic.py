"""Synthetic fine-grained VQA: coloured shapes that hold small numbers.

Every image shows a few coloured shapes (squares, circles, triangles) on a background; each shape
holds a two-digit number drawn with PIL's built-in bitmap font. A question names one shape by its
colour and kind ("What number is inside the red square?") and the answer is that shape's number.

The split between what is easy and what is hard is the point of the data set. A shape is 67-96
source pixels across, so after the short side (512-640 pixels) is resized to a small vision input
(96 pixels for the testbed model) it still covers one or two tokens and its colour is plain to
see: the region is easy to find. Its number is 21 pixels tall (a 5x7 bitmap font at 3 pixels per
font pixel), which becomes 3-4 pixels at that resolution, about half a pixel per font pixel:
unreadable. A crop around the shape, resized to the same input, makes it readable
again. That is the situation SD-RPN is built for.

A model also has to learn *where* to look, which it only does from questions it can answer at its
base resolution (a real MLLM learns it from the mostly legible data it is trained on). So a share
of the train and validation images are *coarse*: larger shapes (128-168 pixels) with numbers drawn
twice as large, readable at the base resolution. Their records have ``"subset": "coarse"``,
the others ``"fine"``; the test split holds fine questions only.

That is the ``"classic"`` design, the default. :data:`DESIGNS` names the others: in
``"one-detail"`` only the named shape holds a number (the other shapes are blank), its colour is
unique, and the number is drawn at 4 pixels per font pixel (about 5 pixels tall at 96 pixels):
the answer has one place to look, shown by the question and by the image alike. The shipped
testbed model was trained on ``"one-detail"``.

Shapes are placed inside the central square of the image, the part that a processor which resizes
the short side and centre-crops (llava-hf) keeps; images have several aspect ratios, portrait and
landscape, so that the mapping between token grid and source pixels matters.

Everything is a function of ``(seed, split, index)`` only: the same arguments give the same pixels
and records on every machine (PIL's bitmap font needs no FreeType; PIL's drawing and nearest-
neighbour resizing are exact integer code).

Output layout of :func:`generate_dataset` (the generic JSONL format of :mod:`sdrpn.eval.datasets.jsonl`)::

    out/dataset.json                  what was generated: seed, split sizes, configuration
    out/{train,val,test}.jsonl        one question per line
    out/images/{split}/{index}.png
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from ..eval.datasets.base import SHORT_ANSWER

__all__ = [
    "COLORS",
    "DEFAULT_DESIGN",
    "DESIGNS",
    "design_of",
    "SHAPES",
    "QUESTION_TEMPLATES",
    "SPLITS",
    "Shape",
    "SyntheticConfig",
    "SyntheticSample",
    "generate_dataset",
    "make_sample",
    "manifest_config",
    "sample_rng",
    "split_sample",
    "vocabulary",
]

FORMAT_VERSION = 2
MANIFEST = "dataset.json"
SPLITS = ("train", "val", "test")

# Saturated colours: every one has a channel <= 60 and one >= 150, so none can be mistaken for a
# pale (all channels >= 170) or dark (all channels <= 70) background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 200),
    "pink": (240, 90, 190),
    "cyan": (20, 200, 220),
}
SHAPES = ("square", "circle", "triangle")
QUESTION_TEMPLATES = (
    "What number is inside the {color} {shape}?",
    "What number is written in the {color} {shape}?",
    "Which number is in the {color} {shape}?",
    "What is the number inside the {color} {shape}?",
    "Read the number in the {color} {shape}.",
)
BACKGROUNDS = ("solid", "gradient", "stripes", "checker", "noise")
NUMBERED = ("all", "target")


@dataclass(frozen=True)
class SyntheticConfig:
    """What the images look like. The defaults suit a vision input of about 96 pixels.

    Attributes:
        short_side: range of the image's short side in pixels (inclusive).
        aspect_ratios: long side / short side choices; each non-square image is portrait or
            landscape at random.
        shape_size: range of a shape's width and height in pixels (inclusive), fine images.
        shapes_per_image: range of the number of shapes, the target included (inclusive).
        lookalike_rate: probability that one distractor has the target's colour (and another
            kind), so that the question's shape word is needed and two regions compete.
        digit_scale: integer upscaling of the 5x7-pixel bitmap digits (nearest neighbour), fine images.
        coarse_shape_size, coarse_digit_scale: the same for coarse images.
        coarse_rates: share of coarse images in the train, val and test splits.
        min_gap: minimum number of pixels between two shapes.
        dark_background_rate: probability of a dark instead of a pale background.
        numbered: which shapes hold a number: ``"all"``, or ``"target"`` alone (the other shapes
            are blank, so the image itself shows where the detail is).
    """

    short_side: tuple[int, int] = (512, 640)
    aspect_ratios: tuple[float, ...] = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
    shape_size: tuple[int, int] = (67, 96)
    shapes_per_image: tuple[int, int] = (2, 7)
    lookalike_rate: float = 0.25
    digit_scale: int = 3
    coarse_shape_size: tuple[int, int] = (128, 168)
    coarse_digit_scale: int = 6
    coarse_rates: tuple[float, float, float] = (0.3, 0.3, 0.0)
    min_gap: int = 16
    dark_background_rate: float = 0.25
    numbered: str = "all"

    def __post_init__(self):
        if self.numbered not in NUMBERED:
            raise ValueError(f"numbered must be one of {NUMBERED}, got {self.numbered!r}")
        low, high = self.shapes_per_image
        if not 1 <= low <= high <= len(COLORS):
            raise ValueError(f"shapes_per_image must be within [1, {len(COLORS)}], got {self.shapes_per_image}")
        if min(self.aspect_ratios) < 1.0:
            raise ValueError(f"aspect_ratios are long side / short side (>= 1), got {self.aspect_ratios}")
        if len(self.coarse_rates) != len(SPLITS) or not all(0.0 <= rate <= 1.0 for rate in self.coarse_rates):
            raise ValueError(f"coarse_rates must be {len(SPLITS)} probabilities ({', '.join(SPLITS)}), "
                             f"got {self.coarse_rates}")
        for sizes, scale in ((self.shape_size, self.digit_scale), (self.coarse_shape_size, self.coarse_digit_scale)):
            if not 0 < sizes[0] <= sizes[1] <= self.short_side[0] // 2:
                raise ValueError(f"shape sizes {sizes} must be positive and at most half the short side")
            if scale < 1:
                raise ValueError(f"digit scales must be positive integers, got {scale}")
            # The number must fit in the smallest triangle (see _text_origin).
            text_w, text_h = _text_size(scale)
            if sizes[0] < text_w + text_h + 10:
                raise ValueError(f"shapes of {sizes[0]} pixels cannot hold a {text_w}x{text_h} number")

    def coarse_rate(self, split: str) -> float:
        return self.coarse_rates[SPLITS.index(split)]


@dataclass(frozen=True)
class Shape:
    """One shape of an image.

    Attributes:
        kind: one of :data:`SHAPES`.
        color: one of :data:`COLORS`.
        number: the two digits it holds ("" for a blank shape).
        box: its extent ``[x0, y0, x1, y1)`` in source pixels.
        text_box: the extent of the digits' ink ``[x0, y0, x1, y1)`` (None for a blank shape).
    """

    kind: str
    color: str
    number: str
    box: tuple[int, int, int, int]
    text_box: tuple[int, int, int, int] | None


@dataclass
class SyntheticSample:
    """An image, a question about one of its shapes (``target``) and the answer."""

    image: Image.Image
    question: str
    answer: str
    target: Shape
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    coarse: bool = False


def vocabulary() -> list[str]:
    """Every word and punctuation mark of the questions (lower case, in first-use order)."""
    text = " ".join([*QUESTION_TEMPLATES, SHORT_ANSWER, *COLORS, *SHAPES]).lower()
    for mark in "?.{}":
        text = text.replace(mark, f" {mark} ")
    words = [word for word in text.split() if word not in ("{", "}", "color", "shape")]
    return list(dict.fromkeys([*words, "?", "."]))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample: a function of ``(seed, split, index)`` only."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------

_FONT = ImageFont.load_default_imagefont()  # PIL's built-in bitmap font: no FreeType, exact pixels


def _digits_mask(number: str, scale: int) -> Image.Image:
    """The ink of ``number`` as an "L" mask cropped to the ink, upscaled ``scale`` times."""
    canvas = Image.new("L", _FONT.getbbox(number)[2:], 0)
    ImageDraw.Draw(canvas).text((0, 0), number, font=_FONT, fill=255)
    canvas = canvas.crop(canvas.getbbox())
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)


@functools.lru_cache(maxsize=None)
def _text_size(scale: int) -> tuple[int, int]:
    """(width, height) of the widest two-digit number's ink."""
    return max((_digits_mask(f"{n}", scale).size for n in range(10, 100)), key=lambda size: size[0] * size[1])


def _background(rng: np.random.Generator, size: tuple[int, int], dark: bool) -> Image.Image:
    width, height = size
    low, high = (15, 70) if dark else (170, 245)

    def tone():
        return tuple(int(v) for v in rng.integers(low, high + 1, size=3))

    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if kind == "solid":
        return Image.new("RGB", size, tone())
    if kind == "gradient":
        first, second = np.array(tone(), np.float32), np.array(tone(), np.float32)
        angle = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        pixels = first + (second - first) * t[..., None]
        return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    if kind in ("stripes", "checker"):
        period = int(rng.integers(12, 48))
        ys, xs = np.mgrid[0:height, 0:width]
        if kind == "stripes":
            on = ((xs if rng.integers(2) else ys) // period) % 2 == 1
        else:
            on = ((xs // period) + (ys // period)) % 2 == 1
        pixels = np.where(on[..., None], np.array(tone(), np.uint8), np.array(tone(), np.uint8))
        return Image.fromarray(pixels.astype(np.uint8), "RGB")
    # Smooth noise: a coarse random grid, bilinearly upscaled.
    cells = rng.integers(low, high + 1, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    return Image.fromarray(cells, "RGB").resize(size, Image.BILINEAR)


def _ink_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black digits on light shapes, white on dark ones."""
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _text_origin(kind: str, box, text_size) -> tuple[int, int]:
    """Top-left corner of the digits inside a shape: centred, or low in a triangle (apex up)."""
    x0, y0, x1, y1 = box
    text_w, text_h = text_size
    left = (x0 + x1 - text_w) // 2
    if kind == "triangle":
        # The triangle is as wide as the box at its base; 6 pixels above the base it is still
        # wide enough for the digits with 2 pixels to spare (checked in SyntheticConfig).
        return left, y1 - 6 - text_h
    return left, (y0 + y1 - text_h) // 2


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box, color) -> None:
    x0, y0, x1, y1 = box
    if kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)


def _choose_shapes(rng: np.random.Generator, config: SyntheticConfig) -> list[tuple[str, str]]:
    """(colour, kind) of each shape, the target first; no two shapes look the same."""
    count = int(rng.integers(config.shapes_per_image[0], config.shapes_per_image[1] + 1))
    colors = [str(c) for c in rng.permutation(list(COLORS))]
    chosen = [(color, SHAPES[rng.integers(len(SHAPES))]) for color in colors[:count]]
    if count > 1 and rng.random() < config.lookalike_rate:
        target_color, target_kind = chosen[0]
        other_kinds = [kind for kind in SHAPES if kind != target_kind]
        chosen[1] = (target_color, other_kinds[rng.integers(len(other_kinds))])
    return chosen


def _place(rng: np.random.Generator, sizes: list[int], area, gap: int) -> list[tuple[int, int, int, int] | None]:
    """Non-overlapping boxes of the given sizes inside ``area``; None where no room was found."""
    ax0, ay0, ax1, ay1 = area
    boxes: list[tuple[int, int, int, int] | None] = []
    placed: list[tuple[int, int, int, int]] = []
    for size in sizes:
        box = None
        for _ in range(200):
            x = int(rng.integers(ax0, ax1 - size + 1))
            y = int(rng.integers(ay0, ay1 - size + 1))
            candidate = (x, y, x + size, y + size)
            if all(candidate[0] >= b[2] + gap or b[0] >= candidate[2] + gap or
                   candidate[1] >= b[3] + gap or b[1] >= candidate[3] + gap for b in placed):
                box = candidate
                break
        boxes.append(box)
        if box is not None:
            placed.append(box)
    return boxes


# Named designs of the data set. "one-detail" is the one the shipped model was trained on. In
# "one-detail" only the named shape holds a number, so the answer's attention has one place to go
# (the image shows it as well as the question), its colour is unique, and the number is drawn a
# little larger: still unreadable at the base resolution, readable in a zoomed view.
DESIGNS: dict[str, SyntheticConfig] = {
    "classic": SyntheticConfig(),
    "one-detail": SyntheticConfig(numbered="target", shapes_per_image=(2, 5), lookalike_rate=0.0,
                                  digit_scale=4, shape_size=(88, 112)),
}
DEFAULT_DESIGN = "classic"


def make_sample(rng: np.random.Generator, config: SyntheticConfig | None = None, coarse: bool = False
                ) -> SyntheticSample:
    """Draws one image and a question about one of its shapes (a coarse image if ``coarse``)."""
    config = config or SyntheticConfig()
    shape_size, digit_scale = ((config.coarse_shape_size, config.coarse_digit_scale) if coarse
                               else (config.shape_size, config.digit_scale))
    short = int(rng.integers(config.short_side[0], config.short_side[1] + 1))
    long = int(round(short * config.aspect_ratios[rng.integers(len(config.aspect_ratios))]))
    size = (long, short) if rng.integers(2) else (short, long)
    width, height = size
    image = _background(rng, size, dark=rng.random() < config.dark_background_rate)
    draw = ImageDraw.Draw(image)

    # Inside the central square, which a short-side resize + centre crop keeps.
    margin = 8
    left, top = (width - short) // 2, (height - short) // 2
    area = (left + margin, top + margin, left + short - margin, top + short - margin)
    looks = _choose_shapes(rng, config)
    sizes = [int(rng.integers(shape_size[0], shape_size[1] + 1)) for _ in looks]
    boxes = _place(rng, sizes, area, config.min_gap)
    if boxes[0] is None:
        raise RuntimeError(f"no room for a {sizes[0]}-pixel shape in a {short}-pixel square")

    shapes = []
    for (color, kind), box in zip(looks, boxes):
        if box is None:
            continue
        number = str(int(rng.integers(10, 100)))  # drawn for every shape: each design keeps one rng stream
        _draw_shape(draw, kind, box, COLORS[color])
        if shapes and config.numbered == "target":
            shapes.append(Shape(kind=kind, color=color, number="", box=box, text_box=None))
            continue
        ink = _digits_mask(number, digit_scale)
        x, y = _text_origin(kind, box, ink.size)
        image.paste(_ink_color(COLORS[color]), (x, y, x + ink.width, y + ink.height), ink)
        shapes.append(Shape(kind=kind, color=color, number=number, box=box,
                            text_box=(x, y, x + ink.width, y + ink.height)))
    target = shapes[0]
    template = QUESTION_TEMPLATES[rng.integers(len(QUESTION_TEMPLATES))]
    question = template.format(color=target.color, shape=target.kind)
    return SyntheticSample(image=image, question=question, answer=target.number, target=target,
                           shapes=tuple(shapes), coarse=coarse)


def split_sample(seed: int, split: str, index: int, config: SyntheticConfig | None = None) -> SyntheticSample:
    """Sample ``index`` of ``split``: coarse with the split's coarse rate, then drawn."""
    config = config or SyntheticConfig()
    rng = sample_rng(seed, split, index)
    return make_sample(rng, config, coarse=bool(rng.random() < config.coarse_rate(split)))


# ------------------------------------------------------------------------------------------------
# Writing a data set
# ------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file next to ``path``, then renames it: never a torn file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _record(split: str, index: int, sample: SyntheticSample, image_path: str) -> dict:
    target = sample.target
    return {
        "question_id": f"{split}-{index:06d}",
        "image": image_path,
        "question": sample.question,
        # LLaVA's question files hold the prompt with its answer-format instruction in "text";
        # `sdrpn label` sends "text", the eval reader adds the instruction to "question" itself.
        "text": f"{sample.question}\n{SHORT_ANSWER}",
        "answers": [sample.answer],
        "box": list(target.box),
        "detail_box": list(target.text_box),
        # Every number in the image with its ink box: dense supervision for the testbed model's
        # vision warm start (sdrpn.testbed.vision_warmup).
        "details": [{"number": shape.number, "box": list(shape.text_box)} for shape in sample.shapes if shape.number],
        "target": {"color": target.color, "shape": target.kind},
        "subset": "coarse" if sample.coarse else "fine",
        "num_shapes": len(sample.shapes),
        "image_size": list(sample.image.size),
    }


def manifest_config(config: SyntheticConfig) -> dict:
    """The configuration as the manifest holds it. ``numbered`` is left out at "all", so data sets
    written before it existed keep their manifest (and the checkpoints trained on them resume)."""
    record = asdict(config)
    if record["numbered"] == "all":
        del record["numbered"]
    return record


def design_of(manifest: dict) -> str | None:
    """The name of the design a manifest's configuration is, None where no design names it. Manifests
    written before designs existed hold the classic configuration or none."""
    if "config" not in manifest:
        return DEFAULT_DESIGN
    # the configuration as a JSON file holds it (tuples read back as lists)
    return next((name for name, config in DESIGNS.items()
                 if json.loads(json.dumps(manifest_config(config))) == manifest["config"]), None)


def _manifest(seed: int, counts: dict[str, int], config: SyntheticConfig, complete: bool) -> dict:
    return {
        "generator": "sdrpn.data.synthetic",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "splits": counts,
        "config": manifest_config(config),
        "complete": complete,
    }


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a generated data set, or None where there is none."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def generate_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    progress: bool = True,
) -> dict:
    """Writes the train/val/test splits (one question per image) and returns the manifest.

    Idempotent and resumable: a directory that already holds the same data set (same seed, sizes
    and configuration) is left as it is, and an interrupted run with the same arguments is
    completed (images already written are kept; every file is written atomically).

    Raises:
        UserError: a split size is negative, or ``out_dir`` holds something else (another data set
            or unrelated files).
    """
    from tqdm.auto import tqdm

    config = config or SyntheticConfig()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise UserError(f"the number of {split} questions must be a non-negative integer, got {count!r}")
    out = Path(out_dir)
    wanted = json.loads(json.dumps(_manifest(seed, counts, config, complete=True)))  # as read back
    existing = read_manifest(out) if out.is_dir() else None
    if existing is not None:
        if {**existing, "complete": True} != wanted:
            raise UserError(f"{out} holds another synthetic data set (seed {existing.get('seed')}, splits "
                            f"{existing.get('splits')}); choose another directory or remove it")
        if existing["complete"]:
            return existing
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no {MANIFEST}; choose an empty or new directory")

    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / MANIFEST, json.dumps(_manifest(seed, counts, config, complete=False), indent=2).encode())
    with tqdm(total=sum(counts.values()), desc="generating", unit="image", disable=not progress) as bar:
        for split, count in counts.items():
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            lines = []
            for index in range(count):
                sample = split_sample(seed, split, index, config)
                relative = f"images/{split}/{index:06d}.png"
                if not (out / relative).is_file():
                    _atomic_write(out / relative, _png(sample.image))
                lines.append(json.dumps(_record(split, index, sample, relative)))
                bar.update()
            _atomic_write(out / f"{split}.jsonl", "".join(line + "\n" for line in lines).encode())
    _atomic_write(out / MANIFEST, json.dumps(wanted, indent=2).encode())
    return wanted
