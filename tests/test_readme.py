"""The README's Python example runs as written, on the shipped tiny model on the CPU."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from PIL import Image, ImageDraw

from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN

README = Path(__file__).resolve().parents[1] / "README.md"


def example_code() -> str:
    section = README.read_text(encoding="utf-8").split("## In your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def substitute(code: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert code.count(old) == 1, f"the README example no longer holds {old!r}"
        code = code.replace(old, new)
    return code


def test_the_python_example_runs(tmp_path):
    image = Image.new("RGB", (300, 200), (235, 235, 225))
    ImageDraw.Draw(image).rectangle([180, 40, 220, 80], fill=(220, 30, 30))
    image.save(tmp_path / "square.png")
    code = substitute(example_code(), {
        '"ckpt/llava-1.5-7b-hf", "rpn"': f'{str(SHIPPED_MODEL)!r}, {str(SHIPPED_RPN)!r}',
        'dtype=torch.float16).to("cuda")': 'dtype=torch.float32).to("cpu")',
        '"data/synthetic/images/test/000000.png"': repr(str(tmp_path / "square.png")),
    })
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    assert len(printed.getvalue().splitlines()) == 4
    output, roi, answer = namespace["output"], namespace["roi"], namespace["answer"]
    assert len(answer) == 1 and isinstance(answer[0], str)
    # stage 1 alone proposes what generate zoomed into, and the tokens count that RoI
    assert roi.counts.tolist() == output.roi.counts.tolist()
    base = namespace["engine"].adapter.image_length
    assert (output.visual_tokens > base).tolist() == (roi.mode > 0).tolist()
    assert namespace["strict"].options.max_regions == 1
