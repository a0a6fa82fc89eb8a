"""The two ways a command can fail on purpose.

``UsageError``: the user asked for something impossible (bad flag, bad config, missing
path). Raised before any worker starts; the CLI prints the message and exits with 2.

``RunError``: something went wrong while working (a corrupt checkpoint, a dead worker,
a non-finite loss). The CLI prints the message and exits with 1.

Anything else is a bug: the CLI says so, and ``--debug`` shows the traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


EXIT_STOPPED = 75  # EX_TEMPFAIL: a run stopped by a signal after saving a checkpoint; the same command resumes


class MauctlError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(MauctlError):
    exit_code = 2


class RunError(MauctlError):
    exit_code = 1


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``word``, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or, when nothing is close, the list of valid choices."""
    candidates = sorted(candidates)
    match = closest(word, candidates)
    if match is not None:
        return f"did you mean '{match}'?"
    return "valid: " + ", ".join(candidates)
