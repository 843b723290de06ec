"""Readers for the SD-RPN authors' released artefacts (YuHengsss/SD-RPN, commit 00876ac, LLaVA-1.5
and Qwen2.5-VL).

* :mod:`.checkpoint`: their checkpoints holding the RPN (config and selected tensors), one layout per release;
* :mod:`.rpn_conversion`: that RPN as an :class:`sdrpn.rpn.RPN` of the model it was trained on
  (``sdrpn convert``);
* :mod:`.safe_pickle`: a pickle reader that admits only plain data and numpy arrays;
* :mod:`.label_import`: their pseudo-label pickle as label shards (``sdrpn import-labels``).

Nothing here imports or runs the authors' code; their file and line are cited where a rule comes
from.
"""

# The views their RPN and labels were made from: the conversation template of their training
# (``--version v1``) and evaluation (``conv_template="vicuna_v1"``), and the pad-to-square base view
# (``image_aspect_ratio pad``, ``expand2square`` in ``LLaVA/llava/mm_utils.py:154-166``).
AUTHORS_TEMPLATE = "vicuna_v1"
AUTHORS_GEOMETRY = "pad"
