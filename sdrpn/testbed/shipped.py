"""The testbed's trained tiny LLaVA and its RPN, shipped inside the package (what ``sdrpn demo`` runs).

* :data:`SHIPPED_MODEL`: the model, its processor and its model card (``save_pretrained``);
* :data:`SHIPPED_RPN`: its RPN (``RPN.save_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

__all__ = ["ASSETS", "SHIPPED_MODEL", "SHIPPED_RPN", "require_shipped"]

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_MODEL = ASSETS / "tiny-llava"
SHIPPED_RPN = ASSETS / "tiny-llava-rpn"


def require_shipped() -> tuple[Path, Path]:
    """``(model directory, RPN directory)``; a missing one is a :class:`UserError` saying how to make it."""
    how = {
        SHIPPED_MODEL: ("tiny model", f"`sdrpn testbed train-model --data DIR --out {SHIPPED_MODEL}` "
                                      f"on a data set of `sdrpn testbed generate`"),
        SHIPPED_RPN: ("tiny model's RPN", f"`sdrpn testbed run --data DIR --work WORK` and a copy of WORK/rpn "
                                          f"to {SHIPPED_RPN}"),
    }
    for directory, (what, command) in how.items():
        if not directory.is_dir():
            raise UserError(f"the shipped {what} is missing ({directory} does not exist); make it with "
                            f"{command}, or pass --model and --rpn")
    return SHIPPED_MODEL, SHIPPED_RPN
