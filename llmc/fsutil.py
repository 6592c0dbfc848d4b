"""Atomic artifact directories, and the rules that keep a user's files safe.

Every stage writes its output into a temporary sibling directory and renames it into place only
when everything succeeded, so a failed or interrupted stage never leaves a half-written artifact
that a later stage (or a resumed pipeline) could mistake for a valid one.

What may be written where (`check_output_dir`, used by every stage through `atomic_output_dir`):
- OUT may never be, contain, or lie inside one of the stage's inputs, whatever the flags: a
  rename over OUT would otherwise delete the input (or its unrelated siblings).
- A non-empty OUT is replaced only with --force, and only when it is a previous llmc artifact of
  the same kind (its config.json carries llmc's stamp) or empty; any other directory is refused.

Temporaries are named `.llmc-tmp-<name>-<pid>-<random>`: a later run of any stage removes those
whose owner process is gone (killed with SIGKILL, power loss), and SIGTERM is handled like Ctrl-C
(the temporary is removed before exiting).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from llmc.errors import LlmcError

TMP_MARK = ".llmc-tmp-"
_TMP_TAIL = re.compile(r"^(?:old-)?(\d+)-[0-9a-f]{8}$")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so cleanup runs exactly as for Ctrl-C (a BaseException
    that click does not swallow, so the CLI can exit with 128 + SIGTERM)."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread.

    Only installed when SIGTERM still has its default action (an embedding application's own
    handler is left alone) and only from the main thread (where Python delivers signals).
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- artifact stamps -------------------------------------------------------------------------

TRITON_MODEL_MARK = "# Written by `llmc export triton`"  # first line of an exported config.pbtxt


def read_json(path: str | Path):
    """A JSON file's content; a one-line LlmcError naming the file when it is not JSON or not
    UTF-8 (OSError, e.g. a missing file, is the caller's to word)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LlmcError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path) from None
    except UnicodeDecodeError:
        raise LlmcError(f"{path.name} is not UTF-8 text", path) from None


def write_file_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write one file through a temporary sibling renamed into place, so a reader (or a rerun after
    a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.llmc-tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def artifact_kind(path: Path) -> str | None:
    """"checkpoint" | "engine" when `path/config.json` carries llmc's stamp, "triton-model" when
    `path/config.pbtxt` starts with llmc's mark, else None."""
    try:
        with open(path / "config.pbtxt", encoding="utf-8", errors="replace") as fh:
            return "triton-model" if fh.readline().startswith(TRITON_MODEL_MARK) else None
    except OSError:
        pass
    cfg = path / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("llmc"), dict):
        return None
    stamp = data["llmc"]
    if stamp.get("engine") is True and isinstance(data.get("engine"), dict):
        return "engine"
    if "format_version" in stamp and "engine" not in data and "architecture" in data:
        return "checkpoint"
    return None


def _overlap(out: Path, src: Path) -> str | None:
    if out == src:
        return "is the input"
    if out in src.parents:
        return "contains the input"
    if src in out.parents:
        return "lies inside the input"
    return None


def check_output_dir(out: str | Path, force: bool, kind: str | None = None,
                     inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an OUT that overlaps an input, or a non-empty OUT that --force may not replace.

    kind: the artifact kind this stage writes ("checkpoint" | "engine"); None accepts any
    llmc-stamped artifact under --force.
    """
    out = Path(out)
    real_out = out.resolve()
    for src in inputs:
        if src is None:
            continue
        relation = _overlap(real_out, Path(src).resolve())
        if relation:
            raise LlmcError(f"output directory {out} {relation} {src}; choose an OUT outside the input "
                            "(no flag overrides this)")
    if not out.exists():
        return
    if not out.is_dir():
        raise LlmcError("exists and is not a directory", out)
    if not any(out.iterdir()):
        return
    what = kind or "artifact"
    found = artifact_kind(out)
    ours = found is not None and (kind is None or found == kind)
    if not force:
        hint = (f"use --force to replace this llmc {found}" if ours else
                f"--force only replaces a previous llmc {what} or an empty directory")
        raise LlmcError(f"output directory is not empty ({hint})", out)
    if not ours:
        got = f"an llmc {found}, not an llmc {what}" if found else f"not an llmc {what}"
        raise LlmcError(f"refusing to replace a directory that is {got}: --force only replaces a previous "
                        f"llmc {what} or an empty directory", out)


# --- temporaries -----------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove `.llmc-tmp-<out.name>-<pid>-*` siblings of `out` whose owner process is gone."""
    out = Path(out)
    prefix = f"{TMP_MARK}{out.name}-"
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        m = _TMP_TAIL.match(p.name[len(prefix):])
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _tmp_name(out: Path, old: bool = False) -> Path:
    return out.parent / f"{TMP_MARK}{out.name}-{'old-' if old else ''}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def scratch_dir(out: str | Path) -> Iterator[Path]:
    """A scratch directory next to `out`, named like its temporaries: removed when the block ends,
    and by the next run of any stage writing `out` if this process is killed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _tmp_name(out)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB" (the memory plan and the disk-space errors use it)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _os_error(exc: OSError, out: Path, expected_bytes: int | None, free_before: int | None = None,
              written: int | None = None) -> LlmcError | None:
    """A one-line error for write failures a user can fix (read-only, full disk, permissions)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(out.parent) if free_before is None else free_before
        facts = [f"wrote {human_bytes(written)} before the disk filled" if written else None,
                 f"the output needs about {human_bytes(expected_bytes)} plus metadata" if expected_bytes else None,
                 f"{human_bytes(free)} was free" if free is not None else None]
        return LlmcError(f"no space left on the device ({'; '.join(f for f in facts if f)})", out)
    if exc.errno == errno.EROFS:
        return LlmcError("cannot write the output: read-only file system", out)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return LlmcError(f"cannot write the output: permission denied ({exc.filename or out.parent})", out)
    return None


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, *, kind: str | None = None,
                      inputs: Iterable[str | Path] = (), expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` if the block succeeds.

    On any exception (including KeyboardInterrupt and SIGTERM) the temporary directory is removed
    and `out` is left exactly as it was. Stale temporaries of dead processes next to `out` are
    removed first. `expected_bytes` (an estimate of the artifact size) is checked against the
    free space before anything is written, and named if the disk fills up anyway.
    """
    out = Path(out)
    inputs = list(inputs)
    check_output_dir(out, force, kind, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (_os_error(exc, out, expected_bytes) or exc) from None
    remove_stale_temporaries(out)
    tmp = _tmp_name(out)
    free = None
    trash = None

    def restore() -> None:  # a failure between the two renames must not lose the previous OUT
        if trash is not None and trash.exists() and not out.exists():
            os.rename(trash, out)

    with sigterm_as_interrupt():
        try:
            tmp.mkdir()  # before the space check, so a read-only file system is named as such
            free = free_bytes(out.parent)
            if expected_bytes and free is not None and expected_bytes > free:
                raise LlmcError(f"not enough free space for the output: needs about {human_bytes(expected_bytes)}, "
                                f"{human_bytes(free)} free", out)
            yield tmp
            if out.exists():
                check_output_dir(out, force, kind, inputs)  # it may have changed meanwhile
                trash = _tmp_name(out, old=True)
                os.rename(out, trash)
                os.rename(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except OSError as exc:
            try:
                written = dir_size(tmp)
            except OSError:
                written = None
            shutil.rmtree(tmp, ignore_errors=True)
            restore()
            err = _os_error(exc, out, expected_bytes, free, written)
            if err is None:
                raise
            raise err from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            restore()
            raise


def dir_size(path: str | Path) -> int:
    """Total bytes of regular files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
