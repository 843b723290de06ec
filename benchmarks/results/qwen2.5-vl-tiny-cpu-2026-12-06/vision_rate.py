"""FLOP rate of the tiny Qwen2.5-VL's vision tower against its language model, on one CPU thread:
``python vision_rate.py BATCH`` from the repository root (prints ms, GFLOP and GFLOP/s of each)."""

import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_e2e  # noqa: E402

torch.set_num_threads(1)
batch = int(sys.argv[1])
bench = bench_e2e.Bench(bench_e2e.ARCHS["qwen2.5-vl-tiny"], batch, torch.device("cpu"), torch.float32, "sdpa")
model, text = bench.model, bench.model.config.text_config
vision_input = {name: bench.inputs[name] for name in ("pixel_values", "image_grid_thw")}
length = bench.inputs["input_ids"].shape[1]
embeds = torch.randn(batch, length, text.hidden_size)
positions = torch.arange(length)[None, None].expand(3, batch, length)


def seconds(function, repeats=3):
    function()
    start = time.process_time()
    for _ in range(repeats):
        function()
    return (time.process_time() - start) / repeats


with torch.no_grad():
    parts = {
        "vision": (seconds(lambda: model.model.get_image_features(**vision_input)),
                   batch * bench.family.vision_flops(model.config, bench.grid)),
        "llm": (seconds(lambda: model.model.language_model(inputs_embeds=embeds, position_ids=positions)),
                batch * bench_e2e.llm_flops(text, length, 0, text.num_hidden_layers)),
    }
for name, (time_s, flops) in parts.items():
    print(f"{name:<7}{time_s * 1e3:8.0f} ms {flops / 1e9:8.2f} GFLOP {flops / time_s / 1e9:8.1f} GFLOP/s")
