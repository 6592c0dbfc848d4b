"""Triton Inference Server front end: export a model repository (export.py), set up the numpy<2
environment Triton needs (env.py), run the real tritonserver (launch.py). The model code that
runs inside Triton is backend.py, reached through the exported model.py.

`serve_triton` is imported lazily so that `llmc serve --frontend openai` never pays for it.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("serve_triton", "TritonServer"):
        from llmc.serve.triton import launch

        return getattr(launch, name)
    if name in ("export_triton", "ExportOptions"):
        from llmc.serve.triton import export

        return getattr(export, name)
    raise AttributeError(f"module 'llmc.serve.triton' has no attribute {name!r}")
