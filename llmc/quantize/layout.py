"""How quantized linears are stored in a checkpoint, and a canonical unpacked view of them.

This is the one module that knows the byte layout. Everything that consumes a quantized
checkpoint (the fake-quant simulation in `llmc.quantize.simulate`, the engine builder) calls
`read_quantized_linear` and works on the `QLinear` it returns, never on packed tensors.

Stored layout (TensorRT-LLM checkpoint, the same as ModelOpt's `export_tensorrt_llm_checkpoint`),
for a linear at `prefix` (e.g. `transformer.layers.0.attention.qkv`) with weight [out, in]:

    quant_algo   prefix.weight        weights_scaling_factor  activation_scaling_factor  other
    FP8          F8_E4M3 [out, in]    F32 [1]                 F32 [1]
    FP8_PER_CHANNEL_PER_TOKEN
                 F8_E4M3 [out, in]    per_channel_scale F32 [out] (ModelOpt / TensorRT-LLM's name); activations
                                      FP8 per token, scale amax(|x_row|) / 448 computed at run time
    W8A8_SQ_*    I8 [out, in]         F32 [out]               F32 [1]                    prequant_scaling_factor [in]
    W8A16        I8 [out, in]         F32 [out]               -
    W4A16_AWQ    I8 [out/2, in]       F32 [out, in/group]     -                          prequant_scaling_factor [in] (AWQ only)
    W4A8_AWQ     I8 [out/2, in]       F32 [out, in/group]     F32 [1]                    prequant_scaling_factor [in],
                                                                                         weights_scaling_factor_2 F32 [1]
    W4A16_GPTQ   I8 [out/2, in]       F32 [out, in/group]     -                          zero F32 [out, in/group]
    W8A16_GPTQ   I8 [out, in]         F32 [out, in/group]     -                          zero F32 [out, in/group] (optional)

- Groupwise with zero points (TensorRT-LLM's W4A16_GPTQ / W8A16_GPTQ, config has_zero_point):
  real = stored * scale + zero per (row, group), the additive "scale and zeros" form of
  TensorRT-LLM's fine-grained weight-only GEMM. An asymmetric 4-bit code u in [0, 15] with
  real = d * u + m (GGUF Q4_1, min/max round-to-nearest) is stored as q = u - 8 with scale d and
  zero = m + 8 d, so the INT4 values keep the symmetric [-8, 7] packing below.

- Scales are "dequantize" multipliers: real = stored * scale; scale = amax / bound with bound
  448 (FP8 E4M3), 127 (INT8), 7 (INT4). INT8/INT4 are symmetric, no zero point, rounded half to
  even and clamped to [-128, 127] / [-8, 7].
- INT4 packing (`pack_int4_row_pairs`): two signed 4-bit values per byte, pairing consecutive OUTPUT rows:
  byte[j, i] = (q[2j, i] & 0xF) | (q[2j+1, i] & 0xF) << 4, stored as int8 [out/2, in]. Groups run
  along the input dimension (K): scale[o, i // group].
- prequant_scaling_factor (AWQ, SmoothQuant) multiplies the activation before it is quantized:
  y = Q(x * pqs) @ W_q^T. It is stored in the checkpoint's float dtype.
- W4A8_AWQ, as TensorRT-LLM executes it: the INT4 weight is turned into FP8 per group,
  w8 = fp8(q * weights_scaling_factor / weights_scaling_factor_2), the activation into FP8 with
  activation_scaling_factor, and the FP8 GEMM output is scaled by
  activation_scaling_factor * weights_scaling_factor_2.
- Fused layers share inputs: attention.qkv is one linear; mlp.fc (= HF gate_proj) and mlp.gate
  (= HF up_proj) are two tensors in the file but llmc calibrates them as one, so their
  activation_scaling_factor and prequant_scaling_factor are equal (and their per-tensor FP8
  weight scales too).
- KV cache: `transformer.layers.{i}.attention.kv_cache_scaling_factor` F32 [1] (= max of the
  k_/v_cache_scaling_factor beside it); K (after RoPE) and V are stored as fp8(k / s) or
  clamp(round(k / s), -128, 127). llmc writes FP8 KV scales clamped to >= 1, as ModelOpt does.

The canonical view (`QLinear`) is unpacked: integer values as int8 [out, in] (INT4 values in
[-8, 7]), FP8 values as a float8_e4m3fn tensor [out, in], every scale as float32. It is the one
quantized-linear type: the simulation (`llmc.quantize.simulate`) and the engine's graph emitter
(`llmc.plugins.linear.emit_linear`) both consume it; which tensors each quant_algo stores comes
from `llmc.checkpoint.quant_algos.QUANT_ALGOS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmc.checkpoint.quant_algos import QUANT_ALGOS
from llmc.checkpoint.schema import LAYER
from llmc.errors import LlmcError
from llmc.quantize.formats import FP8_MAX

# ------------------------------------------------------------------------------------------
# Primitives (used by export to write, and here to read)
# ------------------------------------------------------------------------------------------


def quantize_int(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest-even: clamp(round(w / scale), -2^(b-1), 2^(b-1)-1) as int8.

    `scale` broadcasts against w: [] / [out, 1] / [out, in] (expand group scales first).
    """
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.round(w.float() / scale.float()).clamp(lo, hi).to(torch.int8)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8_e4m3fn(w / scale), saturating at +-448 (round to nearest even)."""
    return (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """The float32 value of x rounded to FP8 E4M3 (saturating)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def expand_groups(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, in/g] group scales -> [out, in]."""
    groups = scale.shape[-1]
    return scale.repeat_interleave(in_features // groups, dim=-1)


def pack_int4_row_pairs(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> int8 [out/2, in], rows 2j (low nibble) and 2j+1 (high):
    TensorRT-LLM's checkpoint layout (not ONNX's INT4, see `llmc.plugins.graph.pack_int4_onnx`)."""
    if q.shape[0] % 2:
        raise ValueError(f"cannot pack INT4 weights with an odd number of output rows ({q.shape[0]})")
    u = q.to(torch.int16) & 0xF
    return (u[0::2] | (u[1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4_row_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_row_pairs: int8 [out/2, in] -> int8 values in [-8, 7], [out, in]."""
    u = packed.view(torch.uint8).to(torch.int16)
    lo, hi = u & 0xF, (u >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.empty((packed.shape[0] * 2, *packed.shape[1:]), dtype=torch.int16)
    out[0::2], out[1::2] = lo, hi
    return out.to(torch.int8)


# ------------------------------------------------------------------------------------------
# The canonical view
# ------------------------------------------------------------------------------------------

@dataclass
class QLinear:
    """One linear layer of a checkpoint, unpacked. All scales float32 torch tensors.

    kind:            "float" (not quantized: excluded layer) or the quant_algo's `kind` in
                     `QUANT_ALGOS` ("fp8", "int8_sq", "w8a16", "int4_awq", "w4a16", "w4a8_awq");
                     `weight_format(kind)` gives the stored weight format.
    weight:          [out, in]. float (kind "float"); torch.float8_e4m3fn (fp8); int8 (int8
                     kinds; INT4 kinds hold values in [-8, 7]).
    weight_scale:    dequantize multiplier of `weight`: shape [] (per tensor), [out] (per output
                     channel) or [out, in // group_size] (INT4 groups along the input dim).
                     For w4a8_awq it is the per-group scale of the FP8-converted weight, i.e.
                     weights_scaling_factor / weights_scaling_factor_2 (TensorRT-LLM's runtime form).
    weight_scale_2:  [] for w4a8_awq (FP8 weight scale; [out] after `concat_out` of linears whose
                     scales differ), else None.
    group_size:      INT4 group size along the input dim, else None.
    pre_quant_scale: [in] multiplied into the activation first (AWQ / SmoothQuant), else None.
    act_dtype:       None (activations stay float) | "int8" | "fp8".
    act_granularity: "tensor": static per-tensor scale `input_scale`; "token": dynamic per-token
                     scale amax(|row|) / 127 computed at run time (`input_scale` is then the
                     calibrated static scale, kept for reference only).
    input_scale:     [] activation scale, or None.
    bias:            [out] float or None (never quantized).
    zero:            [out, in // group_size] additive zero of groupwise formats with zero points
                     (W4A16_GPTQ / W8A16_GPTQ): real = q * scale + zero. None: symmetric.

    `dequantize()` gives the exact float32 weight the engine multiplies with the (pre-scaled,
    fake-quantized) activation; `simulate.SimLinear` shows the whole computation.
    """

    prefix: str
    kind: str
    weight: torch.Tensor
    weight_scale: torch.Tensor | None = None
    weight_scale_2: torch.Tensor | None = None
    group_size: int | None = None
    pre_quant_scale: torch.Tensor | None = None
    act_dtype: str | None = None
    act_granularity: str | None = None
    input_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    zero: torch.Tensor | None = None   # [out, in // group_size] additive (real = q * scale + zero)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def expanded_weight_scale(self) -> torch.Tensor:
        """weight_scale broadcast to [out, in]."""
        s = self.weight_scale.float()
        if s.dim() == 0 or s.numel() == 1:
            return s.reshape(()).expand(self.out_features, self.in_features)
        if s.dim() == 1:
            return s[:, None].expand(self.out_features, self.in_features)
        return expand_groups(s, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the engine computes with (input side: x * pre_quant_scale)."""
        if self.kind == "float":
            return self.weight.float()
        w = self.weight.float() * self.expanded_weight_scale()
        if self.zero is not None:
            w = w + expand_groups(self.zero.float(), self.in_features)
        if self.weight_scale_2 is not None:  # W4A8: INT4 -> FP8 per group, then the FP8 scale
            w = fp8_round(w) * _per_row(self.weight_scale_2.float())
        return w

    def as_fp8(self) -> "QLinear":
        """W4A8 as TensorRT-LLM executes it: the INT4 weight becomes FP8 per group,
        fp8(q * weights_scaling_factor / weights_scaling_factor_2), scaled by weights_scaling_factor_2:
        an FP8 linear with exactly the values `dequantize()` uses (the engine's lowering)."""
        if self.weight_scale_2 is None:
            raise ValueError(f"{self.prefix}: only a two-level (W4A8) weight scale lowers to FP8")
        values = fp8_round(self.weight.float() * self.expanded_weight_scale()).to(torch.float8_e4m3fn)
        return QLinear(self.prefix, QUANT_ALGOS["FP8"].kind, values, self.weight_scale_2, None, None,
                       self.pre_quant_scale, self.act_dtype, self.act_granularity, self.input_scale, self.bias)

    def scale_per_row(self) -> torch.Tensor:
        """A per-tensor or per-channel weight_scale as [out] (per-tensor scales repeated)."""
        s = self.weight_scale.float()
        return s.reshape(()).expand(self.out_features).clone() if s.numel() == 1 else s.reshape(-1)

    def effective_weight(self) -> torch.Tensor:
        """dequantize() folded with pre_quant_scale: the weight seen by the raw input x."""
        w = self.dequantize()
        return w * self.pre_quant_scale.float()[None, :] if self.pre_quant_scale is not None else w


def _per_row(s: torch.Tensor) -> torch.Tensor:
    """A [] or [out] scale, broadcastable against [out, in]."""
    return s[:, None] if s.dim() == 1 else s


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or torch.equal(a, b))


def concat_out(parts: list[QLinear]) -> QLinear:
    """Linears sharing an input (gated MLP fc + gate) stacked along the output dim: one matmul.

    Per-tensor weight scales (and W4A8's weights_scaling_factor_2) become per-row vectors; group
    scales and zero points stack. The activation treatment (kind, activation quantization and
    scale, pre-quant scale, group size) must agree, as it does for llmc checkpoints (the reference
    model calibrates gate_up as one linear); otherwise ValueError.
    """
    first = parts[0]
    for p in parts[1:]:
        if (p.kind, p.act_dtype, p.act_granularity, p.group_size) != \
                (first.kind, first.act_dtype, first.act_granularity, first.group_size):
            raise ValueError("linears sharing an input are quantized differently")
        if not _same(p.input_scale, first.input_scale):
            raise ValueError("linears sharing an input have different activation scales")
        if not _same(p.pre_quant_scale, first.pre_quant_scale):
            raise ValueError("linears sharing an input have different pre-quant scales")
        if (p.weight_scale_2 is None) != (first.weight_scale_2 is None):
            raise ValueError("linears sharing an input are quantized differently")

    def rows(get, fill) -> torch.Tensor | None:
        if all(get(p) is None for p in parts):
            return None
        return torch.cat([get(p) if get(p) is not None else fill(p) for p in parts], 0)

    scale = None
    if first.weight_scale is not None:
        grouped = first.weight_scale.dim() == 2
        scale = rows(lambda p: p.weight_scale if grouped else p.scale_per_row(), None)
    s2 = rows(lambda p: None if p.weight_scale_2 is None else
              p.weight_scale_2.float().reshape(-1).expand(p.out_features), None)
    zero = rows(lambda p: p.zero, lambda p: torch.zeros_like(p.weight_scale, dtype=torch.float32))
    bias = rows(lambda p: p.bias, lambda p: torch.zeros(p.out_features))
    return QLinear("+".join(p.prefix for p in parts), first.kind, torch.cat([p.weight for p in parts], 0),
                   scale, s2, first.group_size, first.pre_quant_scale, first.act_dtype, first.act_granularity,
                   first.input_scale, bias, zero)


def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32)


def _scalar(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() != 1:
        raise LlmcError(f"expected a per-tensor scale, got shape {tuple(t.shape)}")
    return _f32(t).reshape(())


def read_quantized_linear(tensors: dict[str, torch.Tensor], prefix: str, quant_config: Any) -> QLinear:
    """The canonical `QLinear` of the linear `prefix` (no trailing dot) of a checkpoint.

    tensors: merged checkpoint tensors (`Checkpoint.merged_tensors()`); quant_config: the config's
    quantization block (`ckpt.config.quantization` or its dict). A linear whose weight is stored
    in a float dtype (an excluded module) comes back as kind "float". Which tensors an algo stores
    comes from `QUANT_ALGOS`; how each storage type is unpacked, from `_READERS`.
    """
    algo = _get(quant_config, "quant_algo")
    try:
        weight = tensors[prefix + ".weight"]
    except KeyError:
        raise LlmcError(f"checkpoint has no tensor {prefix}.weight") from None
    bias = tensors.get(prefix + ".bias")
    bias = _f32(bias) if bias is not None else None
    if weight.is_floating_point() and weight.dtype != torch.float8_e4m3fn or algo is None:
        return QLinear(prefix, "float", weight, bias=bias)
    if algo not in QUANT_ALGOS:
        raise LlmcError(f"quant_algo {algo!r} is not supported (llmc reads {', '.join(QUANT_ALGOS)})")
    spec = QUANT_ALGOS[algo]

    def t(name: str, required: bool = True) -> torch.Tensor | None:
        full = f"{prefix}.{name}"
        if full not in tensors:
            if required:
                raise LlmcError(f"quantized checkpoint ({algo}) is missing {full}")
            return None
        return tensors[full]

    wsf = _f32(t(spec.weight_scale))
    pqs = _f32(t("prequant_scaling_factor", required=False))
    asf = _scalar(t("activation_scaling_factor", required=spec.static_activations))
    q = QLinear(prefix, spec.kind, weight, pre_quant_scale=pqs, act_dtype=spec.act,
                act_granularity=spec.act_granularity, input_scale=asf, bias=bias)
    _READERS[spec.weight](q, spec, wsf, t, quant_config)
    return q


def _read_fp8(q: QLinear, spec, wsf: torch.Tensor, t, quant_config) -> None:
    if q.weight.dtype != torch.float8_e4m3fn:  # older exports stored the FP8 bits as int8
        q.weight = q.weight.view(torch.float8_e4m3fn)
    q.weight_scale = wsf.reshape(()) if wsf.numel() == 1 else wsf.reshape(-1)


def _read_int8(q: QLinear, spec, wsf: torch.Tensor, t, quant_config) -> None:
    weight, prefix = q.weight, q.prefix
    if spec.act is None and wsf.dim() == 2:  # groupwise INT8 (W8A16_GPTQ; GGUF Q8_0 blocks)
        if weight.dtype != torch.int8 or weight.shape[0] != wsf.shape[0] or weight.shape[1] % wsf.shape[1]:
            raise LlmcError(f"{prefix}: groupwise INT8 weight {tuple(weight.shape)} {weight.dtype} does not fit "
                            f"scales {tuple(wsf.shape)}")
        q.weight_scale, q.group_size = wsf, weight.shape[1] // wsf.shape[1]
        q.zero = _zero(t("zero", required=False), wsf)
        return
    if weight.dtype != torch.int8:
        raise LlmcError(f"{prefix}.weight: expected I8 for {spec.name}, found {weight.dtype}")
    q.weight_scale = wsf.reshape(()) if wsf.numel() == 1 else wsf.reshape(-1)
    if q.weight_scale.dim() == 1 and q.weight_scale.numel() != weight.shape[0]:
        raise LlmcError(f"{prefix}.{spec.weight_scale} has {wsf.numel()} values for "
                        f"{weight.shape[0]} output channels")


def _read_int4(q: QLinear, spec, wsf: torch.Tensor, t, quant_config) -> None:
    prefix = q.prefix
    if q.weight.dtype not in (torch.int8, torch.uint8):
        raise LlmcError(f"{prefix}.weight: expected packed INT4 (I8) for {spec.name}, found {q.weight.dtype}")
    values = unpack_int4_row_pairs(q.weight)
    out_f, in_f = values.shape
    if wsf.dim() != 2 or wsf.shape[0] != out_f or in_f % wsf.shape[1]:
        raise LlmcError(f"{prefix}.{spec.weight_scale} has shape {tuple(wsf.shape)}, which does not "
                        f"fit an INT4 weight of [{out_f}, {in_f}]")
    q.weight = values
    q.group_size = in_f // wsf.shape[1]
    cfg_group = _get(quant_config, "group_size")
    if cfg_group and cfg_group != q.group_size:
        raise LlmcError(f"{prefix}: scales imply group size {q.group_size}, config.json says {cfg_group}")
    if spec.weight_scale_2:
        s2 = _scalar(t("weights_scaling_factor_2"))
        q.weight_scale_2 = s2
        q.weight_scale = wsf / s2
    else:
        q.weight_scale = wsf
        q.zero = _zero(t("zero", required=bool(_get(quant_config, "has_zero_point"))), wsf)


# Storage type -> how its weight and scales are unpacked into the canonical view.
_READERS = {"fp8": _read_fp8, "int8": _read_int8, "int4": _read_int4}


def _zero(zero: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    if zero is None:
        return None
    if tuple(zero.shape) != tuple(scale.shape):
        raise LlmcError(f"zero points of shape {tuple(zero.shape)} do not match the scales' {tuple(scale.shape)}")
    return _f32(zero)


def kv_cache_scale(tensors: dict[str, torch.Tensor], layer: int) -> torch.Tensor | None:
    """The KV cache scale of a layer ([] float32), or None when the KV cache is not quantized."""
    name = LAYER.format(i=layer) + "attention.kv_cache_scaling_factor"
    return _scalar(tensors[name]) if name in tensors else None
