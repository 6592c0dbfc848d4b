"""Every quantization llmc reads, writes and builds: one table keyed by TensorRT-LLM's quant_algo.

A checkpoint's config.json names its scheme with TensorRT-LLM's `QuantAlgo` string
(`quantization.quant_algo`) and its KV cache with `kv_cache_quant_algo`. Like TensorRT-LLM's
`QuantMode`, which turns that string into flags every layer consults, `QUANT_ALGOS` turns it into
the facts every llmc module needs, so no module keeps its own list:

- `llmc.quantize.formats`: each `--qformat` points at one entry (what it writes);
- `llmc.quantize.layout`: how a linear of that algo is read back (`QLinear`);
- `llmc.checkpoint.validate`: which dtypes, shapes and scale tensors a checkpoint must hold;
- `llmc.engine` / `llmc.plugins.linear`: which GEMM the graph runs, the builder's labels and flags.

Plain data, no torch: the lowest modules (checkpoint validation, `llmc --help`) import it freely.
Adding a quant_algo: a row here, its read rule in `llmc.quantize.layout`, its lowering in
`llmc.plugins.linear`, and (to write it) a `QFormat` plus its export rule in `llmc.quantize.export`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Largest representable magnitude of each storage type (scale = amax / bound).
BOUNDS: dict[str, float] = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}

# torch dtype names a stored weight of each storage type may have (INT4: two values per int8 byte).
STORED_DTYPES: dict[str, tuple[str, ...]] = {"fp8": ("float8_e4m3fn",), "int8": ("int8",), "int4": ("int8", "uint8")}


@dataclass(frozen=True)
class QuantAlgo:
    """One TensorRT-LLM quant_algo: how its linears are stored and how the engine runs them.

    kind:               short label (`QLinear.kind`, the engine config's "quantization", the
                        TensorRT builder flags); algos that differ only in granularity share it.
    weight:             storage of the weight: "fp8" | "int8" | "int4" (packed two per byte).
    weight_granularity: "tensor" | "channel" (one scale per output row) | "group" (per (row, group
                        of inputs)). Readers also accept a per-channel vector for "tensor".
    weight_scale:       name of the weight-scale tensor (`{prefix}.{weight_scale}`).
    act:                activation quantization: None (stays float) | "int8" | "fp8".
    act_granularity:    "tensor" (static, calibrated activation_scaling_factor) | "token"
                        (dynamic, amax of each row / bound at run time).
    pre_quant_scale:    linears may carry prequant_scaling_factor (AWQ, SmoothQuant).
    zero_point:         groups may carry additive zero points (`zero`, config has_zero_point).
    weight_scale_2:     a second, per-tensor FP8 weight scale (W4A8: INT4 -> FP8 per group).
    legacy_dtypes:      extra stored dtypes older exports used (FP8 bits stored as int8).
    """

    name: str
    kind: str
    weight: str
    weight_granularity: str
    act: str | None = None
    act_granularity: str | None = None
    weight_scale: str = "weights_scaling_factor"
    pre_quant_scale: bool = False
    zero_point: bool = False
    weight_scale_2: bool = False
    legacy_dtypes: tuple[str, ...] = ()

    @property
    def stored_dtypes(self) -> tuple[str, ...]:
        """torch dtype names the stored weight may have."""
        return STORED_DTYPES[self.weight] + self.legacy_dtypes

    @property
    def packed(self) -> bool:
        """INT4: the stored weight holds two output rows per byte ([out / 2, in])."""
        return self.weight == "int4"

    @property
    def gemm(self) -> str:
        """The weight format the engine multiplies with: W4A8 runs as FP8 x FP8, the INT4 weight
        turned into FP8 per group (TensorRT-LLM's execution); every other algo as stored."""
        return "fp8" if self.weight_scale_2 else self.weight

    @property
    def integer(self) -> bool:
        """Runs on integer kernels (ONNX Runtime's MatMulNBits / MatMulInteger)."""
        return self.gemm in ("int8", "int4")

    @property
    def static_activations(self) -> bool:
        """Needs a calibrated activation_scaling_factor."""
        return self.act is not None and self.act_granularity != "token"


QUANT_ALGOS: dict[str, QuantAlgo] = {a.name: a for a in [
    QuantAlgo("FP8", "fp8", "fp8", "tensor", "fp8", "tensor", legacy_dtypes=("int8",)),
    QuantAlgo("FP8_PER_CHANNEL_PER_TOKEN", "fp8", "fp8", "channel", "fp8", "token",
              weight_scale="per_channel_scale"),  # ModelOpt / TensorRT-LLM's name for this scale
    QuantAlgo("W8A8_SQ_PER_CHANNEL", "int8_sq", "int8", "channel", "int8", "tensor", pre_quant_scale=True),
    QuantAlgo("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "int8_sq", "int8", "channel", "int8", "token",
              pre_quant_scale=True),
    QuantAlgo("W8A16", "w8a16", "int8", "channel"),
    QuantAlgo("W4A16_AWQ", "int4_awq", "int4", "group", pre_quant_scale=True, zero_point=True),  # zeros: int4_awq_asym
    QuantAlgo("W4A8_AWQ", "w4a8_awq", "int4", "group", "fp8", "tensor", pre_quant_scale=True,
              weight_scale_2=True),
    QuantAlgo("W4A16_GPTQ", "w4a16", "int4", "group", zero_point=True),    # int4_asym, GGUF Q4_1
    QuantAlgo("W8A16_GPTQ", "w8a16", "int8", "group", zero_point=True),    # GGUF Q8_0 blocks
]}

# Label -> the algos' shared facts (weight, act, gemm agree within a kind; a test checks it).
BY_KIND: dict[str, QuantAlgo] = {}
for _a in QUANT_ALGOS.values():
    BY_KIND.setdefault(_a.kind, _a)
del _a


def weight_format(kind: str) -> str:
    """A linear's stored weight format from its kind: "float" | "fp8" | "int8" | "int4"."""
    return "float" if kind == "float" else BY_KIND[kind].weight


@dataclass(frozen=True)
class KVCacheQuant:
    """One kv_cache_quant_algo: K (after RoPE) and V stored as `dtype` with one scale per layer."""

    name: str          # kv_cache_quant_algo in config.json
    dtype: str         # --kv-cache-dtype value and the engine's KV storage dtype
    min_scale: float   # calibrated scales are clamped up to this (ModelOpt: FP8 >= 1)

    @property
    def bound(self) -> float:
        return BOUNDS[self.dtype]


KV_CACHE_ALGOS: dict[str, KVCacheQuant] = {k.name: k for k in [
    KVCacheQuant("FP8", "fp8", 1.0),
    KVCacheQuant("INT8", "int8", 0.0),
]}
KV_CACHE_BY_DTYPE: dict[str, KVCacheQuant] = {k.dtype: k for k in KV_CACHE_ALGOS.values()}
