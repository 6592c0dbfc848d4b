"""`llmc eval`: perplexity of checkpoints / engines on local text, alone or compared."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def eval_cmd(
    paths: List[Path] = typer.Argument(..., help="Checkpoint or engine directory; with --compare, several (deltas are against the first)."),
    data: str = typer.Option(..., "--data", help="Text to score: a .txt file, a .jsonl file with a \"text\" field, a directory of .txt/.jsonl files, or builtin:sotu."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per non-overlapping window; each window is scored from position 0."),
    max_chunks: Optional[int] = typer.Option(None, "--max-chunks", help="Score only the first N windows (default: all full windows)."),
    compare: bool = typer.Option(False, "--compare", help="Evaluate every PATH on the same windows and print one table (implied by several PATHs)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="A checkpoint or engine (normally the unquantized checkpoint) to measure every PATH against on the same windows: mean and p99 KL divergence and same-top-1 % over the second half of each window (llama.cpp's protocol), and the perplexity ratio."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout and nothing else."),
) -> None:
    """Perplexity over non-overlapping windows. Quantized checkpoints are evaluated through the
    exact fake-quant simulation of what the engine executes. With --reference, also how far each
    model's next-token distributions move from the reference's (KL, same top-1)."""
    from llmc.cli.output import out_console, print_json
    from llmc.evaluate import compare as run_compare
    from llmc.evaluate import evaluate

    compare = compare or len(paths) > 1
    results = (run_compare(paths, data, seq_len, max_chunks, reference=reference) if compare
               else [evaluate(paths[0], data, seq_len, max_chunks, reference=reference)])
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    if compare:
        _print_comparison(out_console(), results, reference)
    else:
        _print_one(out_console(), results[0])


def _print_one(console, r) -> None:
    """One model: its perplexity and, with --reference, how far it moves from the reference."""
    console.print(f"[bold]perplexity {r.perplexity:.4f}[/] ({r.quantization}) on {r.tokens:,} tokens "
                  f"({r.chunks} x {r.seq_len}) of {r.data} in {r.seconds:.1f}s")
    if r.divergence:
        d = r.divergence
        console.print(f"vs {d['reference']}: KL mean {d['kl_mean']:.4f} p99 {d['kl_p99']:.4f} nats, "
                      f"same top-1 {d['same_top1_pct']:.2f}%, perplexity ratio {d['ppl_ratio']:.4f} "
                      f"(KL / top-1 on the second half of each window: {d['positions']:,} positions)")


def _print_comparison(console, results, reference) -> None:
    """One table, deltas against the first path; full paths (cells wrap, never cut)."""
    from llmc.cli.output import table as make_table

    base = results[0]
    right = {"justify": "right"}
    columns = ["artifact", "quantization", ("perplexity", right), ("delta", right), ("delta %", right),
               ("seconds", right)]
    if reference is not None:
        columns += [(col, right) for col in ("KL mean", "KL p99", "same top-1", "ppl ratio")]
    table = make_table(f"perplexity on {base.data}: {base.chunks} windows x {base.seq_len} tokens", columns)
    for i, r in enumerate(results):
        d = r.perplexity - base.perplexity
        row = [r.path, r.quantization, f"{r.perplexity:.4f}",
               "-" if i == 0 else f"{d:+.4f}", "-" if i == 0 else f"{100 * d / base.perplexity:+.2f}%",
               f"{r.seconds:.1f}"]
        if r.divergence:
            dv = r.divergence
            row += [f"{dv['kl_mean']:.4f}", f"{dv['kl_p99']:.4f}", f"{dv['same_top1_pct']:.2f}%",
                    f"{dv['ppl_ratio']:.4f}"]
        table.add_row(*row)
    console.print(table)
    if reference is not None:
        console.print(f"KL(reference || model) in nats and same-top-1 over the second half of each window "
                      f"(reference: {reference})")
