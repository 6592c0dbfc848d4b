"""tensorrt-llm backend: hand the checkpoint directory to TensorRT-LLM's own engine builder.

llmc checkpoints are in TensorRT-LLM's checkpoint layout, so TensorRT-LLM (<= 1.2, the releases
that still ship the TensorRT engine builder `trtllm-build`) can build them directly with its
attention/GEMM plugins. `trtllm_build_args` is the pure llmc-options -> trtllm-build flag mapping
(tested on CPU); `build_with_trtllm` runs it (`python -m tensorrt_llm.commands.build ...`) and
needs TensorRT-LLM and a GPU. Its output lands in ENGINE/trtllm/ (TensorRT-LLM's rank0.engine and
its own config.json); llmc's config.json sits beside it.

Mapping:
    --paged-kvcache / --no-paged-kvcache -> --kv_cache_type paged|continuous
                                            (--paged_kv_cache enable|disable before 0.12)
    --inflight-batching                  -> --remove_input_padding enable, --context_fmha enable,
                                            --use_paged_context_fmha enable (chunked prefill)
    always                               -> --gpt_attention_plugin auto
    unquantized or FP8                   -> --use_fused_mlp enable (gate+up in one GEMM);
                                            other quant formats -> disable
    unquantized                          -> --gemm_plugin auto
    --tokens-per-block, --max-batch-size, --max-input-len, --max-seq-len, --max-num-tokens
                                         -> same-named options
    --timing-cache FILE                  -> --input_timing_cache FILE --output_timing_cache FILE
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from llmc.errors import LlmcError, UnsupportedError
from llmc.versions import installed_version, version_tuple

MAX_VERSION = (1, 2)
FUSED_MLP_QUANT = (None, "FP8")


def trtllm_status() -> tuple[bool, str, str | None]:
    """(usable, reason, version)."""
    v = installed_version("tensorrt_llm")
    if v is None:
        return False, ("TensorRT-LLM is not installed (pip install \"llmc[tensorrt-llm]\" on a CUDA host "
                       "with TensorRT-LLM <= 1.2)"), None
    if version_tuple(v, 2) > MAX_VERSION:
        return False, (f"TensorRT-LLM {v} no longer ships the TensorRT engine builder (trtllm-build); "
                       "use TensorRT-LLM <= 1.2 or --backend tensorrt"), v
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"TensorRT-LLM {v} is installed but no CUDA device is visible", v
    except Exception:
        return False, f"TensorRT-LLM {v} is installed but CUDA cannot be queried", v
    return True, f"TensorRT-LLM {v}", v


def trtllm_build_args(checkpoint_dir: str | Path, output_dir: str | Path, opts: Any,
                      quant_algo: str | None, trtllm_version: str | None = "1.2") -> list[str]:
    """The trtllm-build argument list for these llmc build options (pure; tested on CPU)."""
    legacy = version_tuple(trtllm_version, 2) < (0, 12)
    args = ["--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir),
            "--max_batch_size", str(opts.max_batch_size), "--max_input_len", str(opts.max_input_len),
            "--max_seq_len", str(opts.max_seq_len), "--max_num_tokens", str(opts.max_num_tokens),
            "--gpt_attention_plugin", "auto"]
    if legacy:
        args += ["--paged_kv_cache", "enable" if opts.paged_kv_cache else "disable"]
    else:
        args += ["--kv_cache_type", "paged" if opts.paged_kv_cache else "continuous"]
    if opts.paged_kv_cache:
        args += ["--tokens_per_block", str(opts.tokens_per_block)]
    args += ["--remove_input_padding", "enable" if opts.inflight_batching else "disable"]
    if opts.inflight_batching:
        args += ["--context_fmha", "enable"]
        if opts.paged_kv_cache:
            args += ["--use_paged_context_fmha", "enable"]
    args += ["--use_fused_mlp", "enable" if quant_algo in FUSED_MLP_QUANT else "disable"]
    if quant_algo is None:
        args += ["--gemm_plugin", "auto"]
    if getattr(opts, "timing_cache", None):
        args += ["--input_timing_cache", str(opts.timing_cache), "--output_timing_cache", str(opts.timing_cache)]
    return args


def build_with_trtllm(checkpoint_dir: Path, engine_dir: Path, opts: Any, quant_algo: str | None,
                      log=print) -> dict[str, Any]:
    ok, reason, version = trtllm_status()
    if not ok:
        raise UnsupportedError(f"cannot build with TensorRT-LLM here: {reason}")
    out = engine_dir / "trtllm"
    args = trtllm_build_args(checkpoint_dir, out, opts, quant_algo, version)
    cmd = [sys.executable, "-m", "tensorrt_llm.commands.build", *args]
    log("running: trtllm-build " + " ".join(args))
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise LlmcError(f"trtllm-build failed with exit code {proc.returncode} (see its log above)")
    return {"trtllm_version": version, "trtllm_build_args": args, "files": ["trtllm/"]}
