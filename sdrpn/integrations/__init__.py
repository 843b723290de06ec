"""Bridges from other evaluation harnesses to the SD-RPN engine.

lmms-eval (``pip install "sdrpn[lmms-eval]"``): ``--model sdrpn`` is registered through the entry
point group ``lmms_eval.models`` (:mod:`.lmms_eval_registration`) and implemented in
:mod:`.lmms_eval`; :mod:`.lmms_task` writes a task for a JSONL question file of ``sdrpn eval``.
"""
