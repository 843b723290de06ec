"""Records that cannot be used: one policy for the commands that read question files.

``sdrpn label``, ``sdrpn heads`` and ``sdrpn eval`` treat a record they cannot use (a line that is
not JSON, a missing field, an image that is missing or unreadable) alike: it never stops the run.
It becomes a :class:`RecordIssue` naming the file, the line and the full reason, printed as soon as
it is found; the run goes on with the other records and ends with :func:`issues_summary`, the
count of the skipped records by reason.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class RecordIssue:
    """A record that was skipped, or changed before use, and why.

    ``line`` is the record's line in ``file`` (from 1), or its place in a file whose records have no
    lines of their own (``"data[3]"``, an item of a JSON list).
    """

    file: str
    line: int | str
    reason: str
    question_id: str | None = None
    action: str = "skipped"  # "skipped" or "converted"

    @property
    def place(self) -> str:
        """``file:12``, or ``file data[3]``."""
        return f"{self.file}:{self.line}" if isinstance(self.line, int) else f"{self.file} {self.line}"

    def __str__(self) -> str:
        ident = f" (question_id {self.question_id})" if self.question_id is not None else ""
        return f"{self.place}{ident}: {self.action}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)


class RecordProblem(Exception):
    """Why one record cannot be used (its message is the reason); becomes a :class:`RecordIssue`."""


def report_issue(command: str, issue: RecordIssue, write=None) -> None:
    """Print one issue on stderr as ``sdrpn <command>: <issue>`` (``write``: a progress bar's
    ``write``, so that the line does not break the bar)."""
    line = f"sdrpn {command}: {issue}"
    if write is None:
        print(line, file=sys.stderr)
    else:
        write(line, file=sys.stderr)


def reason_kind(reason: str) -> str:
    """The reason without its specifics (the path, the parser position), for the summary."""
    return reason.split(":")[0].split(" (")[0]


def issues_summary(issues: Sequence[RecordIssue]) -> str | None:
    """``skipped 3 records: 2 unreadable line, 1 image not found``; None when none was skipped."""
    skipped = [issue for issue in issues if issue.action == "skipped"]
    if not skipped:
        return None
    kinds = Counter(reason_kind(issue.reason) for issue in skipped)
    return (f"skipped {len(skipped)} record{'s' if len(skipped) != 1 else ''}: "
            + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common()))
