"""Shared fixtures: tiny random models of each family, and the real SmolLM2 checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # ModelOpt calibration is erratic with 2 threads

from tiny_models import FAMILIES, make_tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny HF model directory per family variant (llama, llama_tied, mistral, qwen2)."""
    root = tmp_path_factory.mktemp("hf")
    return {fam: make_tiny_hf_model(root / fam, fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_hf_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each tiny model converted to an fp32 checkpoint (tp 1)."""
    from llmc.converters.convert import convert

    root = tmp_path_factory.mktemp("ckpt")
    return {fam: convert(src, root / fam, dtype="float32", progress=False).out
            for fam, src in tiny_hf_dirs.items()}


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF to fp32 (cached)."""
    from llmc.default_model import ensure_default_checkpoint

    return ensure_default_checkpoint("float32")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_checkpoint, tmp_path_factory) -> Path:
    """An fp32 SmolLM2 engine for end-to-end runtime / serving tests (built once per session)."""
    from llmc.build import BuildOptions, build_engine

    out = tmp_path_factory.mktemp("smollm2-engine") / "engine"
    build_engine(smollm2_checkpoint, out, BuildOptions(max_batch_size=16, max_input_len=256, max_seq_len=384,
                                                       tokens_per_block=16))
    return out
