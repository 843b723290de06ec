"""The authors' checkpoints with their RPN: config and tensors, read without their code.

Two releases of the SD-RPN authors (YuHengsss/SD-RPN, commit 00876ac) hold an RPN ("twig"), each
inside a full checkpoint of the model it was trained on; which one a directory holds is told by
``model_type`` in its ``config.json`` (:data:`LAYOUTS`):

* LLaVA-1.5 (``model_type`` ``llava_llama``, ``LlavaLlamaForCausalLM``; ``LLaVA/llava/llm_src/llama_src.py``
  ~1100-1125, ``llava_llama.py`` ~170-240). Their 13B release stops at layer K+T-1 and has no final
  norm or LM head (their ``migrate_weights.py`` fills those in); the RPN needs neither.
* Qwen2.5-VL 3B and 7B (``model_type`` ``qwen2_5_vl``, their own copy of transformers 4.51's
  ``Qwen2_5_VLForConditionalGeneration``; ``Qwen2.5-VL/qwen_src/qwen2_5_vl/modeling_qwen2_5_vl.py``
  1088-1125 builds the twig, 1237-1336 runs it). Their training saves the model with layers from K+T
  on pruned (:2500-2503, ``qwen-vl-finetune/qwenvl/train/train_qwen.py:55-67, 220``);
  ``merge_pruned_model.py`` fills them, the final norm and the LM head back in from the base model and
  saves it again with ``save_pretrained`` (the "-filled" release): sharded safetensors and
  ``model.safetensors.index.json``. The config is transformers 4.51's flat one (the language model's
  sizes at the top level, ``vision_config`` nested); their training adds the twig keys
  (``train_qwen.py:110-119``).

Both lay their tensors out the same way, under the names of the authors' model classes:

* ``config.json``: the language model's sizes, ``enable_twig``, ``twig_K`` (K), ``twig_T`` (T), and the
  variant switches ``roi_source``, ``roi_super_type``, ``roi_multi_head``, ``roi_loss``;
* the RPN's tensors ``model.twig_layers.{i}.*`` (T decoder layers, twig layer i initialised from layer
  K+i: ``llava_llama.py`` ~200-232, ``modeling_qwen2_5_vl.py:2483-2490``) and ``model.twig_norm.weight``
  (initialised from the final norm; LLaVA's head reads it, Qwen2.5-VL's does not);
* the base language model as ``model.embed_tokens.weight``, ``model.layers.{i}.*``, ``model.norm.weight``
  (Qwen2.5-VL: the vision tower as ``visual.*`` beside it, and ``lm_head.weight`` and the unused
  ``twig_head.weight``).

K is where the RPN branches off in both: layers 0..K-1 of the frozen model run first
(``modeling_qwen2_5_vl.py:1245``), the twig layers read their output. Their comments "the last frozen
layer" and "layers K+1 to K+T" (``modeling_qwen2_5_vl.py:1101-1105``) are stale: twig layer i is built
as and copied from layer K+i (:1106, 2485).

Weights are safetensors (``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
or PyTorch pickles (``pytorch_model.bin``, or shards listed in ``pytorch_model.bin.index.json``),
the latter read with ``torch.load(weights_only=True)`` only. Only the files holding the requested
tensors are opened.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..roi import THRESHOLDS
from ..rpn import DEFAULT_THRESHOLD
from . import AUTHORS_GEOMETRY, AUTHORS_TEMPLATE

__all__ = ["AuthorsCheckpoint", "CheckpointError", "Twig", "Layout", "Variant", "LAYOUTS", "layout_named"]

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A file of the authors' checkpoint is missing, unreadable or not what their code writes."""


@dataclass(frozen=True)
class Variant:
    """One variant switch of their RPN in ``config.json``.

    Attributes:
        default: the value their model assumes when the key is absent.
        accepted: the values for which their map is what our RPN computes.
        reason: why other values do not convert (their file and line).
    """

    default: object
    accepted: tuple
    reason: str


@dataclass(frozen=True)
class Layout:
    """One release of the authors: how its checkpoint is recognised and what their model computes
    with its RPN. Everything that differs between their releases is a field here.

    Attributes:
        name: the release, for messages ("LLaVA-1.5", "Qwen2.5-VL").
        model_types: the ``model_type`` values of its ``config.json``.
        family: the :mod:`sdrpn.models` adapter family of the models its RPN runs on.
        model_hint: what ``--model`` must be, for messages.
        source: their model file, for messages.
        variants: the variant switches (config key -> :class:`Variant`).
        twig_norm: whether ``model.twig_norm`` comes before the head's norm in their forward; it must
            agree with the family's ``rpn_uses_final_norm``.
        prompt: the conversation template their RPN was trained and evaluated with.
        geometry: the base view their inference gives it ("pad", "crop"; None: the processor's own,
            aspect-keeping views).
        threshold: the RoI threshold their inference applies by default.
        thresholds: per-benchmark thresholds that reach their model.
        image_start: where their model takes the image tokens to start (None: found in the prompt's ids).
        needs_processor: whether conversion needs the model's processor (to record where the image
            tokens start under ``prompt``, which their model hard-codes when ``image_start`` is set).
    """

    name: str
    model_types: tuple[str, ...]
    family: str
    model_hint: str
    source: str
    variants: dict = field(default_factory=dict)
    twig_norm: bool = True
    prompt: str = AUTHORS_TEMPLATE
    geometry: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    thresholds: dict = field(default_factory=dict)
    image_start: int | None = None
    needs_processor: bool = True


_MULTI_HEAD = "the score is the mean over heads of q.k/sqrt(head_dim) only then"
LAYOUTS = (
    Layout(
        name="LLaVA-1.5", model_types=("llava_llama",), family="llava",
        model_hint="a llava-hf LLaVA-1.5 checkpoint (LlavaForConditionalGeneration)",
        source="LLaVA/llava/llm_src/llama_src.py",
        # Defaults: llama_src.py:1112, 1123-1137.
        variants={
            "roi_source": Variant("qk", ("qk",), "the last twig layer's q/k projections score the image tokens "
                                                 "(llama_src.py:1311, 1342-1343)"),
            "roi_super_type": Variant("v1", ("v1",), "twig_norm is applied before the q/k head only then "
                                                     "(llama_src.py:1331-1332)"),
            "roi_multi_head": Variant(False, (True,), f"{_MULTI_HEAD}; otherwise it is the unscaled dot product "
                                                      f"over all heads (llama_src.py:1344-1356)"),
            "roi_loss": Variant("bce", ("bce", "focal"), "with 'mse' the scores are a softmax over the image tokens "
                                                         "(llama_src.py:1354-1355), not logits"),
        },
        twig_norm=True, prompt=AUTHORS_TEMPLATE, geometry=AUTHORS_GEOMETRY,
        # Their lmms-eval roi_conf_thresh=0.15 and per-benchmark values (DESIGN 2.1).
        threshold=DEFAULT_THRESHOLD, thresholds=dict(THRESHOLDS),
        image_start=35,  # llama_src.py:1110
        needs_processor=True,
    ),
    Layout(
        name="Qwen2.5-VL", model_types=("qwen2_5_vl",), family="qwen2_5_vl",
        model_hint="a Qwen2.5-VL checkpoint (Qwen2_5_VLForConditionalGeneration)",
        source="Qwen2.5-VL/qwen_src/qwen2_5_vl/modeling_qwen2_5_vl.py",
        # Defaults: modeling_qwen2_5_vl.py:1097, 1110-1112.
        variants={
            "roi_source": Variant("qk", ("qk",), "otherwise every twig layer runs in full before the head "
                                                 "(modeling_qwen2_5_vl.py:1279)"),
            "roi_super_type": Variant("v1", ("v1",),
                                      "their model refuses any other (modeling_qwen2_5_vl.py:1120-1124)"),
            "roi_multi_head": Variant(False, (True,), f"{_MULTI_HEAD}, with M-RoPE; otherwise it is the unscaled "
                                                      f"product of the whole q and k projections without RoPE "
                                                      f"(modeling_qwen2_5_vl.py:1315-1336)"),
            "roi_loss": Variant("bce", ("bce",), "their training knows only 'bce' and 'mse' "
                                                 "(modeling_qwen2_5_vl.py:2263-2269), and with 'mse' the scores "
                                                 "are a softmax over the image tokens thresholded at -0.15 "
                                                 "(:1100, 1334-1335)"),
        },
        # The twig_norm call is commented out (modeling_qwen2_5_vl.py:1302-1303) and training reads
        # the last twig layer's input norm only (:2175).
        twig_norm=False,
        # Their lmms-eval builds prompts with the processor's chat template and its default system
        # prompt (lmms-eval/lmms_eval/models/simple/qwen2_5_vl.py:55, 260, 313) and keeps the
        # processor's aspect-keeping resize at its min/max pixels.
        prompt="processor", geometry=None,
        # roi_conf_thresh is fixed at 0.25 in the model (modeling_qwen2_5_vl.py:1095, used at :1355 and
        # mm_utils.py:963); lmms-eval's per-benchmark roi_conf_thresh never reaches it (qwen2_5_vl.py:60, 124).
        threshold=0.25, thresholds={},
        image_start=None,  # the first image token of the prompt (modeling_qwen2_5_vl.py:2065)
        needs_processor=False,
    ),
)


def layout_named(model_type) -> Layout | None:
    """The layout whose ``config.json`` has this ``model_type`` (None: none of theirs)."""
    return next((layout for layout in LAYOUTS if model_type in layout.model_types), None)


@dataclass(frozen=True)
class Twig:
    """Where the RPN sits and which variant it is: K, T and their config keys as found."""

    start_layer: int
    num_blocks: int
    keys: dict


class AuthorsCheckpoint:
    """A checkpoint directory in the authors' layout; opening it checks its config.

    Attributes:
        directory: the checkpoint directory.
        config: its ``config.json``.
        layout: which of their releases it is (from ``model_type``).
        twig: where its RPN sits and which variant it is.

    Raises:
        CheckpointError: a ``model_type`` of none of their releases; see :meth:`_read_twig`; or no
            weights file.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config_path = self.directory / "config.json"
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path} not found: expected the authors' checkpoint directory "
                                  f"(config.json with enable_twig, twig_K, twig_T, and its weights)")
        try:
            self.config = json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.config_path} is not valid JSON ({exc})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.config_path} holds {type(self.config).__name__}, expected a JSON object")
        self.layout = self._read_layout()
        self.twig = self._read_twig()
        self._files, self._single_bin = self._weight_files()
        self._loaded_bins: dict[Path, dict] = {}

    # -- config ------------------------------------------------------------------------------------

    def _read_layout(self) -> Layout:
        model_type = self.config.get("model_type")
        layout = layout_named(model_type)
        if layout is None:
            known = ", ".join(f"{kind!r} ({layout.name})" for layout in LAYOUTS for kind in layout.model_types)
            raise CheckpointError(f"{self.config_path}: model_type is {model_type!r}, not one of the authors' releases "
                                  f"with an RPN ({known})")
        return layout

    def _read_twig(self) -> Twig:
        """K, T and the variant of the RPN, checked against what our RPN computes.

        Raises:
            CheckpointError: no RPN (``enable_twig`` false or absent), K or T missing or not
                integers, or a variant our RPN does not compute.
        """
        where = self.config_path
        if self.config.get("enable_twig") is not True:
            raise CheckpointError(f"{where}: enable_twig is {self.config.get('enable_twig')!r}, expected true "
                                  f"(a checkpoint trained with the authors' RPN)")
        sizes = {}
        for key, least in (("twig_K", 0), ("twig_T", 1)):
            value = self.config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise CheckpointError(f"{where}: {key} is {value!r}, expected an integer >= {least}")
            sizes[key] = value
        keys = {"enable_twig": True, **sizes}
        for key, variant in self.layout.variants.items():
            value = self.config.get(key, variant.default)
            keys[key] = value
            if value not in variant.accepted:
                absent = " (their default when absent)" if key not in self.config else ""
                accepted = " or ".join(f"{key}={choice!r}" for choice in variant.accepted)
                raise CheckpointError(f"{where}: {key} is {value!r}{absent}; only {accepted} converts for "
                                      f"{self.layout.name}: {variant.reason}")
        return Twig(sizes["twig_K"], sizes["twig_T"], keys)

    # -- tensors -----------------------------------------------------------------------------------

    @property
    def names(self) -> set[str]:
        """Names of all tensors of the checkpoint."""
        if self._single_bin is not None:
            return set(self._load_bin(self._single_bin))
        return set(self._files)

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name`` (for error messages)."""
        return self._single_bin or self._files[name]

    def read(self, names) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each read from the file that holds it.

        Raises:
            CheckpointError: a tensor is missing or a file cannot be read.
        """
        names = list(names)
        missing = sorted(set(names) - self.names)
        if missing:
            raise CheckpointError(f"{self.directory}: no tensor {missing[0]}"
                                  + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of(name), []).append(name)
        tensors = {}
        for path, wanted in by_file.items():
            tensors.update(self._read_file(path, wanted))
        return tensors

    def _weight_files(self) -> tuple[dict[str, Path], Path | None]:
        """(tensor name -> file, or the single .bin file whose names are known only once loaded)."""
        from safetensors import SafetensorError, safe_open

        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.directory / index_name
            if index.is_file():
                return self._index_files(index), None
        single = self.directory / SAFETENSORS_NAME
        if single.is_file():
            try:
                with safe_open(single, framework="pt") as handle:
                    return {name: single for name in handle.keys()}, None
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{single}: not a readable safetensors file ({exc})") from None
        if (self.directory / BIN_NAME).is_file():
            return {}, self.directory / BIN_NAME
        raise CheckpointError(f"{self.directory}: no weights found (expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, "
                              f"{BIN_NAME} or {BIN_INDEX})")

    def _index_files(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a shard index (expected a JSON object with weight_map; "
                                  f"{exc})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is {type(weight_map).__name__}, expected an object")
        return {name: self.directory / file for name, file in weight_map.items()}

    def _read_file(self, path: Path, names: list[str]) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise CheckpointError(f"{path} not found (named by the checkpoint's shard index)")
        if path.name.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="pt") as handle:
                    present = set(handle.keys())
                    absent = [name for name in names if name not in present]
                    if absent:
                        raise CheckpointError(f"{path}: no tensor {absent[0]}, though the shard index says it is there")
                    return {name: handle.get_tensor(name) for name in names}
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        state = self._load_bin(path)
        absent = [name for name in names if name not in state]
        if absent:
            raise CheckpointError(f"{path}: no tensor {absent[0]}, though the shard index says it is there")
        return {name: state[name] for name in names}

    def _load_bin(self, path: Path) -> dict:
        """A ``.bin`` state dict, memory-mapped; only tensors and plain containers are admitted."""
        if path not in self._loaded_bins:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), it holds more than "
                                      f"tensors ({first})") from None
            except (RuntimeError, OSError, EOFError) as exc:
                raise CheckpointError(f"{path}: not a readable PyTorch weights file ({exc})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
            self._loaded_bins[path] = state
        return self._loaded_bins[path]
