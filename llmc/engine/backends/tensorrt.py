"""TensorRT backend of the step API: run rank0.engine (built by llmc.build.tensorrt) on a GPU.

Optional extra (`pip install "llmc[tensorrt]"` on a CUDA host); tensorrt and torch are imported
lazily. `tensorrt_status()` says whether this machine can build or run TensorRT engines, and why
not; the builder asks it too.
"""

from __future__ import annotations

from pathlib import Path

from llmc.errors import LlmcError, UnsupportedError, first_line

INSTALL_HINT = 'install TensorRT >= 10.14 on a CUDA host (pip install "llmc[tensorrt]")'


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason). Usable means TensorRT imports and a CUDA device is visible."""
    try:
        import tensorrt as trt
    except Exception as exc:
        return False, f"TensorRT is not installed or cannot load ({type(exc).__name__}: {first_line(exc)}); {INSTALL_HINT}"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"TensorRT {trt.__version__} is installed but no CUDA device is visible"
    except Exception:
        return False, f"TensorRT {trt.__version__} is installed but CUDA cannot be queried (torch.cuda)"
    return True, f"TensorRT {trt.__version__}"


class TrtSession:
    """Runs rank0.engine with torch CUDA tensors; same interface as OrtSession."""

    def __init__(self, engine_path: Path, vocab_size: int):
        ok, reason = tensorrt_status()
        if not ok:
            raise UnsupportedError(f"cannot run a TensorRT engine here: {reason}")
        import tensorrt as trt
        import torch

        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise LlmcError("TensorRT could not deserialize the engine (built for another GPU or version?)",
                            engine_path)
        self.ctx = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.vocab_size = vocab_size
        self.pool = None

    def bind_pool(self, pool) -> None:
        self.pool = pool

    def run(self, feeds: dict, num_logits: int, scratch: bool = False):  # always a fresh host array
        import numpy as np

        torch = self.torch
        if self.pool is None:
            raise RuntimeError("allocate_kv_pool() before step()")
        dev = {name: torch.from_numpy(np.ascontiguousarray(a)).cuda() for name, a in feeds.items()}
        for name, t in dev.items():
            self.ctx.set_input_shape(name, tuple(t.shape))
            self.ctx.set_tensor_address(name, t.data_ptr())
        for name, (src, dst) in self.pool.bindings():
            self.ctx.set_input_shape(name, tuple(src.shape))
            self.ctx.set_tensor_address(name, src.data_ptr())
            self.ctx.set_tensor_address(name + ".out", dst.data_ptr())
        logits = torch.empty((num_logits, self.vocab_size), dtype=torch.float32, device="cuda")
        self.ctx.set_tensor_address("logits", logits.data_ptr())
        if not self.ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        self.pool.swap()  # ping-pong: this step's outputs are the next step's inputs
        return logits.cpu().numpy()


class TrtKVPool:
    """Two device buffers per pool tensor, swapped every step (TensorRT cannot alias I/O)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 torch_dtype):
        import torch

        shape = (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim)
        self.num_blocks = num_blocks
        self.bufs = [torch.zeros(shape, dtype=torch_dtype, device="cuda"),
                     torch.zeros(shape, dtype=torch_dtype, device="cuda")]
        self.cur = 0
        self.num_layers = num_layers

    @property
    def nbytes(self) -> int:
        return self.bufs[0].numel() * self.bufs[0].element_size()

    def bindings(self):
        src, dst = self.bufs[self.cur], self.bufs[1 - self.cur]
        for layer in range(self.num_layers):
            for k, kind in enumerate(("key", "value")):
                yield f"kv_pool.{layer}.{kind}", (src[layer, k], dst[layer, k])

    def swap(self) -> None:
        self.cur = 1 - self.cur
