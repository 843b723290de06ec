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
    ImageDraw.Draw(image).ellipse([180, 40, 220, 80], fill=(0, 190, 200))  # the question's cyan circle
    image.save(tmp_path / "circle.png")
    code = substitute(example_code(), {
        '"ckpt/llava-1.5-7b-hf", "rpn"': f'{str(SHIPPED_MODEL)!r}, {str(SHIPPED_RPN)!r}',
        'dtype=torch.float16).to("cuda")': 'dtype=torch.float32).to("cpu")',
        '"data/synthetic/images/test/000000.png"': repr(str(tmp_path / "circle.png")),
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


def tiny_journey() -> list[str]:
    """The commands of the journey on the shipped tiny model, continuation lines joined."""
    section = README.read_text(encoding="utf-8").split("### The journey on the shipped tiny model", 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in script.replace("\\\n", " ").splitlines() if line.strip()]


# The tiny journey scaled down to run in a test: fewer questions, and a batch the few labels fill.
SMALLER = {"--train 2000 --val 100 --test 200": "--train 64 --val 0 --test 8", "--max-samples 64": "--max-samples 16",
           "--max-samples 1000": "--max-samples 64", "--batch-size 32": "--batch-size 8", "--limit 100": "--limit 8"}


def test_the_tiny_journey_runs_as_written(tmp_path, monkeypatch):
    import json
    import shlex

    from sdrpn.cli import main

    commands = tiny_journey()
    assert commands[0] == "M=sdrpn/testbed/assets/tiny-llava"
    assert Path(README.parent, "sdrpn/testbed/assets/tiny-llava") == SHIPPED_MODEL
    monkeypatch.chdir(tmp_path)  # every output path of the journey is relative
    for command in commands[1:]:
        for old, new in SMALLER.items():
            command = command.replace(old, new)
        argv = shlex.split(command.replace("$M", str(SHIPPED_MODEL)))
        assert argv[0] == "sdrpn"
        assert main(argv[1:] + ["--no-progress"] * (argv[1] in ("heads", "label", "train", "eval")
                                                     and "--plot" not in argv)) == 0, command

    first = json.loads((tmp_path / "data/synthetic/test.jsonl").read_text().splitlines()[0])
    # Both journeys ask about test/000000 what its question file asks.
    assert first["image"] == "images/test/000000.png"
    assert set(re.findall(r'--question "([^"]+)"', README.read_text(encoding="utf-8"))) == {first["question"]}
    results = json.loads((tmp_path / "results-tiny.json").read_text())
    assert set(results["methods"]) == {"baseline", "sdrpn", "res-scaling", "vicrop"}
    assert (tmp_path / "roi-tiny.png").is_file() and (tmp_path / "tradeoff-tiny.png").is_file()
