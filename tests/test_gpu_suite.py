"""benchmarks/gpu_suite.sh's own logic, without a GPU: what a device run brings back (few files,
a summary line per step) and how it keeps within its time budget."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def run_suite(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})


def test_a_step_is_logged_summarised_and_packed(tmp_path):
    result = run_suite(tmp_path, SUITE_STEPS="environment")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.txt"]
    (line,) = (tmp_path / "summary.txt").read_text().splitlines()
    assert line.startswith("environment") and "rc=0" in line
    with tarfile.open(tmp_path / "logs.tar.gz") as logs:
        assert "./environment.log" in logs.getnames()


def test_steps_past_the_budget_are_skipped_and_fail_the_run(tmp_path):
    result = run_suite(tmp_path, SUITE_STEPS="environment validate", SUITE_BUDGET_S="0")
    assert result.returncode == 1
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["environment", "rc=skipped"], ["validate", "rc=skipped"]]


def test_a_step_running_past_the_budget_is_cut(tmp_path):
    # validate needs a GPU here; a stand-in python that sleeps shows the cut instead.
    sleeper = tmp_path / "python"
    sleeper.write_text("#!/bin/sh\nsleep 30\n")
    sleeper.chmod(0o755)
    result = run_suite(tmp_path / "out", SUITE_STEPS="validate", SUITE_BUDGET_S="3", MIN_STEP_S="1",
                       PYTHON=str(sleeper))
    assert result.returncode == 1
    (line,) = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert line.split()[:2] == ["validate", "rc=cut"]


def test_an_unknown_step_stops_before_anything_runs(tmp_path):
    result = run_suite(tmp_path, SUITE_STEPS="environment e2e_7b_b2")
    assert result.returncode == 2 and "unknown step 'e2e_7b_b2'" in result.stderr
    assert not list(tmp_path.iterdir())  # no summary, no logs
