"""Options and helpers shared by the subcommands that load a model.

``--model`` is a local Hugging Face checkpoint directory and is loaded with
``local_files_only=True``: the command never downloads anything. ``--rpn`` is a directory written
by ``RPN.save_pretrained``; the processor is set to the base view geometry the RPN records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import UserError

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


# ------------------------------------------------------------------------------------------------
# Argument types: a bad value becomes a one-line command-line error.
# ------------------------------------------------------------------------------------------------


def existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: is a directory, expected a file")
    return path


def existing_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such directory")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a file, expected a directory")
    return path


def existing_path(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or directory")
    return path


def _unit_number(value: str, closed: bool) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}") from None
    if closed and not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    if not closed and not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {value}")
    return number


def probability(value: str) -> float:
    """A RoI threshold: a number strictly between 0 and 1."""
    return _unit_number(value, closed=False)


def roi_threshold(value: str) -> float | str:
    """``--threshold``: a number strictly between 0 and 1, or ``calibrated`` (the RPN's calibrated one)."""
    from ..rpn import CALIBRATED

    if value.strip().lower() == CALIBRATED:
        return CALIBRATED
    try:
        float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1 or {CALIBRATED!r}, got {value!r}") from None
    return probability(value)


def ratio(value: str) -> float:
    """A share: a number from 0 to 1, both included."""
    return _unit_number(value, closed=True)


def _int_at_least(value: str, low: int, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if number < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return number


def positive_int(value: str) -> int:
    return _int_at_least(value, 1, "a positive integer")


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0, "an integer of 0 or more")


# ------------------------------------------------------------------------------------------------
# Model options
# ------------------------------------------------------------------------------------------------


def format_box(box) -> str:
    """A box ``[x0, y0, x1, y1)`` as printed by the commands: ``[12, 30.5, 80, 96]``."""
    return f"[{', '.join(f'{v:g}' for v in box)}]"


# What the --rpn help of the commands that run methods adds: which methods need no RPN.
RPN_FREE_METHODS_NOTE = "; baseline, res-scaling and vicrop need none"


def add_model_arguments(parser: argparse.ArgumentParser, rpn: str = "optional", required: bool = True,
                        rpn_note: str = "") -> None:
    """Add ``--model``, ``--device``, ``--dtype``, ``--attn-implementation`` and, unless ``rpn`` is
    "none", ``--rpn`` ("required" or "optional"; ``rpn_note`` ends its help). With ``required=False``
    the command checks ``--model`` itself (for modes that need no model)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, type=existing_dir, metavar="DIR",
                       help="local Hugging Face checkpoint directory (config.json, weights, processor files)")
    if rpn != "none":
        group.add_argument("--rpn", required=required and rpn == "required", type=existing_dir, metavar="DIR",
                           help=f"RPN directory written by RPN.save_pretrained (sdrpn train --out){rpn_note}")
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu; "
                            "under torchrun, cuda means the process's local GPU)")
    group.add_argument("--dtype", default="auto", choices=list(DTYPES), metavar="DTYPE",
                       help="weights and activations: float32, bfloat16 or float16 (also fp32/bf16/fp16); "
                            "auto (default) keeps the checkpoint's dtype on a GPU and uses float32 on the CPU")
    group.add_argument("--attn-implementation", default="sdpa", choices=ATTENTION_IMPLEMENTATIONS,
                       help="attention kernel the model runs with (default: sdpa)")


def add_threshold_argument(group, default: str) -> None:
    """``--threshold T|calibrated`` of the commands that run SD-RPN; ``default`` says what applies without it."""
    group.add_argument("--threshold", type=roi_threshold, metavar="T",
                       help=f"RoI threshold, or 'calibrated' for the one sdrpn train calibrated on held-out "
                            f"labels (default: {default})")


def add_prompt_argument(group, default: str) -> None:
    """``--prompt NAME``: a conversation template of :mod:`sdrpn.prompts`; ``default`` says what applies without it."""
    from ..prompts import TEMPLATES

    group.add_argument("--prompt", choices=sorted(TEMPLATES), metavar="TEMPLATE",
                       help=f"conversation template: {', '.join(sorted(TEMPLATES))} (default: {default}); "
                            f"vicuna_v1 is LLaVA-1.5's, processor the checkpoint's own chat template")


def add_max_regions_argument(group) -> None:
    """``--max-regions N`` of the commands that run SD-RPN (:attr:`sdrpn.roi.RoIOptions.max_regions`)."""
    group.add_argument("--max-regions", type=positive_int, metavar="N",
                       help="zoom into the N RoI components of the highest peak probability only; 1 always "
                            "gives box upscaling of the strongest region (default: all, the authors' method)")


def resolve_device(name: str | None):
    """The torch device for ``--device``; asking for a GPU that is not there is a user error.

    Under ``torchrun`` a bare "cuda" means the GPU of the process's ``LOCAL_RANK``.
    """
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible to this torch ({torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_dtype(name: str, device):
    """The torch dtype for ``--dtype`` on ``device``; None means the checkpoint's own dtype."""
    import torch

    if DTYPES[name] is None:
        return torch.float32 if device.type == "cpu" else None
    dtype = getattr(torch, DTYPES[name])
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype {name}: this GPU does not support bfloat16; use float16")
    if device.type == "cpu" and dtype == torch.bfloat16:
        warn_if_cpu_bfloat16_is_emulated(f"--dtype {name}", "--dtype float32")
    return dtype


def cpu_bfloat16_is_emulated() -> bool:
    """Whether this CPU lacks bfloat16 instructions (AVX512-BF16, AMX), so that torch emulates
    bfloat16 matrix products: on an AVX2-only CPU they run about 20x slower than float32. A torch
    without the probes counts as native (no warning rather than a wrong one)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if callable(probe)]
    return bool(probes) and not any(probe() for probe in probes)


def warn_if_cpu_bfloat16_is_emulated(option: str, alternative: str) -> None:
    """One line on stderr when ``option`` asks for bfloat16 on a CPU that emulates it."""
    if cpu_bfloat16_is_emulated():
        print(f"sdrpn: warning: {option}: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so "
              f"bfloat16 is emulated and runs many times slower than float32; {alternative} avoids it",
              file=sys.stderr)


def checkpoint_config(path: Path) -> dict:
    """The checkpoint's config.json; a directory without a readable one is a user error."""
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"--model {path}: not a Hugging Face checkpoint directory (no config.json); "
                        f"the model is never downloaded, pass a local directory")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--model {path}: config.json is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def load_model(args: argparse.Namespace):
    """Load ``--model`` and its processor on ``--device`` with ``--dtype`` and
    ``--attn-implementation``, from local files only. Returns ``(model, processor)``.

    With ``--rpn``, the processor makes the base views the RPN was trained on (its recorded
    geometry, "pad" or "crop"); one line on stderr says when that changed the processor."""
    import transformers

    config = checkpoint_config(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    transformers.utils.logging.disable_progress_bar()  # a per-tensor loading bar is noise on a command line
    processor = load_processor(args.model, config.get("model_type"))
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            args.model, dtype="auto" if dtype is None else dtype,
            attn_implementation=args.attn_implementation, local_files_only=True)
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        raise UserError(f"--attn-implementation {args.attn_implementation}: {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {args.model}: cannot load the checkpoint ({exc})") from exc
    _match_rpn_geometry(args, model, processor)
    return model.to(device).eval(), processor


def load_processor(path: Path, model_type: str | None = None):
    """The processor of the local checkpoint ``path`` (``config.json``'s ``model_type`` given), from
    local files only: ``AutoProcessor``, or, where that fails only because torchvision is not
    installed, the same processor built without it for the families that need no torchvision for
    images (:data:`sdrpn.models.processors.TORCHVISION_FREE_PROCESSORS`; one line on stderr says so, once per process)."""
    import transformers

    from ..models.processors import TORCHVISION_FREE_PROCESSORS, only_torchvision_missing

    try:
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError, ValueError, KeyError, TypeError) as exc:
        # Qwen2.5-VL's loader raises an ImportError without torchvision, Qwen3-VL's a ValueError.
        build = TORCHVISION_FREE_PROCESSORS.get(model_type)
        if build is None or not only_torchvision_missing(exc):
            raise UserError(f"--model {path}: cannot load the processor ({_first_line(exc)})") from exc
    try:
        processor = build(path)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise UserError(f"--model {path}: cannot load the processor without torchvision ({_first_line(exc)})") from exc
    _say_once(f"sdrpn: torchvision is not installed, which transformers' {type(processor).__name__} needs for its "
              f"video processor only: built it from the checkpoint's tokenizer, chat template and "
              f"preprocessor_config.json with the PIL image processor ({type(processor.image_processor).__name__}) "
              f"and no video processor; images are processed as usual, videos are refused")
    return processor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr)


def _recorded_geometry(rpn_dir: Path) -> str | None:
    """The base view geometry an RPN directory records (None: not recorded or unreadable; loading
    the RPN reports a damaged directory)."""
    try:
        return json.loads((rpn_dir / "config.json").read_text()).get("geometry")
    except (OSError, ValueError, AttributeError):
        return None


def _match_rpn_geometry(args: argparse.Namespace, model, processor) -> None:
    rpn_dir = getattr(args, "rpn", None)
    geometry = _recorded_geometry(rpn_dir) if rpn_dir is not None else None
    if geometry is not None:
        match_processor_geometry(model, processor, geometry, "the RPN was trained on")


def match_processor_geometry(model, processor, geometry: str, source: str) -> None:
    """Makes the processor's base views ``geometry`` ("pad" or "crop"), saying so on stderr when that
    changes it (``source``: what asks for that geometry)."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    if adapter.geometry is None:  # views that keep the image's aspect ratio (Qwen): no geometry to set
        return
    if adapter.set_processor_geometry(processor, geometry):
        print(f"sdrpn: {source} {geometry!r} base views: the processor now "
              f"{'pads images to a square' if geometry == 'pad' else 'centre-crops images'} "
              f"(image_processor.do_pad = {geometry == 'pad'})", file=sys.stderr)


def check_rpn_layers(start_layer: int, num_blocks: int, num_layers: int) -> None:
    """``--K``/``--T`` against a model of ``num_layers`` layers: the RPN spans layers K .. K+T-1, which
    must exist. A bad pair is a user error that says the valid range and a pair to start from."""
    if 0 <= start_layer < num_layers and 1 <= num_blocks <= num_layers - start_layer:
        return
    raise UserError(f"--K {start_layer} --T {num_blocks}: {rpn_layer_range(num_layers)}")


def rpn_layer_range(num_layers: int, relative_depth: float = 15 / 32) -> str:
    """The ``--K``/``--T`` pairs a model of ``num_layers`` layers allows, and one to start from: K at
    ``relative_depth`` of the depth (by default LLaVA-1.5's, 15 of 32), T 3."""
    suggested = min(round(num_layers * relative_depth), num_layers - 1)
    return (f"the RPN spans layers K .. K+T-1, and this model has {num_layers} layers (0 .. {num_layers - 1}): "
            f"K must be 0 .. {num_layers - 1} and T 1 .. {num_layers} - K "
            f"(for example --K {suggested} --T {min(3, num_layers - suggested)})")


def load_rpn(args: argparse.Namespace, model):
    """Load ``--rpn`` for ``model`` (None without ``--rpn``); an RPN trained for another model is a
    user error."""
    from .. import RPN

    if args.rpn is None:
        return None
    try:
        return RPN.from_pretrained(args.rpn, model)
    except (OSError, ValueError) as exc:
        raise UserError(f"--rpn {args.rpn}: {exc}") from exc
