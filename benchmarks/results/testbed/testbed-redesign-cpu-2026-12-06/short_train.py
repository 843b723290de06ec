"""A short, single-thread float32 run of `sdrpn testbed train-model`'s recipe for a design, with a
smaller warm start (batches of 16) and fewer steps: what a 20-minute experiment can afford.

Usage: python short_train.py DESIGN DATA OUT VISION_STEPS STEPS REFINE_STEPS
"""
import dataclasses
import sys

import torch

from sdrpn.testbed.train_model import DESIGN_RECIPES, train_model

torch.set_num_threads(1)
design, data, out = sys.argv[1:4]
vision_steps, steps, refine_steps = map(int, sys.argv[4:7])
options = dataclasses.replace(DESIGN_RECIPES[design], vision_steps=vision_steps, vision_batch_size=16, steps=steps,
                              refine_steps=refine_steps, warmup_steps=min(200, steps // 10), bf16=False,
                              eval_every=steps + refine_steps, eval_samples=128)
summary = train_model(data, out, options, progress=False)
print(summary["vision_history"], summary["history"], summary["train_seconds"])
