"""ONNX Runtime (CPU) execution of an engine graph, with the KV pool bound once.

- The pool is one numpy allocation, zero-filled and pre-faulted at allocation (first-touch page
  faults cost more than the writes): [layers, 2 (K/V), kv_heads, num_blocks, block_size,
  head_dim], one OrtValue per layer's keys and one per its values, viewed as [1, kv_heads,
  num_blocks * block_size, head_dim] for "slots" graphs (ONNX Runtime builds) and as [kv_heads,
  num_blocks, block_size, head_dim] for "split" ones; "paired" graphs (ONNX Runtime engines
  built before the "slots" layout) take [layers, kv_heads, num_blocks, 2, block_size, head_dim],
  one OrtValue per layer. Each is wrapped without copying and bound both as the graph's pool input
  and as the matching `.out` output, so the in-graph ScatterND (or GroupQueryAttention) writes
  new K/V in place.
  Bindings persist across steps: a step binds only its small index arrays and the logits buffer.
- FP8 pools are uint8 buffers handed to ORT as float8e4m3fn tensors (same bytes).
- Session options: intra-op threads = physical cores, spinning workers (LLMC_ORT_THREADS /
  LLMC_ORT_SPINNING or the CLI's --threads / --spin override them, see `thread_settings`),
  sequential execution, all graph optimisations (QDQ -> int8 GEMM and blocked-int4
  DequantizeLinear -> MatMulNBits fusions).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from onnx import TensorProto

from llmc.errors import LlmcError, first_line
from llmc.engine.onnx_graph import ACCURACY_LEVELS, SESSION_LEVEL_DOC, walk_nodes

POOL_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT8: np.int8,
           TensorProto.FLOAT8E4M3FN: np.uint8, TensorProto.UINT8: np.uint8, TensorProto.BFLOAT16: np.uint16}

# MatMulNBits accuracy level for INT4/INT8 weights, keyed by the engine's `matmul_accuracy` (llmc
# build --matmul-accuracy): for DequantizeLinear + MatMul pairs ORT fuses (engines built before the
# step variants) through the session option, for llmc's own MatMulNBits nodes by their attribute.
DEFAULT_INT4_ACCURACY_LEVEL = ACCURACY_LEVELS["int8"]

# MatMulAddFusion would turn "MatMul -> residual Add" into Gemm before the QDQ fusions run, which
# keeps ORT from fusing a blocked-INT4 DequantizeLinear + MatMul into MatMulNBits (dense and
# proj stayed fp32-dequantized every step). The residual Add costs one pass over [T, hidden].
DISABLED_OPTIMIZERS = ["MatMulAddFusion"]


def default_threads() -> int:
    """Intra-op threads when nothing is set: the machine's physical cores.

    Measured on the 2-core VM (int4_awq SmolLM2, 128-token single-stream decodes, interleaved
    rounds): quiet, 2 spinning threads decode at 169.9 tok/s vs 131.1 with 1; when other jobs load
    both cores (load 5-11), 1 thread wins (77 vs 69 sleeping, 36-41 spinning). llmc's measurements
    are for a dedicated machine, so the default uses every core; a shared host sets --threads 1.
    """
    return physical_cores()


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover
        n = None
    return max(1, n or os.cpu_count() or 1)


# Intra-op thread pool: LLMC_ORT_THREADS (default: `default_threads`) and LLMC_ORT_SPINNING (1: idle
# workers busy-wait for the next kernel, ORT's own default and what llama.cpp's and
# onnxruntime-genai's workers do; 0: they sleep); `llmc run/serve/bench --threads N --spin/--no-spin`.
# A decode step is ~1000 small kernels and a sleeping worker costs a wake-up (~20-30 us on this VM)
# at every threaded one: measured on the quiet 2-core VM (SmolLM2 int4_awq, medians of 5 interleaved
# 128-token decodes) 2 spinning threads 169.9 tok/s, 2 sleeping 124.4, 1 thread 131.1; the 32-request
# serving workload 437 vs 363 output tok/s (3 rounds). On a host whose cores other processes keep
# busy a spinning worker burns the core its peer needs (int4 decode 76.6 spinning vs 103.6 sleeping
# and 112.8 with one thread, one CPU-bound process beside it): such a host sets --threads 1
# (LLMC_ORT_THREADS=1), the fastest setting there (see README, engine).
THREADS_ENV, SPINNING_ENV = "LLMC_ORT_THREADS", "LLMC_ORT_SPINNING"
DEFAULT_SPINNING = True  # with one thread there is no pool to spin: it matters from two threads on


def thread_settings(threads: int | None = None, spinning: bool | None = None) -> tuple[int, bool]:
    """(intra-op threads, spinning) from the arguments, else the environment, else the defaults."""
    env_t, env_s = os.environ.get(THREADS_ENV), os.environ.get(SPINNING_ENV)
    try:
        n = threads if threads is not None else (int(env_t) if env_t else default_threads())
    except ValueError:
        raise LlmcError(f"{THREADS_ENV} must be a positive integer, got {env_t!r}") from None
    if spinning is None:
        if env_s not in (None, "", "0", "1"):
            raise LlmcError(f"{SPINNING_ENV} must be 0 or 1, got {env_s!r}")
        spinning = DEFAULT_SPINNING if env_s in (None, "") else env_s == "1"
    if n < 1:
        raise LlmcError(f"intra-op threads must be >= 1, got {n}")
    return n, spinning


def session_options(threads: int | None = None, int4_accuracy_level: int | None = None,
                    optimized_model_path: str | None = None, spinning: bool | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    n, spin = thread_settings(threads, spinning)
    so.intra_op_num_threads = n
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    level = DEFAULT_INT4_ACCURACY_LEVEL if int4_accuracy_level is None else int4_accuracy_level
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return so


KV_POOL_LAYOUTS = ("slots", "split", "paired")  # see llmc.plugins.attention.kv_pool_layout


class OrtKVPool:
    """The runtime-owned KV pool: one buffer, per-layer key/value views, OrtValues over them."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 onnx_type: int, layout: str = "split"):
        import onnxruntime as ort

        if layout not in KV_POOL_LAYOUTS:
            raise LlmcError(f"unknown KV pool layout {layout!r} (this llmc knows {', '.join(KV_POOL_LAYOUTS)}); "
                            "rebuild the engine")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.onnx_type = onnx_type
        self.layout = layout
        np_dtype = POOL_NP[onnx_type]
        shape = ((num_layers, num_kv_heads, num_blocks, 2, block_size, head_dim) if layout == "paired" else
                 (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim))
        self.buffer = np.empty(shape, np_dtype)
        self.buffer.fill(0)  # commit and zero every page now, not on the first steps
        paired_shape = (num_kv_heads, 2 * num_blocks, block_size, head_dim)

        def wrap(view: np.ndarray):
            if onnx_type in (TensorProto.FLOAT8E4M3FN, TensorProto.BFLOAT16):
                return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(view, onnx_type)
            return ort.OrtValue.ortvalue_from_numpy(view)

        # graph input name -> OrtValue over its slice of the buffer
        self.ortvalues: dict[str, object] = {}
        for layer in range(num_layers):
            if layout == "paired":
                self.ortvalues[f"kv_pool.{layer}"] = wrap(self.buffer[layer].reshape(paired_shape))
            else:
                for kind, name in enumerate(("key", "value")):
                    view = self.buffer[layer, kind]
                    if layout == "slots":  # the same bytes as one BNSH cache of num_blocks * block_size slots
                        view = view.reshape(1, num_kv_heads, num_blocks * block_size, head_dim)
                    self.ortvalues[f"kv_pool.{layer}.{name}"] = wrap(view)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def key(self, layer: int) -> np.ndarray:
        """[kv_heads, num_blocks, block_size, head_dim] view of a layer's keys (storage dtype)."""
        return self.buffer[layer, :, :, 0] if self.layout == "paired" else self.buffer[layer, 0]

    def value(self, layer: int) -> np.ndarray:
        return self.buffer[layer, :, :, 1] if self.layout == "paired" else self.buffer[layer, 1]


def _model_at_level(model_path: Path, so, level: int | None) -> str | bytes:
    """The model to load: its path, or (when `level` differs from the accuracy_level of llmc's
    MatMulNBits nodes) the graph with those nodes set to `level`, its weights still read from the
    engine directory."""
    if level is None:
        return str(model_path)
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    changed = False
    for n in walk_nodes(m.graph):
        if n.op_type == "MatMulNBits" and n.doc_string == SESSION_LEVEL_DOC:
            for a in n.attribute:
                if a.name == "accuracy_level" and a.i != level:
                    a.i, changed = level, True
    if not changed:
        return str(model_path)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(model_path).parent))
    return m.SerializeToString()


class OrtSession:
    def __init__(self, model_path: Path, vocab_size: int, threads: int | None = None,
                 int4_accuracy_level: int | None = None, spinning: bool | None = None):
        import onnxruntime as ort

        so = session_options(threads, int4_accuracy_level, spinning=spinning)
        try:
            model = _model_at_level(model_path, so, int4_accuracy_level)
            self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"],
                                             disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as exc:  # an unreadable or incompatible model is a user-facing problem
            raise LlmcError(f"ONNX Runtime {ort.__version__} cannot load this engine ({first_line(exc)})", model_path) from None
        self.io = self.sess.io_binding()
        self.vocab_size = vocab_size
        self.pool: OrtKVPool | None = None
        self._inputs: dict[str, np.ndarray] = {}  # the buffer each step input is bound to
        self._scratch: np.ndarray | None = None  # the logits buffer of `run(scratch=True)`
        self._bound_logits: np.ndarray | None = None

    def bind_pool(self, pool: OrtKVPool) -> None:
        for name, ov in pool.ortvalues.items():
            self.io.bind_ortvalue_input(name, ov)
            self.io.bind_ortvalue_output(f"{name}.out", ov)
        self.pool = pool

    def run(self, feeds: dict[str, np.ndarray], num_logits: int, scratch: bool = False) -> np.ndarray:
        if self.pool is None:
            raise RuntimeError("allocate_kv_pool() before step()")
        io = self.io
        for name, arr in feeds.items():
            # ORT reads a bound numpy buffer in place, so an input whose shape did not change since
            # the last step (most of them in steady decode) is refreshed with a copy of a few int64s
            # instead of a new binding (~10-20 us each from Python).
            cur = self._inputs.get(name)
            if cur is not None and cur.shape == arr.shape and cur.dtype == arr.dtype:
                np.copyto(cur, arr)
            else:
                cur = self._inputs[name] = np.array(arr, copy=True, order="C")
                io.bind_cpu_input(name, cur)
        # A fresh array per step (callers may keep it); ORT writes straight into it. glibc serves
        # repeated same-size allocations from its heap, so this costs no page faults after warm-up.
        # With `scratch` the session's own buffer, bound once per logits count: binding an output
        # costs ~50 us per step from Python (measured), and the runtime samples at once.
        if scratch:
            out = self._scratch
            if out is None or out.shape[0] != num_logits:
                out = self._scratch = np.empty((num_logits, self.vocab_size), np.float32)
        else:
            out = np.empty((num_logits, self.vocab_size), np.float32)
        if out is not self._bound_logits:
            io.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self._bound_logits = out
        self.sess.run_with_iobinding(io)
        return out
