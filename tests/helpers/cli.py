"""The ``sdrpn`` command run in the test's own process.

    status, out, err = run_sdrpn("generate", "--model", directory, ...)
    assert status != 0 and "K >= 3" in error_line(err)
"""

from __future__ import annotations

import contextlib
import io

__all__ = ["run_sdrpn", "error_line"]


def run_sdrpn(*argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``sdrpn argv...`` (arguments may be paths or numbers)."""
    from sdrpn.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(arg) for arg in argv])
        except SystemExit as exit:
            status = exit.code
    return status, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The command's one-line error, after any notes before it; a traceback fails the test."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]
