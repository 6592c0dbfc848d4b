"""Where llmc writes: results on stdout, progress, notes and logs on stderr, nothing truncated.

Conventions (the same for every command; the CLI's `llmc.cli.output` builds on this):
- `--json` prints exactly one JSON document on stdout and nothing else goes to stdout; tables,
  progress bars and logs go to stderr then. `--output FILE` (where a command offers it) writes the
  same document to a file instead.
- Tables never cut a value with "…": when stdout is not a terminal the console is as wide as the
  widest row, and on a narrow terminal cells wrap (overflow "fold").
- `-q/--quiet` silences progress and logs on stderr; `-v/--verbose` adds debug logs.

Below every stage (the build's memory plan and the progress bars print here), so it imports no
other llmc module; only rich, lazily.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class _State:
    quiet: bool = False
    verbose: bool = False


state = _State()

WIDE = 100_000  # "as wide as needed" for output that goes to a pipe or a file


def _console(stderr: bool, quiet: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else WIDE
    return Console(stderr=stderr, width=width, quiet=quiet, soft_wrap=width is not None,
                   highlight=False)


def out_console():
    """The console for a command's result (stdout)."""
    return _console(stderr=False)


def err_console():
    """The console for progress, notes and logs (stderr; silent under --quiet)."""
    return _console(stderr=True, quiet=state.quiet)


def table(title: str | None, columns: Sequence[str | tuple[str, dict]], show_header: bool = True):
    """A rich Table whose cells wrap instead of being cut ("…") when space is short."""
    from rich.table import Table

    t = Table(title=title, show_header=show_header)
    for col in columns:
        name, kw = (col, {}) if isinstance(col, str) else col
        t.add_column(name, overflow="fold", **kw)
    return t


def print_json(data: Any) -> None:
    """One JSON document on stdout (the whole of stdout under --json)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def configure_logging(verbose: bool, quiet: bool) -> None:
    """-v: llmc's own loggers at DEBUG (per-step timings); other libraries stay at WARNING, so
    -v shows llmc's work, not torch's or onnx's internals. -q: only errors, from anyone, and no
    llmc warnings (`llmc.errors.warn` asks the "llmc" logger)."""
    state.verbose, state.quiet = verbose, quiet
    others = logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=others, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(others)
    logging.getLogger("llmc").setLevel(logging.DEBUG if verbose else others)


def note(message: str) -> None:
    """An informational line on stderr (what llmc did or skipped); hidden by -q."""
    err_console().print(message, markup=False)
