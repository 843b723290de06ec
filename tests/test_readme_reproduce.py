"""The README's "Reproduce the paper" commands run as written: convert and import-labels on tiny
files in the authors' layouts, with only the paths substituted."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np

from sdrpn import RPN
from sdrpn.cli import main
from sdrpn.distill.shards import read_index

from helpers.authors_release import authors_record, write_authors_checkpoint, write_authors_pickle
from helpers.tiny_models import save_tiny_llava

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The section's shell commands, continuation lines joined."""
    section = README.read_text(encoding="utf-8").split("## Reproduce the paper", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in script.replace("\\\n", " ").splitlines() if line.strip()]


def substitute(command: str, changes: dict[str, str]) -> list[str]:
    """The command's arguments (without "sdrpn") with each path of ``changes`` replaced, in one pass."""
    pattern = "|".join(re.escape(old) for old in sorted(changes, key=len, reverse=True))
    return shlex.split(re.sub(pattern, lambda match: changes[match.group(0)], command))[1:]


def test_the_convert_and_import_commands_run_as_written(tmp_path):
    from transformers import LlavaForConditionalGeneration

    commands = readme_commands()
    assert commands[0] == "M=ckpt/llava-1.5-7b-hf"
    convert = next(c for c in commands if c.startswith("sdrpn convert"))
    imports = next(c for c in commands if c.startswith("sdrpn import-labels"))
    assert any(c.startswith("sdrpn train --model $M --labels labels-authors") for c in commands)
    assert any(c.startswith("sdrpn eval --model $M --rpn rpn-authors --benchmark textvqa") for c in commands)

    model_dir = save_tiny_llava(tmp_path / "ckpt" / "tiny-llava")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    checkpoint = tmp_path / "ckpt" / "llava-v1.5-7b-roi-K15T3-152k-v1bf16Mheads-twiginit-filled"
    write_authors_checkpoint(checkpoint, model, start_layer=2, num_blocks=3, layout="bin-shards")
    rng = np.random.default_rng(0)
    records = [authors_record(i, rng) for i in range(10)]
    data = tmp_path / "data"
    for record in records:
        (data / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        (data / record["image"]).write_bytes(b"")
    write_authors_pickle(data / "llava_v1_5_7b_pseudo_roi_release.pkl", records)

    paths = {"$M": str(model_dir), "ckpt/": f"{tmp_path}/ckpt/", "data/": f"{data}/",
             "--image-root data": f"--image-root {data}", "rpn-authors": str(tmp_path / "rpn-authors"),
             "labels-authors": str(tmp_path / "labels-authors")}
    assert main(substitute(convert, paths)) == 0
    assert main(substitute(imports, paths)) == 0

    rpn = RPN.from_pretrained(tmp_path / "rpn-authors", model)
    assert rpn.prompt_template.name == "vicuna_v1" and rpn.geometry == "pad" and rpn.threshold == 0.15
    assert [row["record"] for row in read_index(tmp_path / "labels-authors") if row["valid"]] == list(range(10))
    assert json.loads((tmp_path / "labels-authors" / "run.json").read_text())["image_root"] == str(data.resolve())
