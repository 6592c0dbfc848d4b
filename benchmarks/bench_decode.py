"""Single-stream decode benchmark (issue 15): llmc vs llama.cpp vs onnxruntime-genai, one process.

One request at a time, greedy, EOS ignored: a 32-token prompt (real text) then 128 generated
tokens. Rows:
  - llmc SmolLM2 engines fp32, int8_sq, int4_awq and the default recipe (int4_asym, --matmul-accuracy
    fp32: answers identical to fp32) built through the resumable pipeline into benchmarks/.work/,
    reused when unchanged;
  - llama.cpp (llama-cpp-python from PyPI) on the embedded GGUF (Q4_1) and on F16, Q8_0 and Q4_0
    re-quantized from it with llama.cpp's own `llama_model_quantize` (allow_requantize);
  - onnxruntime-genai fp32 and int4 graphs from its model builder, run on an HF folder of the
    dequantized SmolLM2 (written with transformers from the GGUF).
The systems take turns per run (run 1 of every row, then run 2 ...), so a shared host's speed
drift hits them alike, with a short pause before each run (the previous system's spinning
thread-pool workers otherwise hold a core into the next one's prefill: measured TTFT 55 vs 29 ms); figures are medians of --runs runs. Per row: decode tok/s (after the first
token), TTFT, MBU against the measured copy bandwidth (weights one decode step reads + its KV),
agreement of the greedy tokens with llmc fp32 (leading tokens equal, of 128), and for llmc the
host ms per decode step outside the graph. Peers are optional (`pip install -e ".[bench]"`); a row
whose package is missing is skipped with a note. Writes benchmarks/results/bench_decode.json.

    python benchmarks/bench_decode.py [--runs 5] [--new-tokens 128] [--threads N] [--no-peers]
                                      [--no-spin]    (llmc rows with sleeping workers too)
                                      [--engine NAME=ENGINE_DIR ...]   (extra llmc rows, e.g. "before")
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, engine_for, write_results  # noqa: E402

LLMC_RECIPES = {"llmc fp32": "smollm2-fp32", "llmc int8_sq": "smollm2-int8_sq", "llmc int4_awq": "smollm2-int4_awq",
                "llmc int4_asym exact (default recipe)": "smollm2-int4_asym"}
GGUF_TYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
OGA_PRECISIONS = ("fp32", "int4")


# Seconds between two systems' runs: ONNX Runtime's spinning workers keep polling for tens of ms
# after a Run returns, and on 2 cores they halve the next system's first step.
SETTLE_S = 0.1


class Runner:
    """One system: run(prompt, n) -> (ttft s, decode s for tokens 2..n, generated ids)."""

    name: str
    read_bytes: int = 0          # weight bytes one decode step reads
    kv_bytes_per_token: int = 0

    def run(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        raise NotImplementedError

    def extras(self) -> dict:
        return {}


class LlmcRunner(Runner):
    def __init__(self, name: str, engine: Path, threads: int | None, spinning: bool | None = None):
        from llmc.bench import engine_weight_bytes
        from llmc.runtime.llm import LLM

        self.name = name
        self.llm = LLM(engine, kv_cache_mb=64, num_threads=threads, spinning=spinning)
        self.read_bytes = engine_weight_bytes(self.llm.engine)
        self.kv_bytes_per_token = self.llm.engine.kv_bytes_per_block // self.llm.block_size
        self.graph_ms: list[float] = []
        self.host_ms: list[float] = []

    def run(self, prompt, n):
        from llmc.runtime.sampling import SamplingParams

        self.llm.step_stats.clear()
        out = self.llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))[0]
        decode = out.finish_time - out.first_token_time
        steps = [s.seconds for s in self.llm.step_stats if s.num_decode == s.num_seqs]
        graph = float(np.median(steps)) if steps else 0.0
        self.graph_ms.append(graph * 1e3)
        self.host_ms.append((decode / max(1, n - 1) - graph) * 1e3)
        return out.ttft, decode, list(out.output_token_ids)

    def extras(self):
        g = self.llm.engine.graph
        return {"graph_ms_per_step_p50": float(np.median(self.graph_ms)),
                "host_ms_per_step_p50": float(np.median(self.host_ms)),
                "graph_nodes": g.get("node_count"), "lm_head": g.get("lm_head")}


def gguf_read_bytes(path: Path) -> tuple[int, int]:
    """(weight bytes a decode step reads, KV bytes per token at F16) of a GGUF model."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:  # untied: the embedding table is only gathered from
        total -= sizes.get("token_embd.weight", 0)

    def field(key):
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    arch = "llama"
    layers, heads = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count_kv")
    hd = field(f"{arch}.embedding_length") // field(f"{arch}.attention.head_count")
    return total, 2 * layers * heads * hd * 2


class LlamaCppRunner(Runner):
    def __init__(self, name: str, path: Path, threads: int):
        from llama_cpp import Llama

        self.name, self.path = name, path
        self.m = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                       verbose=False)
        self.read_bytes, self.kv_bytes_per_token = gguf_read_bytes(path)

    def run(self, prompt, n):
        # generate(reset=True) still reuses the KV of the longest prefix shared with the previous
        # call (the whole prompt here: TTFT would be one decode step); reset() forgets it.
        self.m.reset()
        toks, t0, t1 = [], time.perf_counter(), 0.0
        for tok in self.m.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not toks:
                t1 = time.perf_counter()
            toks.append(int(tok))
            if len(toks) == n:
                break
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, toks

    def perplexity(self, ids: list[int]) -> float:
        """Perplexity over `ids` (a sanity check of the re-quantized file, not a benchmark)."""
        from llama_cpp import Llama

        m = Llama(model_path=str(self.path), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
        m.eval(ids)
        logits = np.asarray(m.scores[: len(ids) - 1], np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
        del m
        return float(np.exp(nll))


def onnx_read_bytes(model_path: Path) -> int:
    """Initializer bytes of an ONNX graph, minus tables only ever gathered from (embeddings)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in m.graph.node:
        for i in node.input:
            users.setdefault(i, set()).add(node.op_type)
    total = 0
    for t in m.graph.initializer:
        if users.get(t.name) and users[t.name] <= {"Gather", "GatherBlockQuantized"}:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


class OgaRunner(Runner):
    def __init__(self, name: str, folder: Path, threads: int):
        import json

        import onnxruntime_genai as og

        self.og, self.name = og, name
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.read_bytes = onnx_read_bytes(folder / "model.onnx")

        c = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_bytes_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_size"] * 4

    def run(self, prompt, n):
        og = self.og
        p = og.GeneratorParams(self.model)
        p.set_search_options(max_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(self.model, p)
        toks = []
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([prompt], np.int32))
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
        t1 = time.perf_counter()
        while len(toks) < n:
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        del gen
        return t1 - t0, t2 - t1, toks


# ---- peer artifacts (built once into benchmarks/.work/) ------------------------------------------
def requantized_ggufs() -> dict[str, Path]:
    """The embedded Q4_1 GGUF and F16/Q8_0/Q4_0 re-quantized from it by llama.cpp's quantizer."""
    import llama_cpp

    from llmc.default_model import default_gguf_path

    src = default_gguf_path()
    out = {"Q4_1": src}
    d = WORK / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    for name, ftype in GGUF_TYPES.items():
        dst = d / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not dst.is_file():
            tmp = dst.with_suffix(".tmp")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, ftype)
            params.allow_requantize = True
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {name} failed ({rc})")
            tmp.rename(dst)
        out[name] = dst
    return out


def hf_folder() -> Path:
    """An HF folder of the dequantized SmolLM2 (transformers reads the GGUF), for OGA's builder."""
    out = WORK / "hf-smollm2-fp32"
    if (out / "model.safetensors").is_file():
        return out
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.default_model import default_gguf_path

    g = default_gguf_path()
    m = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(m.config, dtype=torch.float32)  # a GGUF-loaded model won't save
    fresh.load_state_dict(m.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    fresh.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)  # OGA's builder refuses "gguf" quantization
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)
    return out


def oga_model(precision: str) -> Path:
    import subprocess

    out = WORK / f"oga-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    src = hf_folder()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(WORK / f"oga-cache-{precision}")], check=True)
    return out


def agreement(tokens: list[int], ref: list[int]) -> int:
    n = 0
    for a, b in zip(tokens, ref):
        if a != b:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for every system (default: llmc's, physical cores); llmc's spinning "
                         "follows LLMC_ORT_SPINNING (default on, like the peers' own defaults)")
    ap.add_argument("--no-spin", action="store_true",
                    help="also an llmc row per recipe with sleeping thread-pool workers (llmc --no-spin, "
                         "LLMC_ORT_SPINNING=0): what a host shared with other busy processes would use")
    ap.add_argument("--no-peers", action="store_true", help="llmc rows only")
    ap.add_argument("--only", default=None, help="comma-separated row-name substrings to keep")
    ap.add_argument("--engine", action="append", default=[], metavar="NAME=DIR",
                    help="an extra llmc row on an existing engine (e.g. one built before a change)")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from llmc import bench as b
    from llmc.engine.backends.onnxruntime import default_threads
    from llmc.tokenizer import load_tokenizer

    console = Console(width=200)
    threads = args.threads or default_threads()
    console.print("building llmc engines (reused when unchanged)...")
    engines = {name: engine_for(r) for name, r in LLMC_RECIPES.items()}
    tok = load_tokenizer(engines["llmc fp32"])
    corpus = b.corpus_tokens(tok, None)
    prompt = corpus[1000:1000 + args.prompt_len]
    ppl_ids = corpus[5000:5256]

    for spec in args.engine:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_dir():
            ap.error(f"--engine wants NAME=ENGINE_DIR, got {spec!r}")
        engines[name] = Path(path)
    makers: dict[str, Callable[[], Runner]] = {
        name: (lambda name=name, e=e: LlmcRunner(name, e, args.threads)) for name, e in engines.items()}
    if args.no_spin:
        for name in LLMC_RECIPES:
            makers[f"{name} (no spin)"] = lambda name=name: LlmcRunner(f"{name} (no spin)", engines[name], args.threads,
                                                                        spinning=False)
    notes: list[str] = []
    if not args.no_peers:
        try:
            for q, path in requantized_ggufs().items():
                makers[f"llama.cpp {q}"] = lambda q=q, path=path: LlamaCppRunner(f"llama.cpp {q}", path, threads)
        except ImportError:
            notes.append("llama.cpp rows skipped: pip install llama-cpp-python (the bench extra)")
        try:
            import onnxruntime_genai  # noqa: F401

            for p in OGA_PRECISIONS:
                makers[f"onnxruntime-genai {p}"] = lambda p=p: OgaRunner(f"onnxruntime-genai {p}", oga_model(p), threads)
        except ImportError:
            notes.append("onnxruntime-genai rows skipped: pip install onnxruntime-genai onnx-ir (the bench extra)")
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        makers = {k: v for k, v in makers.items() if k == "llmc fp32" or any(s in k for s in keep)}
    for n in notes:
        console.print(f"[yellow]{n}[/]")
    bandwidth = b.measure_memory_bandwidth()
    runners = {}
    for name, make in makers.items():
        console.print(f"loading {name}")
        runners[name] = make()
        runners[name].run(prompt, 8)  # warm-up
    runs: dict[str, list[tuple[float, float, list[int]]]] = {k: [] for k in runners}
    for i in range(args.runs):
        for name, r in runners.items():
            console.print(f"run {i + 1}/{args.runs}: {name}    ", end="\r")
            time.sleep(SETTLE_S)
            runs[name].append(r.run(prompt, args.new_tokens))
    console.print()
    ref = runs["llmc fp32"][0][2]
    n = args.new_tokens
    rows = {}
    for name, r in runners.items():
        tps = [(n - 1) / d for _, d, _ in runs[name]]
        ttft = float(np.median([t for t, _, _ in runs[name]]))
        dec_tps = float(np.median(tps))
        step_s = 1.0 / dec_tps
        read = r.read_bytes + r.kv_bytes_per_token * (args.prompt_len + n // 2)
        row = {"decode_tok_s": dec_tps, "decode_tok_s_runs": tps, "ttft_ms": ttft * 1e3,
               "read_bytes_per_step": read, "mbu": read / step_s / bandwidth,
               "agree_with_fp32": agreement(runs[name][0][2], ref),
               "deterministic": all(x[2] == runs[name][0][2] for x in runs[name]), **r.extras()}
        if isinstance(r, LlamaCppRunner):
            row["perplexity_256"] = r.perplexity(ppl_ids)
        rows[name] = row

    def ratio(a, b_):
        return rows[a]["decode_tok_s"] / rows[b_]["decode_tok_s"] if a in rows and b_ in rows else None

    floors = {"llmc int4_awq / llama.cpp Q4_0": ratio("llmc int4_awq", "llama.cpp Q4_0"),
              "llmc int4_awq / onnxruntime-genai int4": ratio("llmc int4_awq", "onnxruntime-genai int4"),
              "llmc int8_sq / llama.cpp Q8_0": ratio("llmc int8_sq", "llama.cpp Q8_0"),
              "llmc fp32 / onnxruntime-genai fp32": ratio("llmc fp32", "onnxruntime-genai fp32"),
              "llmc fp32 / llama.cpp F16": ratio("llmc fp32", "llama.cpp F16"),
              "llmc int4_asym exact (default recipe) / llama.cpp Q4_1": ratio("llmc int4_asym exact (default recipe)",
                                                                             "llama.cpp Q4_1"),
              "llmc int4_awq (no spin) / llama.cpp Q4_0": ratio("llmc int4_awq (no spin)", "llama.cpp Q4_0"),
              "llmc int8_sq (no spin) / llama.cpp Q8_0": ratio("llmc int8_sq (no spin)", "llama.cpp Q8_0"),
              "llmc fp32 (no spin) / onnxruntime-genai fp32": ratio("llmc fp32 (no spin)", "onnxruntime-genai fp32")}
    t = Table(title=f"single-stream decode, SmolLM2-135M: {args.prompt_len}-token prompt, {n} new tokens, "
                    f"median of {args.runs} interleaved runs, {threads} threads, "
                    f"bandwidth {bandwidth / 1e9:.1f} GB/s")
    for c in ("system", "decode tok/s", "TTFT ms", "MB/step", "MBU", f"agree fp32 /{n}", "graph ms", "host ms",
              "ppl"):
        t.add_column(c)
    for name, r in rows.items():
        t.add_row(name, f"{r['decode_tok_s']:.1f}", f"{r['ttft_ms']:.1f}", f"{r['read_bytes_per_step'] / 1e6:.0f}",
                  f"{r['mbu'] * 100:.1f}%", str(r["agree_with_fp32"]),
                  f"{r['graph_ms_per_step_p50']:.2f}" if "graph_ms_per_step_p50" in r else "-",
                  f"{r['host_ms_per_step_p50']:.2f}" if "host_ms_per_step_p50" in r else "-",
                  f"{r['perplexity_256']:.2f}" if "perplexity_256" in r else "-")
    console.print(t)
    for k, v in floors.items():
        if v is not None:
            console.print(f"{k}: [bold]{v:.2f}x[/]")
    path = write_results("bench_decode", {
        "prompt_len": args.prompt_len, "new_tokens": n, "runs": args.runs, "threads": threads,
        "memory_bandwidth_gb_s": bandwidth / 1e9, "rows": rows, "ratios": floors, "notes": notes})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
