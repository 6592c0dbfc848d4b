"""Engine stage: checkpoint -> one ONNX graph (+ TensorRT plan) -> a step API over a paged KV pool.

    from llmc.engine import BuildOptions, build_engine, load_engine, StepBatch, SeqSlice
    build_engine("ckpt/", "engine/", BuildOptions(max_batch_size=8))
    engine = load_engine("engine/")
    engine.allocate_kv_pool(num_blocks)
    logits = engine.step(StepBatch(...))

Heavy modules (onnx, onnxruntime, torch, tensorrt) are imported lazily by the functions that
need them, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmc.engine.options import BuildOptions
from llmc.engine.step import SeqSlice, StepBatch

if TYPE_CHECKING:  # pragma: no cover
    from llmc.engine.build import BuildResult, build_engine
    from llmc.engine.engine import Engine, EngineConfig, describe_engine, load_engine

__all__ = ["BuildOptions", "BuildResult", "Engine", "EngineConfig", "SeqSlice", "StepBatch",
           "build_engine", "describe_engine", "load_engine"]

_LAZY = {"build_engine": "llmc.engine.build", "BuildResult": "llmc.engine.build",
         "load_engine": "llmc.engine.engine", "Engine": "llmc.engine.engine",
         "EngineConfig": "llmc.engine.engine", "describe_engine": "llmc.engine.engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmc.engine' has no attribute {name!r}")
