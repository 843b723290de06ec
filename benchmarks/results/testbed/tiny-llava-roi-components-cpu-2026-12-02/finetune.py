"""Experiment: the shipped tiny model + N steps of answer loss + w * grounding loss (refinement batches).

Usage: python finetune.py STEPS WEIGHT OUT_DIR DATA_DIR, with the patch of
../tiny-llava-grounding-loss-cpu-2026-12-01/grounding-loss.patch applied (sdrpn.testbed.grounding_loss).
"""
import sys, time, json, numpy as np, torch
from transformers import LlavaForConditionalGeneration, AutoProcessor
from sdrpn.models import adapter_for
from sdrpn.testbed.batches import VIEW_MODES, QuestionSet, batch_indices, make_batch
from sdrpn.testbed.grounding_loss import grounding_loss, tap_attention
from sdrpn.testbed.train_model import answer_logits, loss_and_correct, evaluate, _view_groups
from sdrpn.testbed.shipped import SHIPPED_MODEL
torch.set_num_threads(2)
steps, weight, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
data = sys.argv[4]
model = LlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).train()
processor = AutoProcessor.from_pretrained(SHIPPED_MODEL)
model.set_attn_implementation("eager")
adapter = adapter_for(model, processor)
train = QuestionSet(data, "train", processor); val = QuestionSet(data, "val", processor, limit=256)
model.model.vision_tower.requires_grad_(False)
trained = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW([{"params": [p for p in trained if p.ndim >= 2], "weight_decay": 0.05},
                         {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}], lr=5e-4, betas=(0.9, 0.98))
t0 = time.time(); run = [0.0, 0.0, 0]
for step in range(steps):
    rng = np.random.default_rng([7, 2, step])
    mode = VIEW_MODES[rng.choice(3, p=(0.3, 0.5, 0.2))]
    indices = batch_indices(step + 4250, 16, len(train), 0)
    loss = 0.0
    for part, part_mode in _view_groups(train, indices, mode, coarse_single_view=True):
        batch = make_batch(train, part, part_mode, processor, adapter.geometry, adapter.image_grid, rng, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16), tap_attention(model, 3) as tap:
            a, _ = loss_and_correct(*answer_logits(model, adapter, batch))
            g = grounding_loss(tap.weights, batch, (0, 1), adapter.geometry, adapter.image_grid)
        loss = loss + (a + weight * g) * len(part) / len(indices)
        run[0] += a.item() * len(part); run[1] += g.item() * len(part); run[2] += len(part)
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(trained, 1.0); opt.step()
    if (step + 1) % 125 == 0:
        print(f"step {step+1}: answer {run[0]/run[2]:.3f} grounding {run[1]/run[2]:.3f} {time.time()-t0:.0f}s", flush=True); run = [0.0, 0.0, 0]
acc = evaluate(model, adapter, processor, val, 16)
print("val", acc, flush=True)
model.set_attn_implementation("sdpa")
model.to(torch.float16).save_pretrained(out); processor.save_pretrained(out)
json.dump({"steps": steps, "weight": weight, "val": acc, "seconds": time.time() - t0}, open(f"{out}/finetune.json", "w"))
