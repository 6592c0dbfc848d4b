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
    """A one-line warning on stderr (something odd that llmc can still handle). Silent when the
    "llmc" logger is above WARNING (`llmc -q`), so every llmc warning obeys one switch."""
    import logging
    import sys

    if not logging.getLogger("llmc").isEnabledFor(logging.WARNING):
        return
    print(f"warning: {path}: {message}" if path is not None else f"warning: {message}", file=sys.stderr)
