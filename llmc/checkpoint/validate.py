"""Check a checkpoint's tensors against its config before anything is built from them.

A damaged or hand-edited checkpoint must fail with one line naming the tensor, not build an
engine that prints garbage. Checked, for every linear, norm and embedding the config implies
(`llmc.checkpoint.schema`):
- presence and shape (packed INT4 weights hold out/2 rows; group scales [out, in / group]);
- dtype per quant_algo (`llmc.checkpoint.quant_algos.QUANT_ALGOS`): quantized weights in their
  integer/FP8 dtype, excluded linears, norms and embeddings in a float dtype (a quantized layer
  norm is refused); the weight scale under the algo's tensor name;
- every float tensor finite (no NaN/Inf), every scale finite and > 0.
"""

from __future__ import annotations

import torch

from llmc.checkpoint.config import CheckpointConfig
from llmc.checkpoint.quant_algos import QUANT_ALGOS, QuantAlgo
from llmc.checkpoint.schema import LAYER, float_shapes, linear_shapes
from llmc.errors import LlmcError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_MARK = "scaling_factor"


def _stored_dtypes(algo: QuantAlgo) -> tuple[torch.dtype, ...]:
    return tuple(getattr(torch, name) for name in algo.stored_dtypes)


def _finite(name: str, t: torch.Tensor, source) -> None:
    if t.dtype in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
        raise LlmcError(f"tensor {name} holds NaN or Inf values", source)


def _check_scale(name: str, t: torch.Tensor, source) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise LlmcError(f"scale {name} has dtype {t.dtype}, expected a float dtype", source)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise LlmcError(f"scale {name} holds NaN, Inf, zero or negative values (scales must be finite and > 0)",
                        source)


def _check_linear(prefix: str, out_in: tuple[int, int], tensors: dict[str, torch.Tensor], algo: str | None,
                  group_size: int | None, source, has_zero_point: bool = False) -> None:
    out_f, in_f = out_in
    name = prefix + ".weight"
    if name not in tensors:
        raise LlmcError(f"missing tensor {name}", source)
    w = tensors[name]
    if w.dtype in FLOAT_DTYPES:  # unquantized (or excluded) linear
        if tuple(w.shape) != out_in:
            raise LlmcError(f"tensor {name} has shape {tuple(w.shape)}, expected {out_in}", source)
        _finite(name, w, source)
        return
    if algo is None:
        raise LlmcError(f"tensor {name} has dtype {w.dtype} but the checkpoint is not quantized", source)
    spec = QUANT_ALGOS[algo]
    dtypes = _stored_dtypes(spec)
    if w.dtype not in dtypes:
        raise LlmcError(f"tensor {name} has dtype {w.dtype}; {algo} stores "
                        f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}", source)
    want = (out_f // 2, in_f) if spec.packed else out_in
    if tuple(w.shape) != want:
        raise LlmcError(f"tensor {name} has shape {tuple(w.shape)}, {algo} needs {want}", source)
    wsf_name = prefix + "." + spec.weight_scale
    if wsf_name not in tensors:
        raise LlmcError(f"quantized checkpoint ({algo}) is missing {wsf_name}", source)
    wsf = tensors[wsf_name]
    if spec.weight_granularity != "group" and wsf.numel() not in (1, out_f):  # readers take either
        raise LlmcError(f"scale {wsf_name} has {wsf.numel()} values for {out_f} output channels", source)
    if spec.weight_granularity == "group":
        g = group_size or 0
        if g < 1 or in_f % g or tuple(wsf.shape) != (out_f, in_f // g):
            raise LlmcError(f"scale {wsf_name} has shape {tuple(wsf.shape)}, group size {group_size} needs "
                            f"({out_f}, {in_f // g if g >= 1 else '?'})", source)
    for key, t in tensors.items():
        if key.startswith(prefix + ".") and (SCALE_MARK in key or key == wsf_name):
            _check_scale(key, t, source)
    if has_zero_point:  # additive zero points, one per (row, group) like the weight scale
        zero = tensors.get(prefix + ".zero")
        if zero is None or tuple(zero.shape) != tuple(wsf.shape):
            raise LlmcError(f"has_zero_point is set but {prefix}.zero is "
                            f"{'missing' if zero is None else f'of shape {tuple(zero.shape)}'}; "
                            f"it must match {wsf_name} {tuple(wsf.shape)}", source)
        _finite(prefix + ".zero", zero, source)


def validate_tensors(tensors: dict[str, torch.Tensor], cfg: CheckpointConfig, source=None) -> None:
    """LlmcError naming the first tensor that does not fit `cfg` (see module doc)."""
    q = cfg.quantization
    algo = q.quant_algo
    if algo is not None and algo not in QUANT_ALGOS:
        raise LlmcError(f"quant_algo {algo!r} is not supported (llmc reads {', '.join(QUANT_ALGOS)})", source)
    if q.has_zero_point and algo is not None and not QUANT_ALGOS[algo].zero_point:
        raise LlmcError(f"has_zero_point is set but {algo} carries no zero points "
                        f"(those that do: {', '.join(a for a, s in QUANT_ALGOS.items() if s.zero_point)})", source)
    for name, shape in float_shapes(cfg).items():
        if name not in tensors:
            raise LlmcError(f"missing tensor {name}", source)
        t = tensors[name]
        if t.dtype not in FLOAT_DTYPES:
            raise LlmcError(f"tensor {name} has dtype {t.dtype}: embeddings and layer norms must stay float "
                            "(they are never quantized)", source)
        if tuple(t.shape) != shape:
            raise LlmcError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}", source)
        _finite(name, t, source)
    shapes = linear_shapes(cfg)
    if "lm_head.weight" not in tensors and cfg.tie_word_embeddings:
        shapes.pop("lm_head")
    for prefix, out_in in shapes.items():
        _check_linear(prefix, out_in, tensors, algo, q.group_size, source, bool(q.has_zero_point))
        bias = tensors.get(prefix + ".bias")
        if bias is not None:
            if bias.dtype not in FLOAT_DTYPES or tuple(bias.shape) != (out_in[0],):
                raise LlmcError(f"tensor {prefix}.bias must be float of shape ({out_in[0]},)", source)
            _finite(prefix + ".bias", bias, source)
    for i in range(cfg.num_hidden_layers):
        name = LAYER.format(i=i) + "attention.kv_cache_scaling_factor"
        if name in tensors:
            _check_scale(name, tensors[name], source)
        elif q.kv_cache_quant_algo:
            raise LlmcError(f"KV-cache-quantized checkpoint ({q.kv_cache_quant_algo}) is missing {name}", source)
