"""Reading a pickle of plain data and numpy arrays without running code from it.

Unpickling calls whatever callable the file names, so an ordinary ``pickle.load`` of a downloaded
file can run anything. :func:`load_data_pickle` admits only the globals that lists, dicts, strings,
numbers and numpy arrays and scalars need (numpy 1.x and 2.x names, protocols 2 to 5) and refuses
any other by name, before it is called.
"""

from __future__ import annotations

import pickle
from pathlib import Path

__all__ = ["load_data_pickle", "RefusedPickle"]


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global outside the admitted ones, or is not a readable pickle."""


def _admitted() -> dict[tuple[str, str], object]:
    """(module, name) -> object, for the globals a pickle of numpy arrays and scalars names."""
    import codecs

    import numpy

    try:  # numpy >= 2 keeps these in numpy._core; pickles made with numpy 1.x name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    admitted = {("numpy", "ndarray"): numpy.ndarray, ("numpy", "dtype"): numpy.dtype,
                # protocol 2 writes bytes as codecs.encode(text, "latin1")
                ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        admitted[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # arrays, protocols <= 4
        admitted[(f"{package}.multiarray", "scalar")] = multiarray.scalar              # numpy scalars
        admitted[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer          # arrays, protocol 5
    return admitted


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.admitted = _admitted()

    def find_class(self, module: str, name: str):
        try:
            return self.admitted[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{self.source}: refused to load {module}.{name}: only plain data and numpy arrays "
                                f"are read from this pickle, and it names something else that could run code") from None


def load_data_pickle(path: str | Path):
    """The object stored in the pickle at ``path``, read with only data globals admitted.

    Raises:
        RefusedPickle: the pickle names another global (nothing it names is called), or it is
            truncated or not a pickle.
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _DataUnpickler(handle, str(path)).load()
    except RefusedPickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise RefusedPickle(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
