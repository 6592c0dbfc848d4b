"""`llmc export triton`: hand an engine to NVIDIA Triton Inference Server as a model repository."""

from __future__ import annotations

from pathlib import Path

import typer

export_app = typer.Typer(help="Export an engine for other serving systems.", no_args_is_help=True)


@export_app.command("triton")
def triton(
    engine_dir: Path = typer.Argument(..., help="Engine directory written by `llmc build`."),
    output: Path = typer.Option(..., "--output", "-o", help="Triton model repository to write into (created if missing)."),
    model_name: str = typer.Option("llmc", "--model-name", help="Triton model name (REPO/NAME)."),
    instances: int = typer.Option(1, "--instances", help="Model instances (each its own engine loop, KV pool and Python stub)."),
    max_batch_size: int = typer.Option(None, "--max-batch-size", help="Sequences in flight per instance (default and maximum: the engine's max_batch_size)."),
    kv_cache_mb: float = typer.Option(None, "--kv-cache-mb", help="KV block pool per instance (default: as `llmc run`)."),
    max_queue: int = typer.Option(None, "--max-queue", help="Waiting requests per instance before new ones are refused (default: unbounded)."),
    copy_engine: bool = typer.Option(False, "--copy-engine", help="Copy the engine into the repository instead of referencing it."),
    env_path: str = typer.Option(None, "--env-path", help="EXECUTION_ENV_PATH for the model: a venv with numpy<2 and llmc's runtime packages (default: the llmc-managed one, see `python -m llmc.serve.triton.env`)."),
    force: bool = typer.Option(False, "--force", help="Replace REPO/NAME if it exists."),
) -> None:
    """Write REPO/NAME/config.pbtxt (python backend, decoupled, CPU instances) and REPO/NAME/1/model.py."""
    from llmc.serve.triton.export import ExportOptions, export_triton

    model_dir = export_triton(engine_dir, output, ExportOptions(
        model_name=model_name, instances=instances, max_batch_size=max_batch_size, kv_cache_mb=kv_cache_mb,
        max_queue=max_queue, copy_engine=copy_engine, env_path=env_path), force=force)
    typer.echo(f"wrote Triton model {model_name!r} to {model_dir}\n"
               f"serve it with `tritonserver --model-repository {output}` in the environment "
               f"`python -m llmc.serve.triton.env` sets up, or just `llmc serve {engine_dir} --frontend triton`")
