"""llmc: a model compilation toolchain for large language models.

Stages (each a library function first and a CLI command second):
convert -> quantize -> build -> run/bench/eval/serve, chained by `pipeline`.

    from llmc import LLM, SamplingParams
    outputs = LLM("engine/").generate("The capital of France is", SamplingParams(max_tokens=16))

`LLM` and `SamplingParams` are imported on first use, so `import llmc` (and `llmc --help`) stays
instant.
"""

__version__ = "0.1.0"

_LAZY = {"LLM": "llmc.runtime.llm", "RequestOutput": "llmc.runtime.llm",
         "SamplingParams": "llmc.runtime.sampling", "LlmcError": "llmc.errors"}
__all__ = ["LLM", "RequestOutput", "SamplingParams", "LlmcError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")
