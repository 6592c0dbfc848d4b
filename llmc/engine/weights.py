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

# quant_algo -> LinearSpec kind
QUANT_KINDS = {
    None: "float",
    "FP8": "fp8",
    "W8A8_SQ_PER_CHANNEL": "int8_sq",
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": "int8_sq",
    "W8A8_SQ_PER_TENSOR_PLUGIN": "int8_sq",
    "W8A16": "w8a16",
    "W4A16": "w4a16",
    "W4A16_AWQ": "int4_awq",
    "W4A8_AWQ": "w4a8_awq",
}
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
    algo = cfg.quantization.quant_algo
    if algo not in QUANT_KINDS:
        raise UnsupportedError(f"quant_algo {algo!r} is not supported by the engine builder "
                               f"(supported: {', '.join(str(k) for k in QUANT_KINDS if k)})")
    return QUANT_KINDS[algo]


def kv_quant(cfg: CheckpointConfig) -> str | None:
    algo = cfg.quantization.kv_cache_quant_algo
    if algo not in KV_QUANT:
        raise UnsupportedError(f"kv_cache_quant_algo {algo!r} is not supported (INT8 or FP8)")
    return KV_QUANT[algo]


def _excluded(cfg: CheckpointConfig, module: str) -> bool:
    import fnmatch

    pats = cfg.quantization.exclude_modules or []
    return any(fnmatch.fnmatch(module, p) for p in pats)


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
        quantized = self.kind != "float" and (prefix + ".weight") in self.t and \
            self.t[prefix + ".weight"].dtype not in (torch.float32, torch.float16, torch.bfloat16)
        if not quantized:
            return LinearSpec("float", np32(self.tensor(prefix + ".weight")), bias=b)
        spec = from_qlinear(self._qread(self.t, prefix, self.cfg.quantization), self.kind, self.cfg)
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
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return np32(x) if x.is_floating_point() else x.detach().contiguous().numpy()
    return np.asarray(x)


def _scalar(x) -> float | None:
    if x is None:
        return None
    return float(np.asarray(_np(x), np.float32).reshape(-1)[0])


def from_qlinear(q, kind: str, cfg: CheckpointConfig) -> LinearSpec:
    """Adapt the quantize package's QLinear (canonical unpacked view) to a LinearSpec."""
    values = q.weight if hasattr(q, "weight") else q.values
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.float8_e4m3fn:
            values = values.float()
        values = values.detach().contiguous().numpy()
    values = np.asarray(values)
    qkind = getattr(q, "kind", None) or kind
    if qkind in ("fp8",) or values.dtype.kind == "f":
        spec_kind = kind if kind in ("fp8",) else "fp8"
        w = values.astype(np.float32)
    else:
        spec_kind = kind
        w = values.astype(np.int8)
    group = getattr(q, "group_size", None) or (cfg.quantization.group_size if "4" in kind else None)
    return LinearSpec(
        kind=spec_kind, weight=w,
        weight_scale=_np(getattr(q, "weight_scale", None)),
        input_scale=_scalar(getattr(q, "input_scale", None)),
        pre_quant_scale=_np(getattr(q, "pre_quant_scale", None)),
        weight_scale_2=_scalar(getattr(q, "weight_scale_2", None)),
        group_size=group,
    )
