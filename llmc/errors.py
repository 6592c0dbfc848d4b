"""User-facing errors.

Anything a user can cause (a wrong path, a corrupt file, settings that cannot hold) is raised as
`LlmcError`. The CLI prints its message as one line and exits with code 2, so users never see a
traceback for their own mistakes; a traceback means a bug in llmc.
"""

from __future__ import annotations

from pathlib import Path


class LlmcError(Exception):
    """A user mistake or an unusable input; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class UnsupportedError(LlmcError):
    """A valid request that this build of llmc, or this machine, cannot serve."""


def warn(message: str, path: str | Path | None = None) -> None:
    """A one-line warning on stderr (something odd that llmc can still handle)."""
    import sys

    print(f"warning: {path}: {message}" if path is not None else f"warning: {message}", file=sys.stderr)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty): how a
    library's multi-line error is quoted inside a one-line LlmcError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
