"""`llmc inspect`: what is in a checkpoint or engine directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def inspect(
    path: Path = typer.Argument(..., help="A checkpoint or engine directory."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    verify: bool = typer.Option(False, "--verify", help="Engines: hash every file and compare with the digests "
                                "recorded at build time (loading an engine does this too). Checkpoints are "
                                "always verified."),
) -> None:
    """Show architecture, parameters, dtype, quantization, TP mapping, size and KV bytes/token."""
    from rich.console import Console
    from rich.table import Table

    from llmc.inspect import describe

    facts = describe(path, verify=verify)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    table = Table(title=f"{facts.get('kind', 'artifact')}: {path}", show_header=False)
    for key, value in facts.items():
        if key in ("kind", "path"):
            continue
        if key.endswith("_bytes") and isinstance(value, int):
            value = f"{_human_bytes(value)} ({value:,} bytes)"
        elif key == "parameters":
            value = f"{value / 1e6:.2f}M ({value:,})"
        elif key.endswith("_per_token"):
            value = f"{value:,} bytes"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key.replace("_", " "), str(value))
    Console().print(table)
