"""Atomic artifact directories.

Every stage writes its output into a temporary sibling directory and renames it into place only
when everything succeeded, so a failed or interrupted stage never leaves a half-written artifact
that a later stage (or a resumed pipeline) could mistake for a valid one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from llmc.errors import LlmcError

TMP_MARK = ".llmc-tmp-"


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty OUT unless --force was given."""
    if out.exists():
        if not out.is_dir():
            raise LlmcError("exists and is not a directory", out)
        if any(out.iterdir()) and not force:
            raise LlmcError("output directory is not empty (use --force to overwrite)", out)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and `out`
    is left exactly as it was.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_MARK}{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f"{TMP_MARK}{out.name}-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


def dir_size(path: str | Path) -> int:
    """Total bytes of regular files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
