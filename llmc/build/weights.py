"""Checkpoint tensors -> canonical `LinearSpec`s for the graph emitters.

Float checkpoints are read directly; quantized ones go through the quantize package's
`llmc.quantize.layout.read_quantized_linear` (the one place that knows how each quant_algo is
stored: packed INT4, FP8 bit patterns, scale shapes), so the builder never re-implements the
checkpoint format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmc.checkpoint.config import CheckpointConfig
from llmc.errors import LlmcError, UnsupportedError
from llmc.plugins.linear import LinearSpec, concat_out

LAYER = "transformer.layers.{i}."

# quant_algo values the builder accepts (the quantize package's reader defines their layout)
QUANT_ALGOS = (None, "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A16",
               "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "W8A16_GPTQ")
KV_QUANT = {None: None, "INT8": "int8", "FP8": "fp8"}


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


@dataclass
class LayerWeights:
    input_layernorm: np.ndarray
    post_layernorm: np.ndarray
    qkv: LinearSpec
    dense: LinearSpec
    gate_up: LinearSpec
    proj: LinearSpec
    kv_cache_scale: float | None = None


def quant_kind(cfg: CheckpointConfig) -> str:
    """A short name of the checkpoint's weight quantization ("float" when unquantized)."""
    algo = cfg.quantization.quant_algo
    if algo not in QUANT_ALGOS:
        raise UnsupportedError(f"quant_algo {algo!r} is not supported by the engine builder "
                               f"(supported: {', '.join(str(k) for k in QUANT_ALGOS if k)})")
    return {None: "float", "FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8", "W8A16": "w8a16", "W4A16_AWQ": "int4_awq",
            "W4A8_AWQ": "w4a8_awq", "W4A16_GPTQ": "w4a16", "W8A16_GPTQ": "w8a16"}.get(algo, "int8_sq")


def kv_quant(cfg: CheckpointConfig) -> str | None:
    algo = cfg.quantization.kv_cache_quant_algo
    if algo not in KV_QUANT:
        raise UnsupportedError(f"kv_cache_quant_algo {algo!r} is not supported (INT8 or FP8)")
    return KV_QUANT[algo]


class WeightReader:
    """Produces per-layer LinearSpecs from merged checkpoint tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], cfg: CheckpointConfig):
        self.t = tensors
        self.cfg = cfg
        self.kind = quant_kind(cfg)
        self._qread = None
        if self.kind != "float":
            try:
                from llmc.quantize.layout import read_quantized_linear
            except ImportError:  # pragma: no cover - depends on the quantize package
                raise UnsupportedError("this llmc has no quantized-checkpoint reader "
                                       "(llmc.quantize.layout); cannot build quantized engines") from None
            self._qread = read_quantized_linear

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self.t[name]
        except KeyError:
            raise LlmcError(f"checkpoint has no tensor {name}") from None

    def linear(self, prefix: str, bias: bool = False) -> LinearSpec:
        """prefix like 'transformer.layers.0.attention.qkv' (no trailing dot)."""
        b = np32(self.t[prefix + ".bias"]) if bias and (prefix + ".bias") in self.t else None
        if self._qread is None:
            return LinearSpec("float", np32(self.tensor(prefix + ".weight")), bias=b)
        spec = from_qlinear(self._qread(self.t, prefix, self.cfg.quantization))
        spec.bias = b
        return spec

    def layer(self, i: int) -> LayerWeights:
        p = LAYER.format(i=i)
        qkv = self.linear(p + "attention.qkv", bias=self.cfg.attn_bias)
        dense = self.linear(p + "attention.dense")
        fc, gate = self.linear(p + "mlp.fc"), self.linear(p + "mlp.gate")
        try:
            gate_up = concat_out([fc, gate])
        except ValueError as exc:
            raise UnsupportedError(f"layer {i}: cannot fuse mlp.fc and mlp.gate into one matmul ({exc})") from None
        proj = self.linear(p + "mlp.proj")
        kv_scale = None
        name = p + "attention.kv_cache_scaling_factor"
        if name in self.t:
            kv_scale = float(self.t[name].float().reshape(-1)[0])
        return LayerWeights(np32(self.tensor(p + "input_layernorm.weight")),
                            np32(self.tensor(p + "post_layernorm.weight")), qkv, dense, gate_up, proj, kv_scale)


def _np(x) -> np.ndarray | None:
    return None if x is None else np32(x)


def from_qlinear(q) -> LinearSpec:
    """The quantize package's QLinear (canonical unpacked view) -> LinearSpec."""
    act = None
    if q.act_dtype == "int8":
        act = "int8_token" if q.act_granularity == "token" else "int8"
    elif q.act_dtype == "fp8":
        act = "fp8_token" if q.act_granularity == "token" else "fp8"
    scale = None if q.input_scale is None else float(q.input_scale.reshape(-1)[0])
    pqs, bias = _np(q.pre_quant_scale), _np(q.bias)
    if q.kind == "float":
        return LinearSpec("float", np32(q.weight), act=None, pre_quant_scale=pqs, bias=bias)
    if q.kind == "fp8":
        return LinearSpec("fp8", np32(q.weight), _np(q.weight_scale), None, act, scale, pqs, bias)
    if q.kind in ("int8_sq", "w8a16"):
        return LinearSpec("int8", q.weight.numpy().astype(np.int8), _np(q.weight_scale), q.group_size, act, scale,
                          pqs, bias, _np(q.zero))
    if q.kind == "int4_awq":
        return LinearSpec("int4", q.weight.numpy().astype(np.int8), _np(q.weight_scale), int(q.group_size),
                          act, scale, pqs, bias, _np(q.zero))
    if q.kind == "w4a8_awq":
        # TensorRT-LLM's W4A8: the INT4 weight is converted to FP8 per group, fp8(q * s_group / s2),
        # then scaled by s2. Store exactly those FP8 values.

        from llmc.quantize.layout import fp8_round

        fp8_vals = fp8_round(q.weight.float() * q.expanded_weight_scale())
        return LinearSpec("fp8", np32(fp8_vals), _np(q.weight_scale_2), None, act, scale, pqs, bias)
    raise UnsupportedError(f"{q.prefix}: quantized kind {q.kind!r} is not supported by the engine builder")
