"""`llmc serve`: an OpenAI-compatible HTTP server (or the Triton frontend) over one engine."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from llmc.cli.output import choice
from llmc.cli.threads import SPIN, THREADS, check_threads, export_thread_options

FRONTENDS = ("openai", "triton")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve(
    engine_dir: Path = typer.Argument(..., help="Engine directory written by `llmc build`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to bind."),
    model_name: str = typer.Option(None, "--model-name", help="Model id clients send and /v1/models lists (default: the engine directory's name)."),
    max_queue: int = typer.Option(None, "--max-queue", help="Most requests waiting for a batch slot; beyond it the server answers 503 + Retry-After (default: unbounded)."),
    kv_cache_mb: float = typer.Option(None, "--kv-cache-mb", help="KV block pool size (default: a share of free memory, capped at max_batch_size full sequences)."),
    api_key: str = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on every /v1 route (default: $LLMC_API_KEY, else none)."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="On SIGINT/SIGTERM, seconds to let running requests finish before cancelling them."),
    log_level: str = typer.Option("info", "--log-level", **choice(LOG_LEVELS), help="uvicorn's log level."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every HTTP request."),
    frontend: str = typer.Option("openai", "--frontend", **choice(FRONTENDS), help="openai (HTTP, this server) or triton (Triton Inference Server's Python backend)."),
    http_port: int = typer.Option(8000, "--http-port", help="triton: HTTP/REST port (KServe v2, /v2/models/NAME/generate_stream)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="triton: gRPC port (streaming)."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="triton: Prometheus metrics port (nv_* and llmc_*)."),
    instances: int = typer.Option(1, "--instances", help="triton: model instances (each its own engine loop and KV pool)."),
    max_batch_size: int = typer.Option(None, "--max-batch-size", help="triton: sequences in flight per instance (default and maximum: the engine's)."),
    prefill_budget: int = typer.Option(None, "--prefill-budget", help="At most N prompt tokens per engine step, decodes not counted: a burst of prompts enters in chunks between the running decodes (bounds TTFT and inter-token latency; default: prompts fill the step's max_num_tokens)."),
    threads: int = THREADS,
    spin: bool = SPIN,
) -> None:
    """Serve an engine over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    from llmc.errors import LlmcError

    if prefill_budget is not None and prefill_budget < 1:
        raise LlmcError(f"--prefill-budget must be >= 1 prompt tokens per step, got {prefill_budget}")
    check_threads(threads)
    if frontend == "triton":
        if prefill_budget is not None:
            raise LlmcError("--prefill-budget applies to the openai frontend (the Triton backend keeps its default)")
        try:
            from llmc.serve.triton import serve_triton
        except ModuleNotFoundError as exc:
            if exc.name != "llmc.serve.triton":
                raise
            raise LlmcError("the Triton frontend is not installed in this build of llmc") from None
        for name, port_ in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
            if not 0 < port_ < 65536:
                raise LlmcError(f"{name} must be in 1..65535, got {port_}")
        if not engine_dir.is_dir():
            raise LlmcError("no such engine directory", engine_dir)
        export_thread_options(threads, spin)  # the backend's engines load in tritonserver's processes
        code = serve_triton(engine_dir, host=host, http_port=http_port, grpc_port=grpc_port,
                            metrics_port=metrics_port, model_name=model_name or "llmc", instances=instances,
                            max_batch_size=max_batch_size, kv_cache_mb=kv_cache_mb, max_queue=max_queue)
        raise typer.Exit(code)
    if max_queue is not None and max_queue < 1:
        raise LlmcError(f"--max-queue must be >= 1 (a request waits in the queue until the next step), got {max_queue}")
    if not 0 < port < 65536:
        raise LlmcError(f"--port must be in 1..65535, got {port}")
    try:
        from llmc.serve.server import serve as run_server
    except ModuleNotFoundError as exc:
        raise LlmcError(f"`llmc serve` needs the serve extra ({exc.name} is missing): "
                        "pip install 'llmc[serve]'") from None
    if not engine_dir.is_dir():
        raise LlmcError("no such engine directory", engine_dir)
    run_server(engine_dir, host=host, port=port, model_name=model_name, max_queue=max_queue,
               kv_cache_mb=kv_cache_mb, api_key=api_key or os.environ.get("LLMC_API_KEY") or None,
               drain_timeout=drain_timeout, log_level=log_level, access_log=access_log, prefill_budget=prefill_budget,
               threads=threads, spinning=spin)
