"""The pipeline's closing report: stages (time, peak memory, size), accuracy and speed."""

from __future__ import annotations

from typing import Any


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB"


def print_report(report: dict[str, Any], console) -> None:
    from llmc.console import table

    t = table(f"pipeline {report['recipe']} ({report['workdir']})",
              ["stage", "status", "why", "time", "peak RSS", "artifact size"])
    for s in report["stages"]:
        t.add_row(s["stage"], s["status"], s["reason"], f"{s['seconds']:.1f}s",
                  _mib(s["peak_rss_bytes"]), _mib(s["artifact_bytes"]))
    console.print(t)
    res = report["results"]
    if "eval" in res and res["eval"]:
        e = res["eval"]
        simulated = f" | quantized checkpoint (simulated) {e['checkpoint_ppl']:.3f}" if "checkpoint_ppl" in e else ""
        console.print(f"perplexity on {e.get('data', '?')} ({e['tokens']} tokens): unquantized checkpoint "
                      f"{e['baseline_ppl']:.3f}{simulated} | engine {e['engine_ppl']:.3f} "
                      f"({e['delta_pct']:+.2f}% vs unquantized)")
        d = e.get("engine_divergence")
        if d:
            console.print(f"engine vs unquantized checkpoint: KL mean {d['kl_mean']:.4f} / p99 {d['kl_p99']:.4f} "
                          f"nats, same top-1 {d['same_top1_pct']:.1f}%, perplexity ratio {d['ppl_ratio']:.3f} "
                          f"(second half of each window, {d['positions']:,} positions)")
    run = res.get("run") or {}
    for i, o in enumerate(run.get("outputs", [])):
        console.print(f"[bold]Input [{i}]:[/] {o['prompt']!r}")
        console.print(f"[bold]Output [{i}]:[/] {o['error'] or o['text']!r}")
    g = run.get("greedy_agreement")
    if g:
        console.print(f"greedy agreement with the unquantized checkpoint: {g['identical']}/{g['prompts']} outputs "
                      f"identical, first token {g['first_token']}/{g['prompts']}, "
                      f"{g['prefix_pct']:.0f}% of tokens before the first difference")
    if run:
        console.print(f"speed: TTFT {run['ttft_ms']:.1f} ms | TPOT {run['tpot_ms']:.1f} ms | "
                      f"{run['output_tokens_per_s']:.1f} output tokens/s")
