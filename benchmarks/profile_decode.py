"""ONNX Runtime profile of single-stream decode steps, by op type (issue 15).

Runs one request (32-token prompt, N generated tokens) on an engine with ORT profiling on, keeps
the decode steps' node events, and prints the time per step by op type (median step), the
number of nodes run per step and the graph time vs the host time of a step.

    python benchmarks/profile_decode.py ENGINE_DIR [ENGINE_DIR_AFTER] [--tokens 32] [--threads N] [--json out.json]

With two engines (e.g. the same checkpoint built before and after a change) both are profiled
back to back and one table shows kernels and us per step by op type side by side. ORT profiling
adds a few us per node, so compare the two columns, not the totals with unprofiled timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _own_times(events: list[dict]) -> list[dict]:
    """The kernel events, an If's time reduced to its own (its branch's kernels are events of
    their own): an engine with step variants runs its layers inside one If per step."""
    import bisect

    nodes = sorted((dict(e) for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    starts = [e["ts"] for e in nodes]
    for e in sorted((e for e in nodes if e["args"]["op_name"] == "If"), key=lambda e: e["dur"]):  # innermost first
        a, b = e["ts"], e["ts"] + e["dur"]
        inside = nodes[bisect.bisect_left(starts, a):bisect.bisect_right(starts, b)]
        inner = sum(o["dur"] for o in inside if o is not e and o["ts"] + o["dur"] <= b)
        e["dur"] = max(0, e["dur"] - inner)
    return nodes


def profile(engine_dir: Path, tokens: int = 32, threads: int | None = None) -> dict:
    import numpy as np

    from llmc.engine.backends import onnxruntime as ob
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    tmp = tempfile.mkdtemp(prefix="llmc-prof-")
    orig = ob.session_options

    def profiled(*a, **k):
        so = orig(*a, **k)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        return so

    ob.session_options = profiled
    try:
        llm = LLM(engine_dir, num_threads=threads, kv_cache_mb=128)
    finally:
        ob.session_options = orig
    prompt = list(range(1000, 1032))
    llm.generate([prompt], SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0))
    t0 = time.perf_counter()
    llm.step_stats.clear()
    llm.generate([prompt], SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0))
    wall = time.perf_counter() - t0
    graph_s = [s.seconds for s in llm.step_stats if s.num_decode == s.num_seqs]
    path = llm.engine._session.sess.end_profiling()
    events = json.loads(Path(path).read_text())
    shutil.rmtree(tmp, ignore_errors=True)  # ORT's trace is hundreds of MB over a long run
    runs = [e for e in events if e.get("name") == "model_run"]
    # The last `tokens - 1` runs are the measured request's decode steps.
    dec = runs[-(tokens - 1):]
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in dec]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(spans))
    nodes_per_step = [0] * len(spans)
    for e in _own_times(events):
        ts = e["ts"]
        for i, (a, b) in enumerate(spans):
            if a <= ts <= b:
                per_op[e["args"]["op_name"]][i] += e["dur"]
                nodes_per_step[i] += 1
                break
    run_us = [r["dur"] for r in dec]
    table = {op: float(np.median(v)) for op, v in per_op.items()}
    counts: dict[str, int] = defaultdict(int)
    for e in events:  # node count per op type in one decode step
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and spans[-1][0] <= e["ts"] <= spans[-1][1]:
            counts[e["args"]["op_name"]] += 1
    decode_wall = wall  # includes prefill; host = step wall - graph
    return {"engine": str(engine_dir), "op_us_per_step": dict(sorted(table.items(), key=lambda kv: -kv[1])),
            "op_nodes_per_step": dict(counts), "nodes_per_step": int(np.median(nodes_per_step)),
            "model_run_us_p50": float(np.median(run_us)), "kernel_us_p50": float(sum(table.values())),
            "engine_step_ms_p50": float(np.median(graph_s) * 1e3) if graph_s else None,
            "request_wall_s": decode_wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("after", type=Path, nargs="?", default=None, help="a second engine for a before/after table")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    r = profile(args.engine, args.tokens, args.threads)
    if args.after is not None:
        a = profile(args.after, args.tokens, args.threads)
        t = Table(title=f"decode step by op type (us per step, median step): {args.engine} -> {args.after}")
        for c in ("op type", "before: kernels", "before: us", "after: kernels", "after: us"):
            t.add_column(c)
        ops = sorted(set(r["op_us_per_step"]) | set(a["op_us_per_step"]),
                     key=lambda o: -max(r["op_us_per_step"].get(o, 0), a["op_us_per_step"].get(o, 0)))
        for op in ops:
            t.add_row(op, str(r["op_nodes_per_step"].get(op, 0)), f"{r['op_us_per_step'].get(op, 0):.0f}",
                      str(a["op_nodes_per_step"].get(op, 0)), f"{a['op_us_per_step'].get(op, 0):.0f}")
        t.add_row("all kernels (sum / model run)", str(r["nodes_per_step"]),
                  f"{r['kernel_us_p50']:.0f} / {r['model_run_us_p50']:.0f}", str(a["nodes_per_step"]),
                  f"{a['kernel_us_p50']:.0f} / {a['model_run_us_p50']:.0f}")
        Console().print(t)
        if args.json:
            args.json.write_text(json.dumps({"before": r, "after": a}, indent=2) + "\n")
        return
    t = Table(title=f"decode step by op type: {args.engine} ({r['nodes_per_step']} nodes/step, "
                    f"model_run p50 {r['model_run_us_p50'] / 1e3:.2f} ms)")
    for c in ("op type", "nodes", "us/step", "share"):
        t.add_column(c)
    tot = r["kernel_us_p50"] or 1.0
    for op, us in r["op_us_per_step"].items():
        t.add_row(op, str(r["op_nodes_per_step"].get(op, 0)), f"{us:.0f}", f"{us / tot * 100:.1f}%")
    Console().print(t)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
