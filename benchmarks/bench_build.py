"""Build benchmark: SmolLM2-135M at every qformat -> ONNX Runtime engine.

    python benchmarks/bench_build.py [--formats fp32,fp8,...] [--json out.json] [--repeat N]

For each format: the quantized checkpoint (made once with a small calibration set and cached under
$LLMC_CACHE/bench; calibration quality does not matter for a build benchmark), then `build_engine`
in a fresh subprocess so its peak RSS is its own. Reports build time (median of --repeat), peak
memory of the build process, engine size on disk, and both next to the fp32 checkpoint's size.
Prints a rich table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ["fp32", "fp8", "int8_sq", "int8_wo", "int4_awq", "int4_wo", "w4a8_awq"]

CHILD = r"""
import json, sys, time
from llmc.build import BuildOptions, build_engine
from llmc.fsutil import dir_size
ckpt, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
res = build_engine(ckpt, out, BuildOptions(force=True, max_batch_size=16, max_seq_len=2048), console=None)
secs = time.perf_counter() - t
# VmHWM (this process image's peak RSS); ru_maxrss would carry the parent's peak across exec.
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": secs, "peak_rss": hwm,
                  "engine_bytes": dir_size(out), "weights_bytes": res.config["engine"]["graph"]["weight_bytes"],
                  "nodes": res.config["engine"]["graph"]["node_count"],
                  "kv_dtype": res.config["engine"]["kv_cache_dtype"]}))
"""


def cache_root() -> Path:
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc")) / "bench"


def checkpoint_for(fmt: str, base: Path, log) -> Path:
    if fmt == "fp32":
        return base
    out = cache_root() / f"smollm2-135m-{fmt}"
    if (out / "config.json").is_file():
        return out
    from llmc.quantize import quantize_checkpoint

    log(f"quantizing SmolLM2 to {fmt} (once; cached in {out})...")
    t = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quantize_checkpoint(base, out, fmt, calib_size=16, calib_seq_len=256, progress=False, force=True)
    log(f"  {fmt}: {time.perf_counter() - t:.0f}s")
    return out


def measure(ckpt: Path, repeat: int) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="llmc-bench-build-") as tmp:
        for _ in range(repeat):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(Path(tmp) / "engine")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"build of {ckpt} failed:\n{proc.stderr[-2000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = dict(runs[-1])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["peak_rss"] = max(r["peak_rss"] for r in runs)
    out["seconds_all"] = [round(r["seconds"], 3) for r in runs]
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from llmc.default_model import ensure_default_checkpoint
    from llmc.fsutil import dir_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--repeat", type=int, default=3, help="builds per format (median time reported)")
    ap.add_argument("--json", default="benchmarks/results/bench_build.json")
    args = ap.parse_args(argv)
    import shutil

    console = Console(width=max(120, shutil.get_terminal_size().columns))
    base = ensure_default_checkpoint("float32")
    base_size = dir_size(base)
    rows = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        ckpt = checkpoint_for(fmt, base, console.print)
        r = measure(ckpt, args.repeat)
        r.update(format=fmt, checkpoint=str(ckpt), checkpoint_bytes=dir_size(ckpt),
                 fp32_checkpoint_bytes=base_size)
        rows.append(r)
        console.print(f"{fmt}: {r['seconds']:.2f}s, peak {r['peak_rss'] / 2**20:.0f} MiB, "
                      f"engine {r['engine_bytes'] / 2**20:.1f} MiB")
    t = Table(title=f"llmc build: SmolLM2-135M -> onnxruntime engine (median of {args.repeat})")
    for col in ("format", "build s", "peak RSS MiB", "engine MiB", "checkpoint MiB", "engine / fp32 ckpt",
                "KV dtype", "nodes"):
        t.add_column(col, justify="left" if col in ("format", "KV dtype") else "right")
    for r in rows:
        t.add_row(r["format"], f"{r['seconds']:.2f}", f"{r['peak_rss'] / 2**20:.0f}",
                  f"{r['engine_bytes'] / 2**20:.1f}", f"{r['checkpoint_bytes'] / 2**20:.1f}",
                  f"{r['engine_bytes'] / base_size:.2f}x", r["kv_dtype"], str(r["nodes"]))
    console.print(t)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct", "fp32_checkpoint_bytes": base_size, "repeat": args.repeat,
            "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
