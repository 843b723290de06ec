"""benchmarks/bench_e2e.py on the CPU: its RoI configurations give the upscaling they name, its
argument check refuses what would measure something else, and a tiny run measures the engine both
ways (sync-free and trimmed) side by side."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sdrpn.roi import MODE_BOX, MODE_MASK, MODE_NONE, RoIOptions, propose


def load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


bench = load_bench()
GRID = (24, 24)


def proposal_of(spec: str):
    options = RoIOptions()
    logits = bench.roi_config(spec, GRID).logits(1, GRID, options.threshold, "cpu")
    return propose(logits, GRID, options)


@pytest.mark.parametrize("spec, mode, cells", [("box:0.25", MODE_BOX, 144), ("masked:0.3", MODE_MASK, 162),
                                               ("masked:0.4", MODE_MASK, 242), ("none", MODE_NONE, 0)])
def test_a_forced_roi_gives_the_upscaling_it_names(spec, mode, cells):
    proposal = proposal_of(spec)
    assert int(proposal.mode[0]) == mode
    assert int(proposal.cells.sum()) == cells


def test_rpn_leaves_the_maps_to_the_rpn():
    assert bench.roi_config("rpn", GRID).logits(2, GRID, 0.15, "cpu") is None


@pytest.mark.parametrize("spec, reason", [("box:1.0", "would be no RoI"), ("masked:0.5", "touch"),
                                          ("masked:0", "(0, 1]"), ("box:big", "a number"), ("blob", "unknown RoI"),
                                          ("none:0.5", "unknown RoI")])
def test_a_roi_that_would_measure_something_else_is_refused(spec, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace("]", r"\]")):
        bench.roi_config(spec, GRID)


def test_the_plan_measures_each_roi_method_per_configuration_and_mode():
    configs = [bench.roi_config(spec, GRID) for spec in ("box:0.25", "none")]
    rows = bench.plan(["baseline", "sdrpn", "sdrpn-reference", "vicrop"], ["sync-free", "trimmed"], configs)
    assert [(row.config.name if row.config else "-", row.label) for row in rows] == [
        ("-", "baseline"), ("-", "vicrop"),
        ("box:0.25", "sdrpn/sync-free"), ("box:0.25", "sdrpn/trimmed"), ("box:0.25", "sdrpn-reference"),
        ("none", "sdrpn/sync-free"), ("none", "sdrpn/trimmed"), ("none", "sdrpn-reference"),
    ]


def test_the_default_forces_a_roi():
    args = bench.parse_args(["--check-args"])
    assert [config.boxes for config in args.rois] == [bench.centred_square(0.25, GRID)]


def test_an_rpn_config_without_roi_tokens_is_called_out():
    record = {"configs": {"rpn": {"boxes": None, "roi_tokens": 0.0}, "none": {"boxes": [], "roi_tokens": 0.0},
                          "box:0.25": {"boxes": [[6, 6, 18, 18]], "roi_tokens": 144.0}}}
    assert bench.roi_less_configs(record) == ["rpn"]


@pytest.mark.parametrize("load, busy", [(0.4, False), (1.5, True)])
def test_a_busy_machine_is_warned_about(monkeypatch, capsys, load, busy):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert bench.print_load("before the run") == f"load average {load:.1f} on 2 cores"
    captured = capsys.readouterr()
    assert captured.out == f"before the run: load average {load:.1f} on 2 cores\n"
    assert ("other processes are using the CPU" in captured.err) == busy


def test_check_args_validates_and_stops(capsys):
    arguments = ["--arch", "llava-1.5-7b", "--random-weights", "--device", "cuda", "--dtype", "bfloat16",
                 "--batch", "8", "--rois", "box:0.25,masked:0.3,none", "--methods", "sdrpn", "--check-args"]
    assert bench.main(arguments) == 0
    plan = capsys.readouterr().out
    assert "arguments valid" in plan and plan.count("sdrpn/trimmed") == 3 and "baseline" in plan
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--modes", "sync-free,fast", "--check-args"])
    assert stopped.value.code == 2


def test_a_tiny_run_measures_both_engine_modes_against_the_same_baseline(tmp_path):
    out = tmp_path / "e2e.json"
    assert bench.main(["--arch", "tiny", "--device", "cpu", "--batch", "2", "--new-tokens", "2",
                       "--rois", "masked:0.3,none", "--methods", "baseline,sdrpn,sdrpn-reference",
                       "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["baseline_vs_generate_equal"] and list(record["methods"]) == ["baseline"]
    assert record["load_before"].startswith("load average") and record["load_after"].startswith("load average")
    masked, none = record["configs"]["masked:0.3"], record["configs"]["none"]
    assert (masked["roi_tokens"], none["roi_tokens"]) == (162, 0)
    for config in (masked, none):
        assert list(config["methods"]) == ["sdrpn/sync-free", "sdrpn/trimmed", "sdrpn-reference"]
        assert set(config["throughput_vs_reference"]) == {"sdrpn/sync-free", "sdrpn/trimmed"}
        assert all(config["equivalence"].values())
        for values in config["methods"].values():
            assert values["of_floor"] == pytest.approx(values["ratio_vs_baseline"] / values["ideal_ratio"])
