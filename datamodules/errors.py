"""The errors a user's own input causes (data files, checkpoint files), as distinct from bugs.

The command line (``tasks/cli.py``) prints these as one ``error: <file>: <reason>`` line instead of a traceback;
everything else keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class InputError(ValueError):
    """A problem with something the user gave (a file, a folder, a checkpoint), naming it and saying why.

    Args:
        message: the full text (may span several lines, e.g. a listing of bad files).
        summary: the one line that names the (first) file at fault and the reason; the first line of
            ``message`` when not given.
    """

    def __init__(self, message: str, *, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary

    def one_line(self) -> str:
        """``<file>: <reason>`` in one line, also for an error re-raised from a DataLoader worker (whose
        message is the worker's traceback, ending in ``module.ErrorType: <the original message>``)."""
        if self.summary:
            return self.summary
        lines = [line.strip() for line in str(self).strip().splitlines() if line.strip()]
        if not lines:
            return type(self).__name__
        if "Original Traceback" in str(self):
            last = lines[-1]
            return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(type(self).__name__) else last
        return lines[0]


class DataError(InputError):
    """A problem with the user's data, naming the file or folder at fault."""


class CheckpointError(InputError):
    """A checkpoint file that cannot serve where it was given (unreadable, or of another kind)."""


class DiskFullError(InputError):
    """A write (a checkpoint, a prediction) that found no space left in its folder; the file it was to replace is
    untouched and no part of the new one is left behind."""


def listing_error(
    what: str, problems: Sequence[str], *, limit: int = 20, error: type[InputError] = DataError
) -> InputError:
    """One error for many bad files: ``<count> <what>:`` and one problem per line (at most ``limit``), with the
    first problem as its one-line summary."""
    shown = "\n  ".join(problems[:limit]) + (f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else "")
    more = f" (and {len(problems) - 1} more {what}, listed above)" if len(problems) > 1 else ""
    return error(f"{len(problems)} {what}:\n  {shown}", summary=f"{problems[0]}{more}")
