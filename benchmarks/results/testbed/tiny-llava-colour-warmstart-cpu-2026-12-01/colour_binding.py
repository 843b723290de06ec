"""Can the shipped tiny model learn to bind a colour word to the shape of that colour in the base
view? Continue training on 'What is the {colour} ?' -> kind (plus the recipe's batches), held-out
accuracy on val. python colour_binding.py MODEL DATA OUT STEPS SHARE (SHARE: of each batch's
questions turned into the binding question)."""
import sys, json, time, dataclasses, numpy as np, torch
from pathlib import Path
from sdrpn.testbed.tiny_model import load_tiny_llava, prompt_for
from sdrpn.testbed.batches import QuestionSet, make_batch, batch_indices, VIEW_MODES, _raw_records
from sdrpn.testbed.train_model import answer_logits, loss_and_correct, evaluate
from sdrpn.models import adapter_for
torch.set_num_threads(2)
src, data, out, steps, share = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
model, proc = load_tiny_llava(src)
model.set_attn_implementation("eager"); model.train()
model.model.vision_tower.requires_grad_(False)
ad = adapter_for(model, proc)
tok = proc.tokenizer
sets = {s: QuestionSet(data, s, proc) for s in ("train", "val")}
recs = {s: list(_raw_records(Path(data), s).values()) for s in ("train", "val")}
def bind(split, i):
    q = sets[split][i]; r = recs[split][i]
    text = f"What is the {r['target']['color']} ?\nAnswer the question using a single word or phrase."
    ids = tok(prompt_for(proc, text))["input_ids"]; s = ids.index(proc.image_token_id)
    assert tok.unk_token_id not in ids, text
    ans = tok(r["target"]["shape"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return dataclasses.replace(q, suffix=torch.tensor(ids[s + 1:]), answer=torch.tensor(ans))
class Mixed:
    def __init__(self, split): self.split, self.extra = split, {}
    def __len__(self): return len(sets[self.split])
    def __getitem__(self, i): return self.extra.get(i) or sets[self.split][i]
    def image(self, i): return sets[self.split].image(i)
train, val = Mixed("train"), Mixed("val")
val.extra = {i: bind("val", i) for i in range(256)}
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), weight_decay=0.05)
def bind_accuracy():
    model.eval(); c = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s0 in range(0, 256, 32):
            b = make_batch(val, list(range(s0, s0 + 32)), "single", proc, ad.geometry, ad.image_grid)
            c += int(loss_and_correct(*answer_logits(model, ad, b))[1].sum())
    model.train(); return c / 256
print("start bind(val) %.3f" % bind_accuracy(), flush=True)
t0 = time.time(); run = []
for step in range(steps):
    rng = np.random.default_rng([11, step])
    idx = batch_indices(step, 16, len(train), 11)
    w = [i for i in idx if rng.random() < share]
    rest = [i for i in idx if i not in w]
    train.extra = {i: bind("train", i) for i in w}
    coarse = [i for i in rest if sets["train"][i].subset == "coarse"]; fine = [i for i in rest if sets["train"][i].subset != "coarse"]
    mode = VIEW_MODES[rng.choice(3, p=(0.3, 0.5, 0.2))]
    loss = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ids, m in ((coarse + w, "single"), (fine, mode)):
            if ids:
                b = make_batch(train, ids, m, proc, ad.geometry, ad.image_grid, rng, 1)
                loss = loss + loss_and_correct(*answer_logits(model, ad, b))[0] * len(ids) / len(idx)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    run.append(loss.item())
    if (step + 1) % 200 == 0 or step + 1 == steps:
        acc = evaluate(model, ad, proc, QuestionSet(data, "val", proc, limit=256), 32)
        print(step + 1, round(float(np.mean(run)), 3), "bind(val) %.3f" % bind_accuracy(), {k: round(v, 3) for k, v in acc.items()}, round(time.time() - t0), flush=True); run = []
model.set_attn_implementation("sdpa")
model.to(torch.float16).save_pretrained(out); proc.save_pretrained(out)
