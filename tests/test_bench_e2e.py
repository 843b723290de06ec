"""benchmarks/bench_e2e.py on the CPU: its RoI configurations give the upscaling they name, its
argument check refuses what would measure something else, a tiny LLaVA run measures the engine both
ways (sync-free and trimmed) side by side, and tiny Qwen2.5-VL and Qwen3-VL runs (trimmed only) write
the same JSON fields, with their fast path equal to the reference; the Qwen FLOP models count what
the towers and decoders compute."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

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


def test_runs_given_a_key_share_one_json_file(tmp_path, capsys):
    path = tmp_path / "e2e_qwen.json"
    bench.write_json(str(path), {"batch": 1}, "e2e_qwen7b_b1")
    bench.write_json(str(path), {"batch": 8}, "e2e_qwen3_4b_b8")
    assert json.loads(path.read_text()) == {"e2e_qwen7b_b1": {"batch": 1}, "e2e_qwen3_4b_b8": {"batch": 8}}
    bench.write_json(str(path), {"batch": 2})  # without a key the file is the run
    assert json.loads(path.read_text()) == {"batch": 2}
    with pytest.raises(SystemExit):
        bench.parse_args(["--json-key", "b1", "--check-args"])
    assert "--json-key needs --json" in capsys.readouterr().err


def run_main(arguments: list[str]) -> int:
    """``bench.main``, leaving torch's thread count as it was (the runs use one thread: on a shared
    2-core machine, two threads that wait on each other run many times slower)."""
    threads = torch.get_num_threads()
    try:
        return bench.main([*arguments, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llava_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "e2e.json"
    assert run_main(["--arch", "tiny", "--device", "cpu", "--batch", "2", "--new-tokens", "2",
                     "--rois", "masked:0.3,none", "--methods", "baseline,sdrpn,sdrpn-reference",
                     "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_tiny_run_measures_both_engine_modes_against_the_same_baseline(llava_record):
    record = llava_record
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


# --- Qwen2.5-VL -------------------------------------------------------------------------------------

QWEN_GRID = (20, 27)  # a 1000 x 750 image at 576 * 28 * 28 pixels
QWEN_OPTIONS = RoIOptions(strategy="masked", threshold=0.25, edge_sink_above=768)  # the authors' Qwen rule


def qwen_proposal(spec: str, grid=QWEN_GRID):
    logits = bench.roi_config(spec, grid, whole_mask=True).logits(1, grid, QWEN_OPTIONS.threshold, "cpu")
    return propose(logits, grid, QWEN_OPTIONS)


@pytest.mark.parametrize("name, depth", [("qwen2.5-vl-7b", (16, 3, 28, 32)), ("qwen3-vl-4b", (21, 3, 36, 24))])
def test_the_qwen_defaults_are_its_realistic_view_and_the_trimmed_mode(name, depth):
    # Qwen3-VL's 32-pixel cells at the same 576-token budget give Qwen2.5-VL's 20 x 27 view.
    args = bench.parse_args(["--arch", name, "--random-weights", "--check-args"])
    assert args.grid == QWEN_GRID and args.view == bench.View((1000, 750), 576)
    assert args.modes == ["trimmed"] and args.methods == ["baseline", "sdrpn", "sdrpn-reference"]
    arch = bench.ARCHS[name]
    assert (arch.start_layer, arch.num_blocks, arch.text["num_hidden_layers"], arch.vision["depth"]) == depth


def test_the_qwen3_4b_is_qwen3_vl_4b_instruct():
    # Its config.json: 36 layers of 2560 (32 heads of 128, 8 KV heads), a 24-block ViT of 1024 with 16 heads,
    # 16-pixel patches merged 2 x 2, deepstack after blocks 5, 11, 17; the RPN past the deepstack layers.
    arch = bench.ARCHS["qwen3-vl-4b"]
    text = {key: arch.text[key] for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "intermediate_size", "vocab_size")}
    assert text == {"hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "intermediate_size": 9728, "vocab_size": 151936}
    vision = arch.vision
    assert (vision["hidden_size"], vision["num_heads"], vision["patch_size"], vision["spatial_merge_size"],
            vision["deepstack_visual_indexes"], vision["out_hidden_size"]) == (1024, 16, 16, 2, [5, 11, 17], 2560)
    assert arch.start_layer >= len(vision["deepstack_visual_indexes"]) and arch.tokens == bench.QWEN_TOKENS


@pytest.mark.parametrize("spec, share", [("box:0.25", 140 / 540), ("box:0.6", 315 / 540), ("masked:0.3", 160 / 540),
                                         ("none", 0.0)])
def test_a_forced_qwen_roi_is_masked_upscaling_of_the_share_it_names(spec, share):
    proposal = qwen_proposal(spec)
    assert int(proposal.mode[0]) == (MODE_NONE if spec == "none" else MODE_MASK)
    assert int(proposal.cells.sum()) == round(share * 540)


def test_box_is_one_region_on_qwen_and_no_area_filter_applies():
    # LLaVA's filters drop a component above 225 cells; Qwen's rule keeps the whole mask.
    with pytest.raises(ValueError, match="would be no RoI"):
        bench.roi_config("box:0.6", QWEN_GRID)
    assert bench.roi_config("box:0.6", QWEN_GRID, whole_mask=True).boxes == ((3, 2, 24, 17),)


def qwen_error(capsys, *arguments) -> str:
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(["--arch", "qwen2.5-vl-tiny", *arguments, "--check-args"])
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--modes", "sync-free,trimmed"], "trimmed mode only (the processor sizes each RoI view by its crop"),
    (["--methods", "sdrpn,vicrop"], "--methods vicrop: measured on LLaVA only"),
    (["--source-size", "1000by750"], "is not WIDTHxHEIGHT"),
    (["--image-tokens", "2"], "at least 4"),
    (["--image-tokens", "16", "--source-size", "160x120", "--rois", "masked:0.3"], "touch"),
    (["--clock", "process"], "use it with --device cpu --threads 1"),
])
def test_qwen_arguments_that_cannot_run_are_refused_with_the_reason(capsys, arguments, message):
    assert message in qwen_error(capsys, *arguments)


def test_llava_refuses_a_pixel_budget_and_the_7b_needs_random_weights(capsys):
    for arguments, message in ((["--arch", "tiny", "--image-tokens", "64"], "LLaVA-1.5's view is fixed"),
                               (["--arch", "qwen2.5-vl-7b"], "needs --random-weights")):
        with pytest.raises(SystemExit):
            bench.parse_args([*arguments, "--check-args"])
        assert message in capsys.readouterr().err


def test_the_qwen_7b_plan_says_what_it_measures(capsys):
    assert bench.main(["--arch", "qwen2.5-vl-7b", "--random-weights", "--device", "cuda", "--dtype", "bfloat16",
                       "--batch", "8", "--rois", "box:0.25,masked:0.3,none", "--methods", "baseline,sdrpn",
                       "--check-args"]) == 0
    plan = capsys.readouterr().out
    assert "20 x 27 = 540-token view" in plan and "trimmed only" in plan
    assert plan.count("sdrpn/trimmed") == 3 and "sdrpn/sync-free" not in plan
    assert "one region under the masked rule" in plan


def tiny_qwen(name: str, view):
    """A tiny Qwen arch's model in eager attention (whose matmuls the FLOP counter sees) and one input."""
    arch = bench.ARCHS[name]
    family = bench.family_of(arch)
    model, processor = family.build_model(arch, view, "cpu", torch.float32, "eager")
    inputs, _ = family.build_inputs(model, processor, 1, view, "cpu")
    return family, model, inputs


@pytest.mark.parametrize("name", ["qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_the_qwen_vision_flops_are_what_the_tower_computes(name):
    # Qwen2.5-VL: windows cut at the edges of an 8 x 11 grid; Qwen3-VL: full attention, deepstack mergers.
    from torch.utils.flop_counter import FlopCounterMode

    view = bench.family_of(name).view((500, 380), 100)
    family, model, inputs = tiny_qwen(name, view)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    grid = family.image_grid(bench.ARCHS[name], view)
    assert grid == (8, 11)
    assert family.vision_flops(model.config, grid) == counter.get_total_flops()


def test_the_decoder_flops_use_the_configs_head_width():
    # Qwen3-VL's heads are wider than hidden / heads (4B: 32 x 128 against 2560; the tiny arch's too).
    from torch.utils.flop_counter import FlopCounterMode

    family, model, _ = tiny_qwen("qwen3-vl-tiny", bench.View((320, 240), 64))
    text = model.config.text_config
    assert text.num_attention_heads * text.head_dim > text.hidden_size
    token = torch.randn(1, 1, text.hidden_size)  # one token: its attention is a 1 x 1 product per head
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.language_model(inputs_embeds=token)
    # approx: transformers 5.17 builds the rotary tables by a (tiny) matmul, which the floor leaves out
    assert bench.llm_flops(text, 1, 0, text.num_hidden_layers) == pytest.approx(counter.get_total_flops(), rel=1e-4)


def test_the_floor_adds_the_question_rerun_and_the_roi_block():
    # One row without a RoI adds the T-1 blocks and the head only; with one, the RoI view, the new
    # tokens through 0..K-1 and the longer sequence through K..L-1.
    from types import SimpleNamespace

    arch = bench.ARCHS["qwen2.5-vl-7b"]
    text = SimpleNamespace(**{k: v for k, v in arch.text.items() if not k.startswith("rope")})
    config = SimpleNamespace(text_config=text)
    family = SimpleNamespace(vision_flops=lambda config, grid: 1000.0)
    shape = bench.PromptShape(prefix=556, question=20, image_tokens=540, image_grid=QWEN_GRID)
    blocks = bench.llm_flops(text, 576, 0, 2) + bench.rpn_head_flops(text, 540)
    assert bench.sdrpn_extra_flops(family, config, arch, shape, 0, None, 16, 2) == blocks
    with_roi = bench.sdrpn_extra_flops(family, config, arch, shape, 100, (24, 24), 1, 2)
    expected = (blocks + 1000.0 + bench.llm_flops(text, 122, 556, 16) + bench.llm_flops(text, 678, 0, 12)
                - bench.llm_flops(text, 576, 0, 12))
    assert with_roi == pytest.approx(expected)


@pytest.fixture(scope="module", params=["qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def qwen_record(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen") / "e2e.json"
    assert run_main(["--arch", request.param, "--device", "cpu", "--batch", "2", "--new-tokens", "2",
                     "--image-tokens", "64", "--source-size", "320x240", "--rois", "box:0.25,masked:0.3,none",
                     "--methods", "baseline,sdrpn,sdrpn-reference", "--repeats", "1", "--warmup", "0",
                     "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_tiny_qwen_run_writes_llavas_fields_and_its_fast_path_equals_the_reference(qwen_record, llava_record):
    # Both families: a 320 x 240 image at 64 tokens is a 6 x 9 view (28- and 32-pixel cells alike).
    record = qwen_record
    assert set(record) == set(llava_record)
    for name in ("configs", "methods"):
        assert set(next(iter(record[name].values()))) == set(next(iter(llava_record[name].values())))
    row_fields = set(llava_record["methods"]["baseline"])
    assert all(set(values) == row_fields for config in record["configs"].values()
               for values in config["methods"].values())
    assert record["family"] == bench.ARCHS[record["arch"]].family
    assert (record["modes"], record["modes_available"]) == (["trimmed"], ["trimmed"])
    assert record["image_grid"] == [6, 9] and record["image_tokens"] == 54
    assert record["baseline_vs_generate_equal"] and list(record["methods"]) == ["baseline"]
    for config in record["configs"].values():
        assert list(config["methods"]) == ["sdrpn/trimmed", "sdrpn-reference"]
        assert set(config["equivalence"]) == {"sdrpn/trimmed_vs_reference_tokens_equal",
                                              "sdrpn/trimmed_vs_reference_logits_close"}
        assert all(config["equivalence"].values())
        for values in config["methods"].values():
            assert values["of_floor"] == pytest.approx(values["ratio_vs_baseline"] / values["ideal_ratio"])
            assert values["extra_flops"] > 0 and 0 < values["ideal_ratio"] < 1
    box, masked, none = (record["configs"][name] for name in ("box:0.25", "masked:0.3", "none"))
    assert (box["upscaling"], masked["upscaling"], none["upscaling"]) == ("masked", "masked", "none")
    # One region: its crop is zoomed to the budget and every token kept. Two corners: the crop is
    # the whole image, re-encoded at the original's grid, about the share of its tokens kept.
    assert box["roi_tokens"] == box["roi_view_tokens"] > 54
    assert masked["roi_view_tokens"] == 54 and masked["roi_tokens"] == 12
    assert (none["roi_tokens"], none["roi_view_tokens"]) == (0, 0)
    assert none["methods"]["sdrpn/trimmed"]["ideal_ratio"] > masked["methods"]["sdrpn/trimmed"]["ideal_ratio"]
