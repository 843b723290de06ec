"""Exceptions shared across the package."""


class UserError(Exception):
    """A mistake the user can fix: a missing path, a bad option value, an incompatible checkpoint.

    The ``sdrpn`` command prints the message on one line and exits with status 2, without a
    traceback (``--debug`` shows it). The message must say what was expected and what was got.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, caught by a command that saved its work first; the message says what was kept and
    how to go on. The ``sdrpn`` command prints it and exits with status 130."""
