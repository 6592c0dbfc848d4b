"""The built engine: load an engine directory, run steps over a paged KV pool.

    from llmc.engine import load_engine, StepBatch, SeqSlice
    engine = load_engine("engine/")
    engine.allocate_kv_pool(num_blocks)
    logits = engine.step(StepBatch(...))

Heavy modules (onnx, onnxruntime, torch, tensorrt) are imported lazily by the functions that
need them, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmc.engine.step import SeqSlice, StepBatch

if TYPE_CHECKING:  # pragma: no cover
    from llmc.engine.engine import Engine, EngineConfig, describe_engine, load_engine

__all__ = ["Engine", "EngineConfig", "SeqSlice", "StepBatch", "describe_engine", "load_engine"]

_LAZY = {"load_engine": "llmc.engine.engine", "Engine": "llmc.engine.engine",
         "EngineConfig": "llmc.engine.engine", "describe_engine": "llmc.engine.engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmc.engine' has no attribute {name!r}")
