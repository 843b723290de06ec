"""Per (layer, head): answer-to-image attention mass in the target's cells over uniform, and the
old and new sdrpn heads scores. python attention_in_box.py MODEL DATA {fine,coarse} N"""
import json, sys, torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, AutoProcessor
from sdrpn.testbed.tiny_model import prompt_for
from sdrpn.testbed.batches import box_cells
from sdrpn.models.geometry import ImageGeometry
torch.set_num_threads(2)
mdir, ddir, subset, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = LlavaForConditionalGeneration.from_pretrained(mdir, attn_implementation="eager", dtype=torch.float32).eval()
proc = AutoProcessor.from_pretrained(mdir)
geo = ImageGeometry.from_processor(proc, (96, 96))
recs = [json.loads(l) for l in open(f"{ddir}/val.jsonl")]
recs = [r for r in recs if r["subset"] == subset][:n]
maps, inboxes = [], []
for r in recs:
    img = Image.open(f"{ddir}/{r['image']}").convert("RGB")
    text = prompt_for(proc, r["text"]) + " " + r["answers"][0]
    enc = proc(images=img, text=text, return_tensors="pt")
    ids = enc["input_ids"][0]
    img_pos = (ids == model.config.image_token_index).nonzero()[:, 0]
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    x0, y0, x1, y1 = box_cells(r["box"], img.size, geo, (12, 12))
    inbox = torch.zeros(12, 12, dtype=torch.bool); inbox[y0:y1, x0:x1] = True
    q = [len(ids) - 2, len(ids) - 1]
    a = torch.stack([att[0][:, q][:, :, img_pos] for att in out.attentions]).mean(2)  # L,H,144
    maps.append(a); inboxes.append(inbox.flatten())
A = torch.stack(maps)  # S,L,H,N
share = A.sum(-1)
P = A / A.sum(-1, keepdim=True)
ent = -(P * P.clamp_min(1e-12).log()).sum(-1)
logn = torch.log(torch.tensor(144.))
conc = 1 - ent / logn
Pm = P.mean(0)
js = (-(Pm * Pm.clamp_min(1e-12).log()).sum(-1) - ent.mean(0)) / logn
IB = torch.stack(inboxes).float()  # S,N
ratio = (P * IB[:, None, None]).sum(-1) / IB.mean(-1)[:, None, None]
amax = P.argmax(-1)
hit = torch.gather(IB[:, None, None].expand(-1, 8, 4, -1), 3, amax[..., None])[..., 0]
print("l h share conc old-score js new-score ratio argmax-hit")
for l in range(8):
    for h in range(4):
        print(l, h, "%.2f %.3f %.3f %.3f %.3f | %.2f %.2f" % (share[:, l, h].mean(), conc[:, l, h].mean(), (share*conc)[:, l, h].mean(), js[l, h], share[:, l, h].mean()*js[l, h], ratio[:, l, h].mean(), hit[:, l, h].mean()))
