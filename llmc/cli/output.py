"""How every command writes: figures on stdout, everything else on stderr, nothing truncated.

Conventions (the same for every command):
- `--json` prints exactly one JSON document on stdout and nothing else goes to stdout; tables,
  progress bars and logs go to stderr then. `--output FILE` (where a command offers it) writes the
  same document to a file instead.
- Tables never cut a value with "…": when stdout is not a terminal the console is as wide as the
  widest row, and on a narrow terminal cells wrap (overflow "fold").
- `-q/--quiet` silences progress and logs on stderr; `-v/--verbose` adds debug logs.

Only typer and rich are imported here, so commands may import this at module level.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import typer

from llmc.errors import did_you_mean



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


def choice(choices: Iterable[str], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """typer.Option keyword arguments for a string option with fixed choices: the help shows
    them (`--qformat <fp8|int8_sq|...>`), common other spellings map to a choice (fp16 ->
    float16), and a near miss is answered with "did you mean"."""
    options = [str(c) for c in choices]
    aliases = {k.lower(): v for k, v in (aliases or {}).items()}

    def parse(param: typer.CallbackParam, value: str | None) -> str | None:
        if value is None or value in options:
            return value
        low = str(value).lower()
        if low in aliases:
            return aliases[low]
        for opt in options:
            if opt.lower() == low:
                return opt
        name = max(param.opts, key=len) if param.opts else param.name
        raise typer.BadParameter(f"{name} must be one of {', '.join(options)} (got {value!r})"
                                 f"{did_you_mean(str(value), options)}")

    return {"metavar": "<" + "|".join(options) + ">", "callback": parse}


DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                 "float": "float32"}

