"""Runs ../tiny-llava-roi-components-cpu-2026-12-02/head_localisation.py on one CPU thread (it asks
for two). Usage: python localisation_one_thread.py MODEL DATA fine|coarse N"""
import runpy
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
torch.set_num_threads = lambda count: None  # keep the one thread
script = Path(__file__).resolve().parent.parent / "tiny-llava-roi-components-cpu-2026-12-02" / "head_localisation.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
