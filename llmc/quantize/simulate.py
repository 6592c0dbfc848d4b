"""Exact fake-quant simulation of a quantized checkpoint: what the engine computes.

Everything here is a function of the checkpoint's stored tensors only (through
`layout.read_quantized_linear`), never of ModelOpt state, so the engine builder can be compared
against it tensor by tensor. In float32, per linear (`SimLinear`):

    x = x * pre_quant_scale                                  (AWQ / SmoothQuant, if stored)
    x = fake_quant_activation(x)                              (formats with activation quant)
          int8, static ("tensor"):  clamp(round(x / s), -128, 127) * s,   s = input_scale
          int8, dynamic ("token"):  same with s = amax(|x|, last dim) / 127 per token (s=1 if 0)
          fp8, static:              fp8_e4m3(clamp(x / s, +-448)) * s
          fp8, dynamic ("token"):   same with s = amax(|x|, last dim) / 448 per token (s=1 if 0)
    y = x @ dequantize(W)^T + bias                            (QLinear.dequantize: exact values)

round() is round-half-to-even (torch.round, ONNX QuantizeLinear). KV cache (`SimKVAttention`):
K after RoPE and V are fake-quantized per tensor with the layer's kv_cache_scaling_factor
(int8: clamp(round(k / s), -128, 127) * s; fp8: fp8(k / s) * s) before attention, exactly what a
quantized paged cache stores and reads back.

`build_simulated_model(ckpt)` returns llmc's ReferenceModel with every linear replaced by its
SimLinear (mlp.fc + mlp.gate fused back into one gate_up by `layout.concat_out`, the fusion the
engine builder uses, when they share an input treatment; otherwise run side by side) and, with a
quantized KV cache, attention swapped for SimKVAttention.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmc.checkpoint.quant_algos import KV_CACHE_ALGOS
from llmc.checkpoint.schema import LAYER
from llmc.models.reference import Attention, ReferenceModel, attention_with_kv_hooks
from llmc.quantize.formats import FP8_MAX, INT8_MAX
from llmc.quantize.layout import QLinear, concat_out, fp8_round, kv_cache_scale, read_quantized_linear


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return fake_quant_int8(x, scale)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp8_round(x / scale) * scale


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True)
    return fake_quant_fp8(x, torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)))


def fake_quant_activation(x: torch.Tensor, act_dtype: str | None, granularity: str | None,
                          input_scale: torch.Tensor | None) -> torch.Tensor:
    if act_dtype is None:
        return x
    if act_dtype == "int8":
        if granularity == "token":
            return fake_quant_int8_per_token(x)
        return fake_quant_int8(x, input_scale)
    if act_dtype == "fp8":
        if granularity == "token":
            return fake_quant_fp8_per_token(x)
        return fake_quant_fp8(x, input_scale)
    raise ValueError(f"unknown activation dtype {act_dtype!r}")


class SimLinear(nn.Module):
    """One linear exactly as the engine runs it (see the module docstring)."""

    def __init__(self, q: QLinear):
        super().__init__()
        self.kind = q.kind
        self.act_dtype, self.act_granularity = q.act_dtype, q.act_granularity
        self.register_buffer("weight", q.dequantize().contiguous(), persistent=False)
        for name in ("pre_quant_scale", "input_scale", "bias"):
            t = getattr(q, name)
            self.register_buffer(name, None if t is None else t.float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        x = fake_quant_activation(x, self.act_dtype, self.act_granularity, self.input_scale)
        return F.linear(x, self.weight, self.bias).to(dtype)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return (f"{in_f} -> {out_f}, kind={self.kind}, act={self.act_dtype}"
                f"{'/' + self.act_granularity if self.act_granularity else ''}, "
                f"pre_quant_scale={self.pre_quant_scale is not None}")


class SimConcat(nn.Module):
    """Linears sharing an input but quantizing it differently: run each, concatenate outputs."""

    def __init__(self, parts: list[SimLinear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def sim_fused(parts: list[QLinear]) -> nn.Module:
    """[fc, gate] as the engine runs them: one SimLinear of `concat_out(parts)` (the builder's
    fusion), or side by side when their input treatment differs (the builder refuses those)."""
    try:
        return SimLinear(concat_out(parts))
    except ValueError:
        return SimConcat([SimLinear(p) for p in parts])


class SimKVAttention(Attention):
    """Reference attention with the KV cache fake-quantized (attribute kv_dtype, kv_scale)."""

    kv_dtype: str
    kv_scale: torch.Tensor

    def _kv(self, t: torch.Tensor) -> torch.Tensor:
        dtype = t.dtype
        t = t.float()
        if self.kv_dtype == "int8":
            return fake_quant_int8(t, self.kv_scale).to(dtype)
        return fake_quant_fp8(t, self.kv_scale).to(dtype)

    def forward(self, x, cos, sin):
        return attention_with_kv_hooks(self, x, cos, sin, self._kv, self._kv)


def build_simulated_model(ckpt) -> ReferenceModel:
    """The reference model of a (quantized or float) checkpoint, computing what the engine does."""
    from llmc.checkpoint.io import Checkpoint, load_checkpoint

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(Path(ckpt))
    cfg = ckpt.config
    qcfg = cfg.quantization
    if not qcfg.quant_algo and not qcfg.kv_cache_quant_algo:
        return ReferenceModel.from_checkpoint(ckpt, dtype=torch.float32)
    tensors = ckpt.merged_tensors()
    with torch.device("meta"):
        model = ReferenceModel(cfg)

    def read(prefix: str) -> QLinear:
        return read_quantized_linear(tensors, prefix, qcfg)

    def sim(prefix: str) -> SimLinear:
        return SimLinear(read(prefix))

    for i, layer in enumerate(model.transformer.layers):
        p = LAYER.format(i=i)
        layer.attention.qkv = sim(p + "attention.qkv")
        layer.attention.dense = sim(p + "attention.dense")
        layer.mlp.gate_up = sim_fused([read(p + "mlp.fc"), read(p + "mlp.gate")])
        layer.mlp.proj = sim(p + "mlp.proj")
        scale = kv_cache_scale(tensors, i)
        if qcfg.kv_cache_quant_algo:
            if scale is None or qcfg.kv_cache_quant_algo not in KV_CACHE_ALGOS:
                from llmc.errors import LlmcError

                raise LlmcError(f"kv_cache_quant_algo is {qcfg.kv_cache_quant_algo} but "
                                f"{p}attention.kv_cache_scaling_factor is missing" if scale is None else
                                f"kv_cache_quant_algo {qcfg.kv_cache_quant_algo!r} is not supported "
                                f"(llmc reads {', '.join(KV_CACHE_ALGOS)})", ckpt.path)
            layer.attention.__class__ = SimKVAttention
            layer.attention.kv_dtype = KV_CACHE_ALGOS[qcfg.kv_cache_quant_algo].dtype
            layer.attention.kv_scale = scale
    model.lm_head = sim("lm_head")
    state = {n: tensors[n].float() for n, _ in model.named_parameters()}
    model.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # pragma: no cover - a reference-model change this module does not know about
        raise RuntimeError(f"simulated model has unloaded parameters: {leftover[:3]}")
    return model.eval()
