"""The intra-op thread pool options of every command that runs an engine (run, serve, bench).

Declared once so the three commands agree; None keeps the environment's setting
(LLMC_ORT_THREADS / LLMC_ORT_SPINNING), else the defaults of `llmc.engine.backends.onnxruntime`.
"""

from __future__ import annotations

import typer

THREADS = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: physical cores; env "
                       "LLMC_ORT_THREADS). On a host whose cores other jobs keep busy, 1 is fastest.")
SPIN = typer.Option(None, "--spin/--no-spin", help="Idle intra-op workers busy-wait for the next kernel "
                    "(default: spin; env LLMC_ORT_SPINNING=0|1): ~1.35x single-stream decode on an idle "
                    "machine, slower when other processes need the cores.")


def check_threads(threads: int | None) -> None:
    from llmc.errors import LlmcError

    if threads is not None and threads < 1:
        raise LlmcError(f"--threads must be >= 1, got {threads}")


def export_thread_options(threads: int | None, spin: bool | None) -> None:
    """For engines loaded in other processes (the Triton frontend's backend): hand the options on
    through the environment they inherit."""
    import os

    from llmc.engine.backends.onnxruntime import SPINNING_ENV, THREADS_ENV

    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)
    if spin is not None:
        os.environ[SPINNING_ENV] = "1" if spin else "0"
