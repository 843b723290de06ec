"""Writes a data set of a SyntheticConfig given as JSON (the readability probe's variants).

Usage: python generate_variant.py OUT TRAIN VAL TEST SEED '{"digit_scale": 4, ...}'"""
import json
import sys
import time

from sdrpn.data.synthetic import SyntheticConfig, generate_dataset

out, train, val, test, seed = sys.argv[1], *map(int, sys.argv[2:6])
fields = {key: tuple(value) if isinstance(value, list) else value for key, value in json.loads(sys.argv[6]).items()}
began = time.time()
generate_dataset(out, train, val, test, seed=seed, config=SyntheticConfig(**fields), progress=False)
print(out, round(time.time() - began, 1), "s")
