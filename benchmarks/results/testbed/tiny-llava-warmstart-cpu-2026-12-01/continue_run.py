"""The exploratory continuation recorded in NOTES.md, as it was run (from the repository root,
after `sdrpn testbed train-model --data /tmp/tb2/data --out /tmp/tb2/m1 --seed 0`):
`python continue_run.py 1250`. Not part of the package: its result is a lead for the recipe."""
import sys, math, time, numpy as np, torch
from sdrpn.testbed.tiny_model import load_tiny_llava
from sdrpn.testbed.batches import QuestionSet, make_batch, batch_indices, VIEW_MODES
from sdrpn.testbed.train_model import answer_logits, loss_and_correct, evaluate
from sdrpn.models import adapter_for
torch.set_num_threads(2)
steps = int(sys.argv[1]); data = "/tmp/tb2/data"
model, proc = load_tiny_llava("/tmp/tb2/m1")
model.set_attn_implementation("eager"); model.train()
model.model.vision_tower.requires_grad_(False)
ad = adapter_for(model, proc)
train = QuestionSet(data, "train", proc); val = QuestionSet(data, "val", proc, limit=256)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), weight_decay=0.05)
t0 = time.time(); run = []
for step in range(steps):
    rng = np.random.default_rng([7, step])
    idx = batch_indices(step, 16, len(train), 7)
    coarse = [i for i in idx if train[i].subset == "coarse"]; fine = [i for i in idx if train[i].subset != "coarse"]
    mode = VIEW_MODES[rng.choice(3, p=(0.3, 0.5, 0.2))]
    loss = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ids, m in ((coarse, "single"), (fine, mode)):
            if ids:
                b = make_batch(train, ids, m, proc, ad.geometry, ad.image_grid, rng, 1)
                loss = loss + loss_and_correct(*answer_logits(model, ad, b))[0] * len(ids) / len(idx)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    run.append(loss.item())
    if (step + 1) % 250 == 0:
        acc = evaluate(model, ad, proc, val, 32)
        print(step + 1, round(float(np.mean(run)), 3), {k: round(v, 3) for k, v in acc.items()}, round(time.time() - t0), flush=True); run = []
model.set_attn_implementation("sdpa")
model.to(torch.float16).save_pretrained("/tmp/tb2/m2"); proc.save_pretrained("/tmp/tb2/m2")
