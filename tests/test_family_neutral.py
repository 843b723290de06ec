"""A model family lives in ``sdrpn/models/`` and nowhere else: the engine, the RPN, the distillation
and the commands never branch on it."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdrpn"
BRANCH = re.compile(r"\.family\s*(==|!=)|\.family\s+(not\s+)?in\s*[(\[{]|model_type\s*(==|!=)\s*[\"']"
                    r"|model_type\s+(not\s+)?in\s*[(\[{]|isinstance\([^)]*Adapter\)")
# Checks that refuse a mismatch rather than branch: the authors' checkpoint must be for the model's family.
ALLOWED = {("authors/rpn_conversion.py", "if adapter.family != layout.family:")}


def test_no_code_outside_the_adapters_branches_on_the_family():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("models/"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BRANCH.search(line) and (relative, line.strip()) not in ALLOWED:
                found.append(f"sdrpn/{relative}:{number}: {line.strip()}")
    assert not found, "family branches outside sdrpn/models/:\n" + "\n".join(found)


def test_the_check_catches_a_branch(tmp_path):
    assert BRANCH.search('    return x if adapter.family == "llava" else None')
    assert BRANCH.search("if config.model_type in ('qwen2_5_vl',):")
    assert not BRANCH.search("family = adapter.family")
