"""As run for NOTES.md, at commit 9b0fcc3 (whose TrainModelOptions had coarse_single_view and a
4500-step default): the language-model stage from a fresh projector and LLaMA, with the vision
tower taken from a train-model checkpoint (the tower is frozen in that stage, so it is the
warm start's). python lm_stage_from_tower.py CHECKPOINT OUT STEPS [DATA]. The coarse-mixed run
added coarse_single_view=False to the options."""
import sys, torch
import sdrpn.testbed.train_model as tm
from sdrpn.testbed.tiny_model import build_model
torch.set_num_threads(2)
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)["model"]
prefix = "model.vision_tower."
tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
def with_tower(spec, seed=0):
    model = build_model(spec, seed=seed)
    model.model.vision_tower.load_state_dict(tower)
    return model
tm.build_model = with_tower
tm.train_model(sys.argv[4] if len(sys.argv) > 4 else "/tmp/tb2/data", sys.argv[2], tm.TrainModelOptions(vision_steps=0, steps=int(sys.argv[3])), progress=False)
