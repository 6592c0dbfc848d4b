"""Calibrated ModelOpt quantizer states -> TensorRT-LLM checkpoint tensors.

Input: the reference model after `llmc.quantize.ptq.calibrate` (its linears are ModelOpt
QuantLinears holding amax / pre_quant_scale, with SmoothQuant/AWQ weights already rescaled) and
the source checkpoint's float tensors. Output: the tensor dict of the quantized checkpoint, in
the layout `llmc.quantize.layout` documents (the same names, shapes and dtypes as ModelOpt's
`export_tensorrt_llm_checkpoint`).

Rules (scale = amax / bound, bound 448 / 127 / 7; zero or NaN amax -> bound, as ModelOpt does):
- weights are quantized from the calibrated (smoothed) float32 weight with the exported scale,
  round half to even, clamped; INT4 is packed two per byte along the output dim;
- mlp.gate_up is split back into mlp.fc (first `intermediate_size` rows) and mlp.gate; they share
  the activation scale, pre-quant scale and any per-tensor weight scale;
- prequant_scaling_factor is stored in the checkpoint dtype (as ModelOpt does), every other scale
  in float32; non-linear tensors (embedding, norms, biases, excluded linears) are copied as-is;
- KV cache: k_/v_cache_scaling_factor = amax / bound (FP8 clamped to >= 1, ModelOpt's rule) and
  kv_cache_scaling_factor = their max.
"""

from __future__ import annotations

import torch
from torch import nn

from llmc.checkpoint.quant_algos import BOUNDS, KV_CACHE_ALGOS, QuantAlgo
from llmc.checkpoint.schema import LAYER
from llmc.quantize.formats import FP8_MAX, INT4_MAX, INT8_MAX, QFormat
from llmc.quantize.layout import expand_groups, pack_int4_row_pairs, quantize_fp8, quantize_int

# The reference model runs mlp.fc and mlp.gate (which share an input) as one linear, mlp.gate_up.
FUSED = {"mlp.gate_up": ("mlp.fc", "mlp.gate")}


def checkpoint_names(module_name: str) -> list[str]:
    """Reference-model linear -> the checkpoint linear(s) it is stored as."""
    for fused, parts in FUSED.items():
        if module_name.endswith("." + fused):
            return [module_name[: -len(fused)] + p for p in parts]
    return [module_name]


def module_name(checkpoint_name: str) -> str:
    """Checkpoint linear -> the reference-model linear that computes it (inverse of checkpoint_names)."""
    for fused, parts in FUSED.items():
        for p in parts:
            if checkpoint_name.endswith("." + p):
                return checkpoint_name[: -len(p)] + fused
    return checkpoint_name


def _amax(quantizer, bound: float) -> torch.Tensor:
    a = quantizer.amax.detach().float()
    return torch.nan_to_num(torch.where(a == 0, torch.full_like(a, bound), a), nan=bound)


def export_linear(module: nn.Module, fmt: QFormat, ckpt_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors (suffix -> tensor) of one calibrated QuantLinear, before any fc/gate split."""
    w = module.weight.detach().float()
    out_f, in_f = w.shape
    wq = module.weight_quantizer
    out: dict[str, torch.Tensor] = {}
    scale_name = fmt.algo.weight_scale
    if fmt.weight_dtype == "fp8" and fmt.weight_granularity == "channel":
        s = (_amax(wq, FP8_MAX) / FP8_MAX).reshape(out_f)
        out["weight"] = quantize_fp8(w, s[:, None])
        out[scale_name] = s
    elif fmt.weight_dtype == "fp8":
        s = (_amax(wq, FP8_MAX) / FP8_MAX).reshape(1)
        out["weight"] = quantize_fp8(w, s)
        out[scale_name] = s
    elif fmt.weight_dtype == "int8":
        s = (_amax(wq, INT8_MAX) / INT8_MAX).reshape(out_f)
        out["weight"] = quantize_int(w, s[:, None], 8)
        out[scale_name] = s
    elif fmt.zero_point:  # AWQ-smoothed weight, asymmetric min/max groups (ModelOpt's amax unused)
        out.update(rtn_asymmetric(w, in_f // (wq.amax.numel() // out_f)))
    else:  # int4, possibly with a second (FP8 per-tensor) stage
        block_q = wq[0] if fmt.weight_scale_2 else wq
        groups = block_q.amax.numel() // out_f
        s = (_amax(block_q, INT4_MAX) / INT4_MAX).reshape(out_f, groups)
        if in_f % groups:
            raise ValueError(f"block amax of {groups} groups does not tile {in_f} inputs")
        out["weight"] = pack_int4_row_pairs(quantize_int(w, expand_groups(s, in_f), 4))
        out[scale_name] = s
        if fmt.weight_scale_2:
            out["weights_scaling_factor_2"] = (_amax(wq[1], FP8_MAX) / FP8_MAX).reshape(1)
    iq = module.input_quantizer
    pqs = getattr(iq, "_pre_quant_scale", None)
    if pqs is not None and getattr(iq, "_enable_pre_quant_scale", True):
        out["prequant_scaling_factor"] = pqs.detach().reshape(in_f).to(ckpt_dtype)
    if fmt.act_dtype is not None and iq.is_enabled and iq.amax is not None:
        bound = BOUNDS[fmt.act_dtype]
        out["activation_scaling_factor"] = (_amax(iq, bound).max() / bound).reshape(1)
    return out


def _split_rows(tensors: dict[str, torch.Tensor], rows: int, algo: QuantAlgo) -> tuple[dict, dict]:
    """Split a fused [fc; gate] linear's tensors at output row `rows`."""
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if k == "weight" and algo.packed:  # packed INT4: two rows per byte
            a[k], b[k] = t[: rows // 2].contiguous(), t[rows // 2:].contiguous()
        elif k in ("weight", "zero") or (k == algo.weight_scale and t.numel() > 1):
            a[k], b[k] = t[:rows].contiguous(), t[rows:].contiguous()
        else:  # shared: per-tensor weight scale, activation scale, pre-quant scale, scale_2
            a[k], b[k] = t.clone(), t.clone()
    return a, b


def kv_scales(attention: nn.Module, kv_algo: str) -> dict[str, torch.Tensor]:
    kv = KV_CACHE_ALGOS[kv_algo]
    bound = kv.bound
    scales = {}
    for which in ("k", "v"):
        s = (_amax(getattr(attention, f"{which}_bmm_quantizer"), bound).max() / bound).reshape(1)
        if kv.min_scale:
            s = torch.clamp(s, min=kv.min_scale)
        scales[f"{which}_cache_scaling_factor"] = s
    scales["kv_cache_scaling_factor"] = torch.maximum(scales["k_cache_scaling_factor"],
                                                      scales["v_cache_scaling_factor"])
    return scales


def export_tensors(model: nn.Module, source: dict[str, torch.Tensor], fmt: QFormat, *,
                   quantized_modules: list[str], kv_algo: str | None, intermediate_size: int,
                   num_layers: int, ckpt_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the quantized checkpoint (merged, tp 1)."""
    out: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for mod_name in quantized_modules:
        module = model.get_submodule(mod_name)
        tensors = export_linear(module, fmt, ckpt_dtype)
        targets = checkpoint_names(mod_name)
        parts = list(_split_rows(tensors, intermediate_size, fmt.algo)) if len(targets) == 2 else [tensors]
        for target, part in zip(targets, parts):
            for suffix, t in part.items():
                out[f"{target}.{suffix}"] = t
            replaced.add(f"{target}.weight")
    for name, t in source.items():  # everything not quantized, as it was
        if name not in replaced:
            out[name] = t
    if kv_algo:
        for i in range(num_layers):
            attn = model.get_submodule(LAYER.format(i=i) + "attention")
            for suffix, t in kv_scales(attn, kv_algo).items():
                out[LAYER.format(i=i) + "attention." + suffix] = t
    return out


def rtn_asymmetric(w: torch.Tensor, group: int, bits: int = 4) -> dict[str, torch.Tensor]:
    """Asymmetric min/max round-to-nearest per (row, group of `group` inputs), llama.cpp Q4_1's
    rule: d = (max - min) / (2^bits - 1), u = clamp(round((w - min) / d), 0, 2^bits - 1), real =
    d * u + min. Stored in the zero-point layout (`llmc.quantize.layout`): q = u - 2^(bits-1),
    weights_scaling_factor d, zero = min + 2^(bits-1) d. A group of equal values gets d = 1."""
    out_f, in_f = w.shape
    levels = 2 ** bits - 1
    half = 2 ** (bits - 1)
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(lo))
    u = torch.round((g - lo[..., None]) / d[..., None]).clamp(0, levels)
    q = (u - half).to(torch.int8).reshape(out_f, in_f)
    return {"weight": pack_int4_row_pairs(q) if bits == 4 else q, "weights_scaling_factor": d,
            "zero": lo + half * d}
