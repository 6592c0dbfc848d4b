"""How every command writes (conventions in `llmc.console`: figures on stdout, everything else on
stderr, nothing truncated), plus option helpers: choices shown in help, "did you mean".

Only typer and rich are imported here, so commands may import this at module level.
"""

from __future__ import annotations

from typing import Any, Iterable

import typer

# The consoles live below the CLI so that library code (progress bars, the memory plan) can print.
from llmc.console import configure_logging, err_console, note, out_console, print_json, state, table  # noqa: F401
from llmc.errors import did_you_mean


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

