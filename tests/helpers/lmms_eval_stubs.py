"""The plugin module of ``--model sdrpn`` (:mod:`sdrpn.integrations.lmms_eval`) for tests, imported
against lmms-eval where it is installed and against stand-ins for the two parts of it the plugin
imports (the ``lmms`` base class and ``Collator``, doing what lmms-eval 0.7.3's do) where it is not.

    from helpers.lmms_eval_stubs import Request, plugin   # plugin: a fixture

    def test_something(plugin):
        model = plugin.SDRPNLmms(pretrained=...)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from collections import defaultdict
from dataclasses import dataclass

import pytest

__all__ = ["HAS_LMMS_EVAL", "plugin", "Request"]

HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None


class StubLmms:
    """lmms_eval.api.model.lmms: one process, and the task datasets the evaluator fills in."""

    is_simple = True

    def __init__(self):
        self._rank, self._world_size, self.task_dict = 0, 1, {}


class StubCollator:
    """lmms_eval.utils.Collator(grouping=True): groups by generation options, sorts each group by
    ``sort_fn``, cuts batches of ``n`` and puts results back in the original order."""

    def __init__(self, arr, sort_fn, group_fn=lambda args: args[1], grouping=False):
        self.items, self.sort_fn, self.group_fn = list(enumerate(arr)), sort_fn, group_fn
        self.order = []

    def get_batched(self, n=1, batch_fn=None):
        groups = defaultdict(list)
        for index, args in self.items:
            groups[json.dumps(self.group_fn(args), sort_keys=True)].append((index, args))
        for group in groups.values():
            group = sorted(group, key=lambda item: self.sort_fn(item[1]))
            self.order.extend(index for index, _ in group)
            for start in range(0, len(group), n):
                yield [args for _, args in group[start:start + n]]

    def get_original(self, results):
        original = [None] * len(self.items)
        for index, result in zip(self.order, results):
            original[index] = result
        return original


@pytest.fixture
def plugin(monkeypatch):
    """The plugin module, imported against lmms-eval or its stand-ins."""
    if not HAS_LMMS_EVAL:
        stubs = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
                 "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
                 "lmms_eval.utils": types.ModuleType("lmms_eval.utils")}
        stubs["lmms_eval.api.model"].lmms = StubLmms
        stubs["lmms_eval.utils"].Collator = StubCollator
        for name, module in stubs.items():
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "sdrpn.integrations.lmms_eval", raising=False)
    module = importlib.import_module("sdrpn.integrations.lmms_eval")
    yield module
    sys.modules.pop("sdrpn.integrations.lmms_eval", None)


@dataclass
class Request:
    """What the plugin reads of lmms_eval.api.instance.Instance: ``args`` is ``(context, gen_kwargs,
    doc_to_visual, doc_id, task, split)``."""

    args: tuple
    task_name: str = "toy"
