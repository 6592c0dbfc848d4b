"""Fused-op emitters for the engine graph.

Each emitter writes one logical op (RMSNorm, RoPE, paged attention, gated MLP, quantized linear)
into a `GraphBuilder` and knows how to lower itself for each backend: the `Target` it is given
says whether the graph is for ONNX Runtime (CPU) or TensorRT, the compute dtype, and which
attention form to use. TensorRT-bound lowerings use standard-domain ONNX ops only
(`llmc.build.trt_compat` checks them); ONNX Runtime ones may use its com.microsoft contrib ops
(MatMulNBits, GatherBlockQuantized).
"""

from llmc.plugins.base import Target

__all__ = ["Target"]
