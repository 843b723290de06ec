"""Why questions get no RoI at a threshold: no cell above it, or only components the area rules drop
(one cell). The shipped model and RPN on the first 500 test questions of DATA (argv[1])."""
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from sdrpn import SDRPN
from sdrpn.testbed.shipped import SHIPPED_MODEL, SHIPPED_RPN
torch.set_num_threads(1)
DATA = sys.argv[1]
model = LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(SHIPPED_MODEL)
rows = [json.loads(l) for l in open(DATA + "/test.jsonl")][:500]
for t in (0.1, 0.15, 0.2):
    engine = SDRPN(model, SHIPPED_RPN, processor, threshold=t)
    stats = {"empty": 0, "only_dropped": 0, "roi": 0, "mask_cells": []}
    for start in range(0, len(rows), 50):
        batch = rows[start:start + 50]
        images = [Image.open(DATA + "/" + r["image"]).convert("RGB") for r in batch]
        prompts = [engine.prompt(r["text"]) for r in batch]
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
        roi = engine.predict_roi(**inputs)
        for i in range(len(batch)):
            cells = int(roi.mask[i].sum())
            if int(roi.counts[i]) > 0: stats["roi"] += 1
            elif cells == 0: stats["empty"] += 1
            else: stats["only_dropped"] += 1
            stats["mask_cells"].append(cells)
    cells = stats.pop("mask_cells")
    print(t, stats, "mean mask cells", sum(cells) / len(cells))
