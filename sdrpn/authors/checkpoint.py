"""The authors' LLaVA-1.5 checkpoint with its RPN: config and tensors, read without their code.

Their RPN lives inside a checkpoint of the original LLaVA (``LlavaLlamaForCausalLM``; YuHengsss/SD-RPN
commit 00876ac, ``LLaVA/llava/llm_src/llama_src.py`` ~1100-1125, ``llava_llama.py`` ~170-240):

* ``config.json``: the LLaMA sizes, ``enable_twig``, ``twig_K`` (K), ``twig_T`` (T), and the variant
  switches ``roi_source``, ``roi_super_type``, ``roi_multi_head``, ``roi_loss`` (``train.py`` ~955-962);
* the RPN's tensors ``model.twig_layers.{i}.*`` (T decoder layers initialised from layers K..K+T-1)
  and ``model.twig_norm.weight`` (initialised from the final norm);
* the base model under the original LLaVA names (``model.embed_tokens.weight``,
  ``model.layers.{i}.*``). Their 13B release stops at layer K+T-1 and has no final norm or LM head
  (their ``migrate_weights.py`` fills those in); the RPN needs neither.

Weights are safetensors (``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
or PyTorch pickles (``pytorch_model.bin``, or shards listed in ``pytorch_model.bin.index.json``),
the latter read with ``torch.load(weights_only=True)`` only. Only the files holding the requested
tensors are opened.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["AuthorsCheckpoint", "CheckpointError", "Twig"]

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Variant switches of their RPN, with the value their model assumes when the key is absent
# (llama_src.py:1112, 1123-1137), and the one our RPN computes.
VARIANT_DEFAULTS = {"roi_source": "qk", "roi_super_type": "v1", "roi_multi_head": False, "roi_loss": "bce"}
VARIANT_REASONS = {
    "roi_source": ("qk", "the last twig layer's q/k projections score the image tokens (llama_src.py:1311, 1342-1343)"),
    "roi_super_type": ("v1", "twig_norm is applied before the q/k head only then (llama_src.py:1331-1332)"),
    "roi_multi_head": (True, "the score is the mean over heads of q.k/sqrt(head_dim) only then; otherwise it "
                             "is the unscaled dot product over all heads (llama_src.py:1344-1356)"),
}


class CheckpointError(ValueError):
    """A file of the authors' checkpoint is missing, unreadable or not what their code writes."""


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
        twig: where its RPN sits and which variant it is.

    Raises:
        CheckpointError: see :meth:`_read_twig`; or no weights file.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config_path = self.directory / "config.json"
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path} not found: expected the authors' LLaVA checkpoint directory "
                                  f"(config.json with enable_twig, twig_K, twig_T, and its weights)")
        try:
            self.config = json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.config_path} is not valid JSON ({exc})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.config_path} holds {type(self.config).__name__}, expected a JSON object")
        self.twig = self._read_twig()
        self._files, self._single_bin = self._weight_files()
        self._loaded_bins: dict[Path, dict] = {}

    # -- config ------------------------------------------------------------------------------------

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
        for key, default in VARIANT_DEFAULTS.items():
            value = self.config.get(key, default)
            keys[key] = value
            if key in VARIANT_REASONS and value != VARIANT_REASONS[key][0]:
                expected, reason = VARIANT_REASONS[key]
                absent = " (their default when absent)" if key not in self.config else ""
                raise CheckpointError(f"{where}: {key} is {value!r}{absent}; only {key}={expected!r} converts: "
                                      f"{reason}")
        if keys["roi_loss"] == "mse":
            raise CheckpointError(f"{where}: roi_loss is 'mse': that RPN's scores are a softmax over the image "
                                  f"tokens (llama_src.py:1354-1355), not logits; only 'bce' or 'focal' converts")
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
