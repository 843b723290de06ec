"""benchmarks/gpu_suite.sh's own logic, without a GPU: what a device run brings back (few files,
a summary line per step), how it keeps within its time budget, and that every step's command
line gets through its argument parsing on an interpreter like the GPU machine's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
ALL_STEPS = re.search(r'^ALL_STEPS="([^"]+)"', SUITE.read_text(), re.MULTILINE).group(1).split()
RUN_LIMIT_S = 600  # a device call's limit; the machine's start-up is counted outside it


def run_suite(out: Path, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})


def summary_lines(out: Path) -> dict[str, str]:
    """Step name -> its summary line."""
    return {line.split()[0]: line for line in (out / "summary.txt").read_text().splitlines()}


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_a_step_is_logged_summarised_and_packed(tmp_path):
    result = run_suite(tmp_path, SUITE_STEPS="environment")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTES.md", "logs.tar.gz", "summary.txt"]
    (line,) = (tmp_path / "summary.txt").read_text().splitlines()
    assert line.startswith("environment") and "rc=0" in line
    with tarfile.open(tmp_path / "logs.tar.gz") as logs:
        assert "./environment.log" in logs.getnames()


def test_the_default_budget_ends_the_suite_well_inside_a_device_call(tmp_path):
    # A step still running when its time is up is cut, gets 5 s to die, and the summary and the
    # last tar follow: all of it must end 40 s before the device call's limit.
    result = run_suite(tmp_path, SUITE_STEPS="environment")
    left = int(re.search(r"== environment \((\d+)s left\)", result.stdout).group(1))
    kill_grace, closing = 5, 10
    assert left + kill_grace + closing <= RUN_LIMIT_S - 40


def test_the_notes_list_every_gpu_target(tmp_path):
    run_suite(tmp_path, SUITE_STEPS="environment")
    notes = (tmp_path / "NOTES.md").read_text()
    assert "@DEVICE@" not in notes and "@DATE@" not in notes
    for target in ("0.85x the baseline", "FLOP floor", "sdrpn-reference", "`speedup_vs_reference`",
                   "labelling >= 3x", "training step"):
        assert target in notes


def test_steps_past_the_budget_are_skipped_and_fail_the_run(tmp_path):
    result = run_suite(tmp_path, SUITE_STEPS="environment validate", SUITE_BUDGET_S="0")
    assert result.returncode == 1
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["environment", "rc=skipped"], ["validate", "rc=skipped"]]


def test_a_step_running_past_the_budget_is_cut(tmp_path):
    # validate needs a GPU here; a stand-in python that sleeps shows the cut instead.
    sleeper = executable(tmp_path / "python", "#!/bin/sh\nsleep 30\n")
    result = run_suite(tmp_path / "out", SUITE_STEPS="validate", SUITE_BUDGET_S="3", MIN_STEP_S="1", TAIL_S="0",
                       PYTHON=str(sleeper))
    assert result.returncode == 1
    (line,) = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert line.split()[:2] == ["validate", "rc=cut"]


def test_an_unknown_step_stops_before_anything_runs(tmp_path):
    result = run_suite(tmp_path, SUITE_STEPS="environment e2e_7b_b2")
    assert result.returncode == 2 and "unknown step 'e2e_7b_b2'" in result.stderr
    assert not list(tmp_path.iterdir())  # no summary, no logs


# --- a dry run on a stand-in for the GPU machine --------------------------------------------------

NVIDIA_SMI = """#!/bin/sh
case "$*" in
*--query-gpu=name*) echo "NVIDIA H100 80GB HBM3" ;;
*) echo "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0 |"
   echo "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:00:05.0 Off |   0 |" ;;
esac
"""
NVCC = """#!/bin/sh
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release 13.0, V13.0.88"
"""


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory) -> dict[str, str]:
    """The environment of a suite run on a stand-in for the GPU machine: nvidia-smi and nvcc
    answer, and python has the packages that machine has but not those it lacks (pytest-xdist,
    hypothesis, matplotlib), nor an installed sdrpn: it sees site-packages without their .pth hooks,
    so sdrpn can only come from the checkout. The stand-in's torch is a CPU build, which cannot
    describe a CUDA extension: setup.py is told to build the CPU kernels only."""
    root = tmp_path_factory.mktemp("gpu_machine")
    bin_dir, site = root / "bin", root / "site-packages"
    bin_dir.mkdir()
    site.mkdir()
    executable(bin_dir / "nvidia-smi", NVIDIA_SMI)
    executable(bin_dir / "nvcc", NVCC)
    hidden = ("xdist", "pytest_xdist", "hypothesis", "_hypothesis", "matplotlib", "mpl_toolkits", "sdrpn",
              "__editable__")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(hidden) and entry.suffix != ".pth":
            (site / entry.name).symlink_to(entry)
    python = executable(bin_dir / "python", f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" '
                                            f'exec {sys.executable} -S "$@"\n')
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python), "SDRPN_CPU_ONLY": "1"}


def test_the_stand_in_lacks_what_the_gpu_machine_lacks(gpu_machine, tmp_path):
    for module in ("xdist", "hypothesis", "matplotlib", "sdrpn"):
        result = subprocess.run([gpu_machine["PYTHON"], "-c", f"import {module}"], cwd=tmp_path, env=gpu_machine,
                                capture_output=True, text=True)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_a_dry_run_gets_every_step_past_its_argument_parsing(gpu_machine, tmp_path):
    result = run_suite(tmp_path, timeout=600, SUITE_DRY_RUN="1", **gpu_machine)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lines = summary_lines(tmp_path)
    assert list(lines) == ALL_STEPS
    for line in lines.values():
        assert line.split()[1] in ("rc=0", "rc=absent"), line  # ctest is absent without cmake
    assert len(list(tmp_path.iterdir())) <= 10
    with tarfile.open(tmp_path / "logs.tar.gz") as logs:
        log = {name: logs.extractfile(f"./{name}.log").read().decode() for name in lines if name != "ctest"}
    for step in ("build", "validate", "bench_kernels", "bench_distill_7b", "bench_distill_tiny"):
        assert "command line parsed:" in log[step], log[step]
    assert "tests collected" in log["tests"] and " -n " not in lines["tests"]  # serial without xdist
    for step in ("e2e_7b_b1", "e2e_7b_b8", "e2e_qwen7b_b1", "e2e_qwen7b_b8", "e2e_qwen3_4b_b8"):
        assert "arguments valid:" in log[step] and "masked:0.3" in log[step]
    qwen = {"e2e_qwen7b_b1": "qwen2.5-vl-7b", "e2e_qwen7b_b8": "qwen2.5-vl-7b", "e2e_qwen3_4b_b8": "qwen3-vl-4b"}
    for step, arch in qwen.items():  # Qwen's own view, the trimmed mode only, one JSON for all of them
        assert f"{arch} on cuda (bfloat16)" in log[step] and "540-token view" in log[step]
        assert "sdrpn/trimmed" in log[step] and "sdrpn/sync-free" not in log[step]
        assert f"--json {tmp_path}/e2e_qwen.json --json-key {step}" in lines[step]
    assert "sdrpn-reference" in log["e2e_qwen7b_b1"] and "sdrpn-reference" not in log["e2e_qwen7b_b8"]
    assert "sdrpn-reference" not in log["e2e_qwen3_4b_b8"]
    for step in ("e2e_qwen7b_b8", "e2e_qwen3_4b_b8"):
        assert "--batch 8" in lines[step] and "--random-weights" in lines[step]
    # summary.txt, NOTES.md, logs.tar.gz and the JSONs the steps write (the Qwen steps share one)
    written = {re.search(r"--json (\S+)", line).group(1) for line in lines.values() if "--json " in line}
    assert 3 + len(written) <= 10


def test_the_qwen_steps_follow_the_llava_ones():
    qwen = ["e2e_qwen7b_b1", "e2e_qwen7b_b8", "e2e_qwen3_4b_b8"]
    start = ALL_STEPS.index("e2e_7b_b8") + 1
    assert ALL_STEPS[start:start + len(qwen)] == qwen


def checked_as_run(dry_command: str) -> str:
    """A dry run's command, less what it adds to check the real one."""
    command = re.sub(r"\S*/stop_after_parsing\.py ", "", dry_command)
    command = command.replace("SDRPN_REQUIRE_EXTENSION=0", "SDRPN_REQUIRE_EXTENSION=1")
    return re.sub(r" (--check-args|--collect-only)$", "", command)


def test_a_dry_run_checks_the_command_lines_a_real_run_runs(gpu_machine, tmp_path):
    # The real run's python runs nothing (and has no xdist either); the summary records each command.
    recorder = executable(tmp_path / "python", '#!/bin/sh\n[ "$1" = -c ] && exit 1\nexit 0\n')
    steps = " ".join(step for step in ALL_STEPS if step != "ctest")  # ctest's commands differ: no python
    real = run_suite(tmp_path / "real", SUITE_STEPS=steps, **{**gpu_machine, "PYTHON": str(recorder)})
    dry = run_suite(tmp_path / "dry", timeout=600, SUITE_STEPS=steps, SUITE_DRY_RUN="1", **gpu_machine)
    assert real.returncode == 0 and dry.returncode == 0, real.stdout[-2000:] + dry.stdout[-2000:]

    def commands(out: Path, python: str) -> dict[str, str]:
        return {step: line.split(maxsplit=3)[3].replace(str(out), "OUT").replace(python, "PYTHON")
                for step, line in summary_lines(out).items()}

    run = commands(tmp_path / "real", str(recorder))
    checked = {step: checked_as_run(command)
               for step, command in commands(tmp_path / "dry", gpu_machine["PYTHON"]).items()}
    assert checked == run
