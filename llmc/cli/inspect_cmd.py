"""`llmc inspect`: what is in a checkpoint or engine directory."""

from __future__ import annotations

from pathlib import Path

import typer


def inspect(
    path: Path = typer.Argument(..., help="A checkpoint or engine directory, or a .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout and nothing else."),
    verify: bool = typer.Option(False, "--verify", help="Engines: hash every file and compare with the digests "
                                "recorded at build time (loading an engine does this too). Checkpoints are "
                                "always verified."),
) -> None:
    """Show architecture, parameters, dtype, quantization, TP mapping, size and KV bytes/token."""
    from llmc.cli.output import out_console, print_json, table
    from llmc.inspect import describe

    facts = describe(path, verify=verify)
    if as_json:
        print_json(facts)
        return
    t = table(f"{facts.get('kind', 'artifact')}: {path}", ["fact", "value"], show_header=False)
    for key, value in facts.items():
        if key in ("kind", "path") or value is None:  # None: does not apply (e.g. group size of fp8)
            continue
        t.add_row(key.replace("_", " "), _show(key, value))
    out_console().print(t)


def _show(key: str, value) -> str:
    """A fact in human units: bytes as KiB/MiB/GiB, parameters in millions, dicts inline."""
    from llmc.fsutil import human_bytes

    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(k, v)}" for k, v in value.items() if v is not None)
    if isinstance(value, int) and not isinstance(value, bool) and ("bytes" in key or key in
                                                                    ("weights", "kv_pool", "kv_pool_max",
                                                                     "activations", "total_max")):
        return f"{human_bytes(value)} ({value:,} bytes)"
    if key == "parameters" and isinstance(value, int):
        return f"{value / 1e6:.2f}M ({value:,})"
    if key.endswith("_per_token") and isinstance(value, int):
        return f"{value:,} bytes"
    return str(value)
