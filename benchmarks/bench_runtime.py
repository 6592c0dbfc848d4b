"""Serving benchmark (issue 5): llmc in-flight batching vs one-at-a-time vs transformers.

One fixed workload, run side by side in one process: 32 requests, prompts of 16-256 real-text
tokens (State of the Union speeches), 16-128 output tokens, EOS ignored. Compared:
  - llmc, SmolLM2 engine in fp32 and in int4_awq, with in-flight batching (all requests queued
    at t=0) and one request at a time;
  - transformers generate() in fp32, one request at a time and in static batches of 8
    (left-padded; a batch runs until its longest request is done).
The one-at-a-time legs take turns per request (llmc fp32, llmc int4_awq, transformers, next
request), so a shared host's speed drift hits all three alike; single-stream TPOT ratios come
from those interleaved runs.
Both scheduler policies run in flight, back to back per engine: the default (prompts fill each
step's max_num_tokens) and a per-step prefill token budget (`--prefill-budget`, LLM(prefill_budget=)),
which bounds TTFT under the burst; the table shows TTFT p50 and throughput of both, and the greedy
outputs of both policies are checked equal token for token.
Prints a table and writes benchmarks/results/bench_runtime.json.

    python benchmarks/bench_runtime.py [--num-requests 32] [--quick] [--prefill-budget 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import engine_for, serving_workload, serving_workload_args, write_results  # noqa: E402


def one_request(work, i: int):
    from llmc.bench import Workload

    return Workload([work.prompts[i]], [work.output_lens[i]], [0.0])


DEFAULT_PREFILL_BUDGET = 256  # chosen by measurement, see README (serving)


def load_llm(engine: Path, prefill_budget: int | None = None):
    from llmc import bench as b
    from llmc.runtime.llm import LLM

    llm = LLM(engine, prefill_budget=prefill_budget)
    b.run_workload(llm, b.make_workload(list(range(100, 400)), 2, (8, 8), (4, 4), 0, None))  # warm-up
    return llm


def llmc_inflight(llm, work) -> dict:
    from llmc import bench as b

    m = b.run_workload(llm, work)
    m["tokens"] = {o.request_id: o.output_token_ids for o in m["_outputs"]}
    return _llmc_extras(llm, m)


def _llmc_extras(llm, m: dict) -> dict:
    from llmc import bench as b

    kv_tok = llm.engine.kv_bytes_per_block // llm.block_size
    m["mbu_b1"] = b.mbu(m, b.engine_weight_bytes(llm.engine), kv_tok, BANDWIDTH, batch_size=1)
    m["lm_head"] = llm.engine.graph.get("lm_head", "float")  # float | int8-blocks (exact) | quantized
    return m


def llmc_alone(llm, work, i: int) -> dict:
    from llmc import bench as b

    return b.run_workload(llm, one_request(work, i))


def hf_run(hf_model, work, batch: int) -> dict:
    """transformers generate(), greedy, EOS ignored, left-padded static batches of `batch`."""
    import torch

    n = len(work.prompts)
    ttft, tpot, total_out, seconds = [], [], 0, 0.0
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        lens = [len(work.prompts[i]) for i in idx]
        width = max(lens)
        ids = torch.full((len(idx), width), 0, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding
            ids[r, width - lens[r]:] = torch.tensor(work.prompts[i])
            mask[r, width - lens[r]:] = 1
        new = max(work.output_lens[i] for i in idx)
        s = time.perf_counter()
        with torch.no_grad():  # TTFT probe: prefill + first token (not counted in the wall time)
            hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1,
                              do_sample=False, pad_token_id=0)
        t_first = time.perf_counter() - s
        s = time.perf_counter()
        with torch.no_grad():
            hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        t_all = time.perf_counter() - s
        seconds += t_all
        ttft += [t_first] * len(idx)
        tpot.append((t_all - t_first) / max(1, new - 1))
        total_out += sum(work.output_lens[i] for i in idx)
    return {"output_tokens": total_out, "seconds": seconds, "output_tokens_per_s": total_out / seconds,
            "ttft_s": {"p50": float(np.median(ttft))}, "tpot_s": {"p50": float(np.median(tpot))},
            "_ttft": ttft, "_tpot": tpot}


def merge_alone(runs: list[dict]) -> dict:
    """Per-request runs of one system -> one row (throughput over the summed wall time)."""
    from llmc import bench as b

    out = sum(r["output_tokens"] for r in runs)
    secs = sum(r["seconds"] for r in runs)
    if "_outputs" in runs[0]:
        outs = [o for r in runs for o in r["_outputs"]]
        ttft, tpot = [o.ttft for o in outs if o.ttft is not None], [o.tpot for o in outs if o.tpot is not None]
        extra = {"_decode_steps": [s for r in runs for s in r["_decode_steps"]],
                 "peak_kv_blocks": max(r["peak_kv_blocks"] for r in runs),
                 "tokens": {i: r["_outputs"][0].output_token_ids for i, r in enumerate(runs)}}
    else:
        ttft, tpot, extra = [t for r in runs for t in r["_ttft"]], [t for r in runs for t in r["_tpot"]], {}
    return {"output_tokens": out, "seconds": secs, "output_tokens_per_s": out / secs,
            "ttft_s": b.percentiles(ttft), "tpot_s": b.percentiles(tpot), **extra}


def main() -> None:
    global BANDWIDTH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serving_workload_args(ap)
    ap.add_argument("--prefill-budget", type=int, default=DEFAULT_PREFILL_BUDGET,
                    help="prompt tokens per step of the budgeted scheduler policy")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from llmc import bench as b
    from llmc.tokenizer import load_tokenizer

    BANDWIDTH = b.measure_memory_bandwidth()
    console = Console()
    console.print("building engines (reused when unchanged)...")
    engines = {"fp32": engine_for("smollm2-fp32"), "int4_awq": engine_for("smollm2-int4_awq")}
    tok = load_tokenizer(engines["fp32"])
    work, out_range = serving_workload(args, tok)
    n = len(work.prompts)
    import torch
    from transformers import AutoModelForCausalLM

    from llmc.default_model import default_gguf_path

    g = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    llms = {name: load_llm(eng) for name, eng in engines.items()}
    budgeted = {name: load_llm(eng, args.prefill_budget) for name, eng in engines.items()}
    rows: dict[str, dict] = {}
    pb = f"in-flight, prefill budget {args.prefill_budget}"
    for name in engines:
        console.print(f"llmc {name}: in-flight (both scheduler policies)")
        rows[f"llmc {name} in-flight"] = llmc_inflight(llms[name], work)
        rows[f"llmc {name} {pb}"] = llmc_inflight(budgeted[name], work)
    console.print("transformers fp32: static batches of 8")
    rows["transformers fp32 static-8"] = hf_run(hf, work, 8)
    # One request at a time, the three systems in turn per request, so that drift in the
    # machine's speed (a shared host) hits them alike and the single-stream ratios stay fair.
    alone: dict[str, list[dict]] = {k: [] for k in [*engines, "hf"]}
    for i in range(n):
        console.print(f"one at a time: request {i + 1}/{n}", end="\r")
        for name in engines:
            alone[name].append(llmc_alone(llms[name], work, i))
        alone["hf"].append(hf_run(hf, one_request(work, i), 1))
    console.print()
    for name in engines:
        rows[f"llmc {name} one-at-a-time"] = _llmc_extras(llms[name], merge_alone(alone[name]))
    rows["transformers fp32 one-at-a-time"] = merge_alone(alone["hf"])
    rows = {k: rows[k] for k in ("llmc fp32 in-flight", f"llmc fp32 {pb}", "llmc fp32 one-at-a-time",
                                 "llmc int4_awq in-flight", f"llmc int4_awq {pb}", "llmc int4_awq one-at-a-time",
                                 "transformers fp32 one-at-a-time", "transformers fp32 static-8")}

    same = rows["llmc fp32 in-flight"]["tokens"] == rows["llmc fp32 one-at-a-time"]["tokens"]
    def agree(a: dict, b_: dict) -> str:  # requests whose greedy tokens are identical
        return f"{sum(a[k] == b_.get(k) for k in a)}/{len(a)}"

    # fp32 is batch-invariant (a token's logits do not depend on what else runs in its step), so
    # both policies must agree token for token; ORT's int4 MatMulNBits (int8 activations) is not
    # (its kernel differs between 1 and many rows), so int4 in-flight already differs from int4
    # one-at-a-time, and the two policies differ alike: both counts are printed.
    same_policy = {name: agree(rows[f"llmc {name} in-flight"]["tokens"], rows[f"llmc {name} {pb}"]["tokens"])
                   for name in engines}
    batch_invariance = {name: agree(rows[f"llmc {name} in-flight"]["tokens"], rows[f"llmc {name} one-at-a-time"]["tokens"])
                        for name in engines}
    hf1 = rows["transformers fp32 one-at-a-time"]
    hf8 = rows["transformers fp32 static-8"]
    inflight = rows["llmc fp32 in-flight"]
    ratios = {
        "fp32 in-flight / transformers one-at-a-time (throughput, floor 5x)":
            inflight["output_tokens_per_s"] / hf1["output_tokens_per_s"],
        "fp32 in-flight / transformers static-8 (throughput, floor 2.5x)":
            inflight["output_tokens_per_s"] / hf8["output_tokens_per_s"],
        "int4_awq single-stream TPOT / transformers fp32 TPOT (ceiling 0.333)":
            rows["llmc int4_awq one-at-a-time"]["tpot_s"]["p50"] / hf1["tpot_s"]["p50"],
        "fp32 single-stream TPOT / transformers fp32 TPOT (ceiling 1.0)":
            rows["llmc fp32 one-at-a-time"]["tpot_s"]["p50"] / hf1["tpot_s"]["p50"],
    }
    for name in engines:
        base, budget = rows[f"llmc {name} in-flight"], rows[f"llmc {name} {pb}"]
        ratios[f"{name} TTFT p50, prefill budget / default policy"] = budget["ttft_s"]["p50"] / base["ttft_s"]["p50"]
        ratios[f"{name} throughput, prefill budget / default policy"] = (budget["output_tokens_per_s"]
                                                                         / base["output_tokens_per_s"])
    t = Table(title=f"serving: {n} requests, prompts 16-256, outputs {out_range[0]}-{out_range[1]}, EOS ignored")
    for col in ("system", "out tok/s", "TTFT p50 ms", "TPOT p50 ms", "peak KV blocks", "MBU b=1"):
        t.add_column(col)
    for name, r in rows.items():
        t.add_row(name, f"{r['output_tokens_per_s']:.1f}", f"{r['ttft_s']['p50'] * 1e3:.1f}",
                  f"{r['tpot_s']['p50'] * 1e3:.2f}", str(r.get("peak_kv_blocks", "-")),
                  f"{r['mbu_b1'] * 100:.1f}%" if r.get("mbu_b1") else "-")
    console.print(t)
    for k, v in ratios.items():
        console.print(f"{k}: [bold]{v:.2f}[/]")
    console.print(f"greedy tokens identical, in-flight vs one-at-a-time (fp32): {same}")
    for name in engines:
        console.print(f"greedy tokens identical, default vs prefill-budget policy ({name}): {same_policy[name]} "
                      f"requests (in-flight vs one-at-a-time: {batch_invariance[name]})")
    clean = {k: {kk: vv for kk, vv in r.items() if not kk.startswith("_") and kk != "tokens"} for k, r in rows.items()}
    path = write_results("bench_runtime", {"workload": {"requests": n, "input_len": [16, 256],
                                                        "output_len": list(out_range)},
                                           "memory_bandwidth_gb_s": BANDWIDTH / 1e9, "rows": clean,
                                           "ratios": ratios, "inflight_matches_sequential": same,
                                           "prefill_budget": args.prefill_budget,
                                           "policies_match": same_policy,
                                           "inflight_vs_sequential_match": batch_invariance})
    console.print(f"wrote {path}")


BANDWIDTH = 0.0

if __name__ == "__main__":
    main()
