"""llmc model for Triton Inference Server's Python backend (written by `llmc export triton`).

A thin adapter: everything lives in `llmc.serve.triton.backend` (one llmc EngineLoop per model
instance, decoupled streaming responses, TensorRT-LLM backend tensor names). This file only
finds llmc (`llmc_path/` beside it links to the exporting llmc; the stub ignores PYTHONPATH;
without the link llmc must be installed in the model's environment) and refuses to start under
numpy 2, which Triton 2.51's Python stub silently corrupts tensors with.
"""

import os
import sys


def _refuse_numpy2():
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise RuntimeError(
            f"llmc: numpy {numpy.__version__} is importable in this model's Python environment "
            f"({sys.prefix}); Triton's Python backend stub corrupts tensors with numpy 2. "
            "Point EXECUTION_ENV_PATH at an environment with numpy<2 "
            "(`python -m llmc.serve.triton.env` creates one).")


_refuse_numpy2()


class TritonPythonModel:
    def initialize(self, args):
        link_dir = os.path.join(args["model_repository"], args["model_version"], "llmc_path")
        if os.path.isdir(os.path.join(link_dir, "llmc")) and link_dir not in sys.path:
            sys.path.insert(0, link_dir)
        from llmc.serve.triton.backend import LlmcTritonModel

        self._impl = LlmcTritonModel(args)

    def execute(self, requests):
        return self._impl.execute(requests)

    def finalize(self):
        impl = getattr(self, "_impl", None)
        if impl is not None:
            impl.finalize()
