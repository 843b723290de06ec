"""Linear probes of the target's colour and kind from the token at its centre: patch embeddings,
tower output, projector output. python colour_probe.py MODEL DATA"""
import json, sys, torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, AutoProcessor
from sdrpn.testbed.batches import box_cells
from sdrpn.models.geometry import ImageGeometry
from sdrpn.data.synthetic import COLORS, SHAPES
torch.set_num_threads(2); torch.manual_seed(0)
mdir, ddir = sys.argv[1], sys.argv[2]
model = LlavaForConditionalGeneration.from_pretrained(mdir, dtype=torch.float32).eval()
proc = AutoProcessor.from_pretrained(mdir)
geo = ImageGeometry.from_processor(proc, (96, 96))
cols = list(COLORS)
def feats(split, n, which):
    recs = [json.loads(l) for l in open(f"{ddir}/{split}.jsonl")][:n]
    X, Yc, Ys, Xp, Yp = [], [], [], [], []
    for r in recs:
        img = Image.open(f"{ddir}/{r['image']}").convert("RGB")
        pv = proc.image_processor(img, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
            f = hs[which][0, 1:] if which != "proj" else model.model.multi_modal_projector(hs[-1][0, 1:])
        x0, y0, x1, y1 = box_cells(r["box"], img.size, geo, (12, 12))
        # the cell at the box centre
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        X.append(f[cy * 12 + cx]); Yc.append(cols.index(r["target"]["color"])); Ys.append(SHAPES.index(r["target"]["shape"]))
    return torch.stack(X), torch.tensor(Yc), torch.tensor(Ys)
for which in [0, -1, "proj"]:
    Xt, Ct, St = feats("train", 1500, which); Xv, Cv, Sv = feats("val", 300, which)
    mu, sd = Xt.mean(0), Xt.std(0) + 1e-6
    Xt, Xv = (Xt - mu) / sd, (Xv - mu) / sd
    for name, Yt, Yv, k in (("colour", Ct, Cv, 8), ("kind", St, Sv, 3)):
        lin = torch.nn.Linear(Xt.shape[1], k); opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
        for _ in range(300):
            opt.zero_grad(); torch.nn.functional.cross_entropy(lin(Xt), Yt).backward(); opt.step()
        print(which, name, "val acc %.3f" % (lin(Xv).argmax(-1) == Yv).float().mean())
