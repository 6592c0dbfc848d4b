"""What an emitter needs to know about the backend it lowers for."""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from llmc.engine.onnx_graph import ACCURACY_LEVELS

BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class Target:
    """Lowering choices for one engine graph.

    backend:   "onnxruntime" or "tensorrt" (the tensorrt-llm backend does not use the graph).
    dtype:     ONNX element type of activations and float weights (FLOAT on ORT CPU; FLOAT16 /
               BFLOAT16 on TensorRT by default).
    attention: "auto" (per bucket: see llmc.plugins.attention.bucket_impl), "fused" (the standard
               ONNX Attention node, opset 23; ORT CPU, TensorRT >= 10.14) or "decomposed"
               (MatMul/Softmax; exact, for TensorRT < 10.14).
    fp8:       "qdq" (FP8 Q/DQ around the matmul; TensorRT fuses it into an FP8 GEMM) or
               "emulate" (ORT CPU has no FP8 GEMM: weights dequantized from their exact FP8 values
               at build time, activations rounded through a saturating Cast to float8e4m3fn).
    kv_storage: "native" (the pool holds int8 / float8e4m3fn) or "fake" (TensorRT's Gather and
               ScatterND take no INT8/FP8 tensors: the pool keeps the compute dtype and stores
               exactly the dequantized values, so numerics match but memory does not shrink).
    matmul_accuracy: ONNX Runtime's weight-only MatMulNBits compute: "int8" (activations rounded
               to int8 per block inside the kernel, accuracy level 4: fastest) or "fp32" (float
               compute for 4-bit weights, accuracy level 1; 8-bit weights, which have no fast
               float kernel, run level 4 on error-compensated activations: `llmc.plugins.linear`).
               TensorRT computes weight-only GEMMs in its float dtype either way.
    """

    backend: str = "onnxruntime"
    dtype: int = TensorProto.FLOAT
    attention: str = "auto"
    fp8: str = "emulate"
    kv_storage: str = "native"
    matmul_accuracy: str = "int8"

    @property
    def is_trt(self) -> bool:
        return self.backend == "tensorrt"

    @classmethod
    def for_backend(cls, backend: str, dtype: int | None = None, attention: str = "auto",
                    matmul_accuracy: str = "int8") -> "Target":
        if backend == "tensorrt":
            return cls(backend, TensorProto.FLOAT16 if dtype is None else dtype, attention, "qdq", "fake")
        return cls(backend, TensorProto.FLOAT if dtype is None else dtype, attention, "emulate", "native",
                   matmul_accuracy)

    @property
    def nbits_level(self) -> int:
        """accuracy_level of ONNX Runtime's MatMulNBits nodes (`llmc.engine.onnx_graph.ACCURACY_LEVELS`)."""
        return ACCURACY_LEVELS[self.matmul_accuracy]

    @property
    def exact_nbits(self) -> bool:
        """ONNX Runtime with float-accurate weight-only matmuls (--matmul-accuracy fp32)."""
        return not self.is_trt and self.matmul_accuracy == "fp32"
