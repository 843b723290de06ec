"""Per-head localisation of the answer rows on validation questions: share of image attention in the
ground-truth box, that share over the uniform one, and how often the peak cell lies in the box.

Usage: python head_localisation.py MODEL DATA fine|coarse N
"""
import sys, torch
from transformers import LlavaForConditionalGeneration, AutoProcessor
from sdrpn.models import adapter_for
from sdrpn.testbed.batches import QuestionSet, make_batch, box_cells
from sdrpn.testbed.train_model import answer_logits
torch.set_num_threads(2)
path, data, subset, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(path)
model.set_attn_implementation("eager")
adapter = adapter_for(model, processor)
val = QuestionSet(data, "val", processor)
idx = [i for i, q in enumerate(val.questions) if q.subset == subset][:n]
layers = model.model.language_model.layers
taps = {}
hooks = [l.self_attn.register_forward_hook(lambda m, a, o, i=i: taps.__setitem__(i, o[1])) for i, l in enumerate(layers)]
rows, cols = adapter.image_grid; T = rows * cols
stats = {}
for s in range(0, len(idx), 16):
    part = idx[s:s + 16]
    batch = make_batch(val, part, "single", processor, adapter.geometry, adapter.image_grid)
    with torch.no_grad():
        answer_logits(model, adapter, batch)
    for r, q in enumerate(batch.questions):
        st = q.prefix.shape[0]; fa = st + T + q.suffix.shape[0]
        x0, y0, x1, y1 = box_cells(q.box, q.image_size, adapter.geometry, adapter.image_grid)
        inside = torch.zeros(rows, cols, dtype=torch.bool); inside[y0:y1, x0:x1] = True; inside = inside.flatten()
        for L, w in taps.items():
            a = w[r, :, fa:fa + q.answer.shape[0] - 1, st:st + T].float().mean(1)  # heads, T
            share = a[:, inside].sum(-1) / a.sum(-1)
            ratio = share / (inside.float().mean())
            hit = inside[a.argmax(-1)].float()
            for h in range(a.shape[0]):
                e = stats.setdefault((L, h), [0.0, 0.0, 0.0, 0]); e[0] += share[h].item(); e[1] += ratio[h].item(); e[2] += hit[h].item(); e[3] += 1
rank = sorted(stats.items(), key=lambda kv: -kv[1][2])
print(f"{len(idx)} {subset} val questions; head share ratio argmax-in-box")
for (L, h), (sh, ra, hi, c) in rank[:10]:
    print(f"{L}:{h}  {sh/c:.3f}  {ra/c:.1f}x  {hi/c:.1%}")
