"""`llmc convert model.gguf --keep-quantization`: keep a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks.

A GGUF model is already quantized; dequantizing it to float32 and quantizing again rounds twice
and can only lose. Here the stored codes and per-block scales are written as they are into a
TensorRT-LLM weight-only layout (`llmc.quantize.layout`), so the engine runs them as 4/8-bit
MatMulNBits with exactly the weights of the float32 conversion:

    GGUF type   checkpoint quant_algo                      per 32-wide block
    Q4_1        W4A16_GPTQ, has_zero_point, group 32       q = u - 8, scale d, zero = m + 8 d
    Q4_0        W4A16_GPTQ (zero 0) or, all Q4_0, W4A16_AWQ  q = u - 8, scale d
    Q8_0        W8A16_GPTQ, group 32                       q, scale d

One quant_algo per checkpoint: the 4-bit kind when any linear is 4-bit, else Q8_0's. Linears in
any other type (Q4_K, Q6_K, F16 ..., or Q8_0 beside 4-bit linears) stay float, dequantized, and
are reported. Every kept linear is checked against the float conversion of the same file: its
codes x scales (+ zeros) must reproduce that weight exactly, so a name or row-order mistake
cannot pass silently. The embedding (and a tied lm_head) stays float; the engine stores a Q8_0
lm_head as exact int8 blocks by itself (`llmc build --lm-head auto`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmc.checkpoint.schema import LAYER
from llmc.errors import LlmcError

# checkpoint linear (schema.LAYER_LINEARS, under LAYER) -> HF source matrices, stacked along rows
LINEAR_SOURCES = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
GROUP = 32


@dataclass
class KeepResult:
    out: Path
    quant_algo: str
    kept: dict[str, int] = field(default_factory=dict)         # GGUF type -> linears kept exactly
    dequantized: dict[str, str] = field(default_factory=dict)  # linear -> its GGUF type(s), left float
    seconds: float = 0.0


def _blocks_of(source, layer: int, parts: tuple[str, ...]):
    blocks = [source.blocks(f"model.layers.{layer}.{p}.weight") for p in parts]
    types = sorted({source.type_name(f"model.layers.{layer}.{p}.weight") for p in parts})
    if any(b is None for b in blocks) or len({b.kind for b in blocks}) != 1:
        return None, "+".join(types)
    if len(blocks) == 1:
        return blocks[0], types[0]
    from llmc.converters.sources import GGUFBlocks

    zero = None
    if blocks[0].zero is not None:
        zero = torch.cat([b.zero for b in blocks])
    return GGUFBlocks(blocks[0].kind, torch.cat([b.codes for b in blocks]), torch.cat([b.scale for b in blocks]),
                      zero), types[0]


def convert_keeping_quantization(gguf: str | Path, out: str | Path, force: bool = False) -> KeepResult:
    """`llmc convert model.gguf --keep-quantization`: a float32 conversion in a scratch directory
    beside OUT, then the GGUF blocks on top of it (see `keep_gguf_quantization`)."""
    from llmc.converters.convert import convert
    from llmc.fsutil import check_output_dir, scratch_dir

    gguf, out = Path(gguf), Path(out)
    if gguf.suffix.lower() != ".gguf" or not gguf.is_file():
        raise LlmcError("--keep-quantization applies to a .gguf file (a Hugging Face directory is not quantized)", gguf)
    check_output_dir(out, force, "checkpoint", [gguf])  # before minutes of conversion
    with scratch_dir(out) as scratch:
        float_dir = convert(gguf, scratch / "float", dtype="float32", tp_size=1, progress=False).out
        return keep_gguf_quantization(gguf, float_dir, out, force=force)


def keep_gguf_quantization(gguf: str | Path, float_ckpt: str | Path, out: str | Path,
                           force: bool = False) -> KeepResult:
    """Write the quantized checkpoint `out` from `gguf` and its float32 conversion `float_ckpt`."""
    from llmc.checkpoint.config import QuantConfig
    from llmc.checkpoint.io import load_checkpoint, write_checkpoint
    from llmc.converters.sources import GGUFSource
    from llmc.fsutil import atomic_output_dir
    from llmc.quantize.layout import pack_int4_row_pairs

    start = time.perf_counter()
    source = GGUFSource(Path(gguf))
    ck = load_checkpoint(Path(float_ckpt))
    cfg = ck.config
    if cfg.mapping.tp_size != 1:
        raise LlmcError("--keep-quantization writes one rank (use --tp-size 1)")
    tensors = ck.merged_tensors()
    found = {}
    result = KeepResult(Path(out), "")
    for i in range(cfg.num_hidden_layers):
        for lin, parts in LINEAR_SOURCES.items():
            found[LAYER.format(i=i) + lin] = _blocks_of(source, i, parts)
    kinds = {b.kind for b, _ in found.values() if b is not None}
    if not kinds:
        raise LlmcError("no linear layer is stored as Q4_0, Q4_1 or Q8_0: nothing to keep "
                        "(convert without --keep-quantization)", gguf)
    bits = 4 if kinds & {"Q4_0", "Q4_1"} else 8
    zero_point = bits == 4 and "Q4_1" in kinds
    algo = "W8A16_GPTQ" if bits == 8 else ("W4A16_GPTQ" if zero_point else "W4A16_AWQ")
    result.quant_algo = algo
    for name, (b, types) in found.items():
        if b is None or b.bits != bits:
            result.dequantized[name] = types
            continue
        w = tensors[name + ".weight"].float()
        if tuple(b.codes.shape) != tuple(w.shape) or not torch.equal(b.dequantize(), w):
            diff = float((b.dequantize() - w).abs().max()) if tuple(b.codes.shape) == tuple(w.shape) else float("nan")
            raise LlmcError(f"{name}: the GGUF blocks do not reproduce the float conversion (max diff {diff:.3g}); "
                            f"refusing to write a checkpoint that differs from the source", gguf)
        tensors[name + ".weight"] = pack_int4_row_pairs(b.codes) if bits == 4 else b.codes.contiguous()
        tensors[name + ".weights_scaling_factor"] = b.scale.contiguous()
        if zero_point:
            tensors[name + ".zero"] = (b.zero if b.zero is not None else torch.zeros_like(b.scale)).contiguous()
        result.kept[b.kind] = result.kept.get(b.kind, 0) + 1

    from llmc import __version__

    new_cfg = copy.deepcopy(cfg)
    new_cfg.quantization = QuantConfig(quant_algo=algo, group_size=GROUP, has_zero_point=zero_point,
                                       pre_quant_scale=False, exclude_modules=["lm_head", *result.dequantized])
    new_cfg.llmc = dict(cfg.llmc)
    new_cfg.llmc["quantization"] = {"qformat": "gguf:" + "+".join(sorted(result.kept)), "llmc_version": __version__,
                                    "algorithm": "kept from GGUF blocks (no re-quantization)",
                                    "group_size": GROUP, "source": str(Path(gguf).resolve()),
                                    "kept": result.kept, "dequantized": result.dequantized}
    with atomic_output_dir(Path(out), force=force, kind="checkpoint", inputs=[gguf]) as tmp:
        write_checkpoint(tmp, new_cfg, [tensors], side_files_from=ck.path)
    result.seconds = time.perf_counter() - start
    return result
