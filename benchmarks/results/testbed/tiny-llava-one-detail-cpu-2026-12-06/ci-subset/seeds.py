"""The CI testbed test's procedure (tests/test_testbed_run.py) on seeds 1-4, to set its margins."""
import json, os, sys, time
from pathlib import Path
import torch
from sdrpn.data.synthetic import DESIGNS, generate_dataset
from sdrpn.testbed.loop import LoopOptions, run_loop
from sdrpn.distill.heads import HeadSelection

torch.set_num_threads(2)
model = Path("/work/tb/model-s0")
pairs = json.loads(Path("/work/tb/final/s0/rpn/config.json").read_text())["labels"]["heads"]
heads = str(HeadSelection(tuple(tuple(p) for p in pairs)))
out = {}
for seed in map(int, sys.argv[1:]):
    root = Path(f"/work/tb/ci/seed{seed}")
    began = time.perf_counter()
    generate_dataset(root / "data", 640, 0, 300, seed=seed, config=DESIGNS["one-detail"], progress=False)
    options = LoopOptions(label_samples=640, test_samples=300, heads=heads, fractions=(), ablation=False,
                          rpn_batch_size=32, rpn_epochs=int(os.environ.get("EPOCHS", 4)))
    summary = run_loop(model, root / "data", root / "work", options, progress=False)
    out[seed] = {"labels": summary["labels"], "methods": summary["methods"],
                 "seconds": time.perf_counter() - began}
    Path("/work/tb/ci/seeds.json").write_text(json.dumps(out, indent=1))
    m = summary["methods"]
    print(seed, {k: (round(100 * v["accuracy"], 1), v.get("random_zoom_bound")) for k, v in m.items()},
          round(time.perf_counter() - began), flush=True)
