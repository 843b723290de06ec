"""Can the tiny model's vision tower read a design's fine numbers at the base resolution?

Trains the testbed's CLIP tower (fresh, seed 0) with the vision warm start's per-token digit
classifier, labelling the glyphs of fine numbers in the base views too (the recipe ignores them
there), then reports held-out glyph-token accuracy on base views and on tight ground-truth RoI
views. Base accuracy near chance (about 10%) with high RoI accuracy means: unreadable at the base
resolution, readable zoomed.

Usage: python readability_probe.py DATA STEPS BATCH OUT.json   (DATA: `sdrpn testbed generate` output)
"""
import json
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from sdrpn.models import adapter_for
from sdrpn.testbed.batches import QuestionSet, batch_indices, make_batch
from sdrpn.testbed.tiny_model import TinyLlavaSpec, build_model, build_processor
from sdrpn.testbed.vision_warmup import BACKGROUND, TokenDigitHead, _features, _loss, token_targets

torch.set_num_threads(1)
data_dir, steps, batch_size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = TinyLlavaSpec()
processor = build_processor(spec)
model = build_model(spec, seed=0)
adapter = adapter_for(model, processor)
geometry, grid = adapter.geometry, adapter.image_grid
train = QuestionSet(data_dir, "train", processor)
val = QuestionSet(data_dir, "val", processor)


def targets_of(batch, data, indices):
    """(B, H*W) base-view targets, then (B, H*W) RoI-view targets, every glyph labelled."""
    view = geometry.input_size[1]
    base, roi = [], []
    for row, index in enumerate(indices):
        question = data[index]
        transform = geometry.transform(question.image_size)
        x0, y0, width, height = (float(v) for v in batch.roi_crops[row])
        base.append(token_targets(question.details, lambda x, y, t=transform: t.source_to_view((x, y, x, y))[:2],
                                  view, grid, True))
        roi.append(token_targets(question.details,
                                 lambda x, y, a=x0, b=y0, w=width, h=height: ((x - a) * view / w, (y - b) * view / h),
                                 view, grid, True))
    return torch.stack(base), torch.stack(roi)


torch.manual_seed(0)
head = TokenDigitHead(model.config.vision_config.hidden_size)
tower = model.model.vision_tower
parameters = [*tower.parameters(), *head.parameters()]
optimizer = torch.optim.AdamW(parameters, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.05)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
began = time.perf_counter()
for step in range(steps):
    rng = np.random.default_rng([0, 3, step])
    indices = batch_indices(step, batch_size, len(train), 1)
    batch = make_batch(train, indices, "box", processor, geometry, grid, rng, 1)
    base, roi = targets_of(batch, train, indices)
    logits = head(_features(model, torch.cat([batch.pixel_values, batch.roi_pixel_values])))
    loss = _loss(logits, torch.cat([base, roi]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()
    if (step + 1) % 50 == 0:
        print(f"step {step + 1} loss {loss.item():.3f} {time.perf_counter() - began:.0f}s", flush=True)


@torch.no_grad()
def accuracy():
    tower.eval()
    hits = {"base": [0, 0], "roi": [0, 0]}
    for start in range(0, len(val), 32):
        indices = list(range(start, min(start + 32, len(val))))
        batch = make_batch(val, indices, "box", processor, geometry, grid)
        for name, views, targets in zip(("base", "roi"), (batch.pixel_values, batch.roi_pixel_values),
                                        targets_of(batch, val, indices)):
            predicted = head(_features(model, views)).argmax(-1)
            glyph = targets > BACKGROUND
            hits[name][0] += int((predicted[glyph] == targets[glyph]).sum())
            hits[name][1] += int(glyph.sum())
    return {name: correct / max(total, 1) for name, (correct, total) in hits.items()}


result = {"data": data_dir, "steps": steps, "batch_size": batch_size, "glyph_accuracy": accuracy(), "seconds": round(time.perf_counter() - began)}
print(result)
json.dump(result, open(out, "w"), indent=2)
