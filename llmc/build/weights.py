"""Checkpoint tensors -> the canonical `QLinear`s the graph emitters consume.

Every linear, float or quantized, is read by `llmc.quantize.layout.read_quantized_linear` (the one
place that knows how each quant_algo is stored: packed INT4, FP8 bit patterns, scale shapes), so
the builder never re-implements the checkpoint format; which algos exist, and their labels, come
from `llmc.checkpoint.quant_algos`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmc.checkpoint.config import CheckpointConfig
from llmc.checkpoint.quant_algos import KV_CACHE_ALGOS, QUANT_ALGOS
from llmc.checkpoint.schema import LAYER
from llmc.errors import LlmcError, UnsupportedError
from llmc.quantize.layout import QLinear, concat_out, read_quantized_linear


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


@dataclass
class LayerWeights:
    input_layernorm: np.ndarray
    post_layernorm: np.ndarray
    qkv: QLinear
    dense: QLinear
    gate_up: QLinear
    proj: QLinear
    kv_cache_scale: float | None = None

    def linears(self) -> tuple[QLinear, ...]:
        return self.qkv, self.dense, self.gate_up, self.proj


def quant_kind(cfg: CheckpointConfig) -> str:
    """The checkpoint's weight quantization label (`QuantAlgo.kind`; "float" when unquantized)."""
    algo = cfg.quantization.quant_algo
    if algo is None:
        return "float"
    if algo not in QUANT_ALGOS:
        raise UnsupportedError(f"quant_algo {algo!r} is not supported by the engine builder "
                               f"(supported: {', '.join(QUANT_ALGOS)})")
    return QUANT_ALGOS[algo].kind


def kv_quant(cfg: CheckpointConfig) -> str | None:
    algo = cfg.quantization.kv_cache_quant_algo
    if algo is None:
        return None
    if algo not in KV_CACHE_ALGOS:
        raise UnsupportedError(f"kv_cache_quant_algo {algo!r} is not supported ({' or '.join(KV_CACHE_ALGOS)})")
    return KV_CACHE_ALGOS[algo].dtype


class WeightReader:
    """Produces per-layer QLinears from merged checkpoint tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], cfg: CheckpointConfig):
        self.t = tensors
        self.cfg = cfg
        self.kind = quant_kind(cfg)

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self.t[name]
        except KeyError:
            raise LlmcError(f"checkpoint has no tensor {name}") from None

    def linear(self, prefix: str, bias: bool = False) -> QLinear:
        """prefix like 'transformer.layers.0.attention.qkv' (no trailing dot); its bias only if `bias`."""
        lin = read_quantized_linear(self.t, prefix, self.cfg.quantization)
        if not bias:
            lin.bias = None
        return lin

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

