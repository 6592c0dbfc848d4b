"""User-facing errors.

Anything a user can cause (a wrong path, a corrupt file, settings that cannot hold) is raised as
`LlmcError`. The CLI prints its message as one line and exits with code 2, so users never see a
traceback for their own mistakes; a traceback means a bug in llmc.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


class LlmcError(Exception):
    """A user mistake or an unusable input; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class UnsupportedError(LlmcError):
    """A valid request that this build of llmc, or this machine, cannot serve."""


def warn(message: str, path: str | Path | None = None) -> None:
    """A one-line warning on stderr (something odd that llmc can still handle). Silent when the
    "llmc" logger is above WARNING (`llmc -q`), so every llmc warning obeys one switch."""
    import logging
    import sys

    if not logging.getLogger("llmc").isEnabledFor(logging.WARNING):
        return
    print(f"warning: {path}: {message}" if path is not None else f"warning: {message}", file=sys.stderr)


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    import difflib

    norm = {c.replace("-", "_").lower(): c for c in choices}
    key = value.replace("-", "_").lower()
    if key in norm:
        return f" (did you mean {norm[key]!r}?)"
    close = difflib.get_close_matches(key, list(norm), n=1, cutoff=0.5)
    return f" (did you mean {norm[close[0]]!r}?)" if close else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty): how a
    library's multi-line error is quoted inside a one-line LlmcError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
