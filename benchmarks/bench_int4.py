"""INT4 algorithms on SmolLM2-135M: round-to-nearest vs ModelOpt AWQ (lite / clip / full) vs
zero points, per group size, scored against float32 (perplexity, KL, same-top-1).

    OMP_NUM_THREADS=1 python benchmarks/bench_int4.py [--eval-chunks 40] [--rows "awq_full g64,..."]

Issue 14's INT4 target: the best INT4's perplexity increase <= 40% of round-to-nearest's
(int4_wo) at the same group size, and mean KL <= 0.12. Scored on the fake-quant simulation of
each checkpoint (`llmc eval`'s; the engine adds only ONNX Runtime's int8 activation rounding in
MatMulNBits, see bench_quantize.py for engine figures). Caveat: the embedded SmolLM2 came from a
GGUF whose linears are Q4_1 (asymmetric, 32-wide blocks), so an asymmetric g32 format recovers
those weights exactly; tests/test_int4_algorithms.py shows the algorithms on weights off any
4-bit grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (row name, qformat, quantize options)
ROWS = [(f"{name} g{g}", q, {"group_size": g, **opts})
        for g in (32, 64)
        for name, q, opts in [("int4_wo", "int4_wo", {}),
                              ("awq_lite", "int4_awq", {"awq_method": "lite"}),
                              ("awq_clip", "int4_awq", {"awq_method": "clip"}),
                              ("awq_full", "int4_awq", {"awq_method": "full"}),
                              ("int4_asym", "int4_asym", {}),
                              ("awq_lite+zp", "int4_awq_asym", {"awq_method": "lite"})]]
TARGET_RATIO, TARGET_KL = 0.40, 0.12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int4.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmc-bench-int4"))
    ap.add_argument("--eval-chunks", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", default="all", help="comma-separated row names")
    ap.add_argument("--reuse", action="store_true", help="keep checkpoints already in --work")
    a = ap.parse_args()

    from bench_quantize import run_quantize
    from llmc.default_model import ensure_default_checkpoint
    from llmc.evaluate import compare, token_windows
    from llmc.tokenizer import load_tokenizer

    ckpt = ensure_default_checkpoint("float32")
    windows, desc = token_windows(load_tokenizer(ckpt), "builtin:brown", a.seq_len, a.eval_chunks)
    wanted = None if a.rows == "all" else {s.strip() for s in a.rows.split(",")}
    rows = []
    for name, qformat, opts in ROWS:
        if wanted and name not in wanted:
            continue
        out = a.work / name.replace(" ", "_").replace("+", "_")
        saved = out.with_name(out.name + ".quantize.json")
        if a.reuse and saved.is_file():
            q = json.loads(saved.read_text())
        elif a.reuse and (out / "config.json").is_file():  # quantized separately (llmc quantize)
            calib = json.loads((out / "config.json").read_text())["llmc"]["quantization"].get("calibration") or {}
            q = {"seconds": calib.get("seconds", float("nan"))}
        else:
            q = run_quantize(ckpt, out, qformat, opts)
            saved.write_text(json.dumps(q))
        rows.append({"name": name, "qformat": qformat, "options": opts, "checkpoint": str(out),
                     "quantize_seconds": q["seconds"]})
        print(f"{name}: quantized in {q['seconds']:.0f}s", flush=True)
    results = compare([ckpt] + [Path(r["checkpoint"]) for r in rows], desc, a.seq_len, progress=False,
                      windows=windows, reference=ckpt)
    base = results[0].perplexity
    for r, ev in zip(rows, results[1:]):
        d = ev.divergence
        r.update(perplexity=ev.perplexity, delta_pct=100 * (ev.perplexity / base - 1), kl_mean=d["kl_mean"],
                 kl_p99=d["kl_p99"], same_top1_pct=d["same_top1_pct"])
    by = {r["name"]: r for r in rows}
    print(f"\nbuiltin:brown {windows.shape[0]}x{windows.shape[1]}, fp32 perplexity {base:.3f} (simulated checkpoints)")
    print(f"{'row':18} {'ppl':>8} {'delta':>8} {'vs RTN':>7} {'KL mean':>8} {'KL p99':>7} {'top-1':>6} {'quant s':>7}")
    for r in rows:
        rtn = by.get(f"int4_wo g{r['options']['group_size']}")
        r["ratio_vs_rtn"] = r["delta_pct"] / rtn["delta_pct"] if rtn and rtn["delta_pct"] > 0 else None
        r["meets_target"] = bool(r["ratio_vs_rtn"] is not None and r["ratio_vs_rtn"] <= TARGET_RATIO
                                 and r["kl_mean"] <= TARGET_KL)
        ratio = f"{r['ratio_vs_rtn']:.2f}" if r["ratio_vs_rtn"] is not None else "-"
        print(f"{r['name']:18} {r['perplexity']:8.3f} {r['delta_pct']:+7.2f}% {ratio:>7} {r['kl_mean']:8.4f} "
              f"{r['kl_p99']:7.3f} {r['same_top1_pct']:5.1f}% {r['quantize_seconds']:7.0f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"eval": {"data": "builtin:brown", "description": desc, "chunks": int(windows.shape[0]),
                                          "seq_len": a.seq_len, "fp32_perplexity": base},
                                 "target": {"ratio_vs_rtn": TARGET_RATIO, "kl_mean": TARGET_KL},
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
