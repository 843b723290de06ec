"""Saves the model of a `train-model` checkpoint (language-model stage) as a loadable directory,
to measure a run part-way. Usage: python checkpoint_model.py CHECKPOINT OUT"""
import sys

import torch

from sdrpn.testbed.tiny_model import TinyLlavaSpec, build_model, build_processor

state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
spec = TinyLlavaSpec(**state["identity"]["spec"])
model = build_model(spec)
model.load_state_dict(state["model"])
model.save_pretrained(sys.argv[2])
build_processor(spec).save_pretrained(sys.argv[2])
print(f"step {state['step']} -> {sys.argv[2]}")
