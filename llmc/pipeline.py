"""`llmc pipeline`: convert -> quantize -> build -> eval -> run, resumable.

Every stage has a key: a hash of its options, the key of the stage it reads from and the llmc
version (for convert, the source file's size and mtime stand in for its content). A stage whose
record on disk carries the same key, and whose artifact is present, is skipped; the record says
why it ran or why it was skipped. Artifacts are written through atomic directories and records
only after a stage succeeds, so a pipeline killed mid-stage reruns exactly that stage and never
uses a half-written artifact.

WORKDIR layout:
    checkpoint/  quantized/  engine/           artifacts (quantized/ only when quantizing)
    records/<stage>.json                        key, options, time, peak memory, size, results
    report.json                                 the final report
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmc import __version__
from llmc.errors import LlmcError
from llmc.fsutil import dir_size
from llmc.measure import PeakRSS
from llmc.recipes.schema import Recipe


@dataclass
class StageRecord:
    stage: str
    key: str
    options: dict[str, Any]
    status: str = "ran"               # ran | skipped
    reason: str = ""
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    artifact: str | None = None
    artifact_bytes: int | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_model(model: str) -> Path:
    if model == "builtin:smollm2":
        from llmc.default_model import default_gguf_path

        return default_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise LlmcError("model source not found (pass --model PATH to a Hugging Face dir or .gguf)", path)
    return path.resolve()


def _source_signature(path: Path) -> dict[str, Any]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path), "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


def output_under(workdir: Path, name: str) -> Path:
    """WORKDIR/name, refused unless it resolves (symlinks followed) inside the work dir."""
    root = workdir.resolve()
    path = workdir / name
    real = path.resolve()
    if real == root or root not in real.parents:
        raise LlmcError(f"stage output {path} resolves to {real}, outside the work dir {root}; refusing to "
                        "write there")
    return path


class Pipeline:
    def __init__(self, recipe: Recipe, workdir: Path, console=None, progress: bool = True):
        self.recipe = recipe
        self.workdir = Path(workdir)
        self.records_dir = self.workdir / "records"
        self.console = console
        self.progress = progress
        self.records: list[StageRecord] = []

    # ---- bookkeeping ---------------------------------------------------------------------
    def _previous(self, stage: str) -> dict[str, Any] | None:
        path = self.records_dir / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def _save(self, rec: StageRecord) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.records_dir / f".{rec.stage}.json.tmp"
        tmp.write_text(json.dumps(rec.__dict__, indent=2, default=str) + "\n")
        tmp.replace(self.records_dir / f"{rec.stage}.json")

    def _log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def stage(self, name: str, options: dict[str, Any], upstream: str, artifact: Path | None,
              fn: Callable[[], dict[str, Any]]) -> StageRecord:
        key = _hash(name, options, upstream, __version__)
        prev = self._previous(name)
        if prev is None:
            reason = "no previous run"
        elif prev.get("key") != key:
            changed = sorted(k for k in set(options) | set(prev.get("options", {}))
                             if options.get(k) != prev.get("options", {}).get(k))
            reason = (f"options changed: {', '.join(changed)}" if changed else "an upstream stage changed")
        elif artifact is not None and not (artifact / "config.json").is_file():
            reason = "artifact missing"
        else:
            rec = StageRecord(**{**prev, "status": "skipped",
                                 "reason": "unchanged: same options and inputs as the recorded run"})
            self._log(f"[dim]- {name}: skipped ({rec.reason})[/]")
            self.records.append(rec)
            return rec
        self._log(f"[bold cyan]> {name}[/] ({reason})")
        with PeakRSS() as mem:
            result = fn() or {}
        rec = StageRecord(name, key, options, "ran", reason, mem.seconds, mem.peak_bytes,
                          str(artifact) if artifact else None,
                          dir_size(artifact) if artifact is not None and artifact.exists() else None, result)
        self._save(rec)
        self.records.append(rec)
        return rec

    # ---- the stages ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        r = self.recipe
        wd = self.workdir
        wd.mkdir(parents=True, exist_ok=True)
        self.records_dir = output_under(wd, "records")
        source = resolve_model(r.model)
        conv_opts = {"source": _source_signature(source), **r.convert.model_dump()}
        ckpt = output_under(wd, "checkpoint")

        def do_convert():
            from llmc.converters.convert import convert

            res = convert(source, ckpt, dtype=r.convert.dtype, tp_size=r.convert.tp_size, force=True,
                          progress=self.progress)
            return {"parameters": res.num_params}

        conv = self.stage("convert", conv_opts, "", ckpt, do_convert)
        model_ckpt, upstream = ckpt, conv.key
        if r.quantize is not None:
            qdir = output_under(wd, "quantized")
            q = r.quantize

            def do_quantize():
                from llmc.quantize import quantize_checkpoint

                quantize_checkpoint(ckpt, qdir, **q.model_dump(), force=True, progress=self.progress)
                return {}

            quant = self.stage("quantize", q.model_dump(), upstream, qdir, do_quantize)
            model_ckpt, upstream = qdir, quant.key
        engine = output_under(wd, "engine")

        def do_build():
            from llmc.build.builder import build_engine
            from llmc.build.options import BuildOptions

            opts = BuildOptions.from_dict({**r.build.model_dump(), "force": True})
            res = build_engine(model_ckpt, engine, opts, console=self.console)
            return {"backend": getattr(res, "backend", r.build.backend)}

        built = self.stage("build", r.build.model_dump(), upstream, engine, do_build)
        results: dict[str, Any] = {}
        if r.eval is not None:
            ev = r.eval

            def do_eval():
                from llmc.evaluate import compare

                paths = [ckpt, *([model_ckpt] if model_ckpt != ckpt else []), engine]
                res = compare(paths, ev.data, seq_len=ev.seq_len, max_chunks=ev.max_chunks,
                              progress=self.progress, reference=ckpt)
                base, eng = res[0].perplexity, res[-1].perplexity
                out = {"baseline_ppl": base, "engine_ppl": eng, "delta_pct": 100 * (eng / base - 1),
                       "tokens": res[-1].tokens, "data": res[-1].data,
                       "engine_divergence": res[-1].divergence}
                if len(res) == 3:
                    out["checkpoint_ppl"] = res[1].perplexity
                    out["checkpoint_divergence"] = res[1].divergence
                return out

            results["eval"] = self.stage("eval", ev.model_dump(), _hash(conv.key, built.key), None, do_eval).result
        run = r.run

        def do_run():
            from llmc.runtime.llm import LLM
            from llmc.runtime.sampling import SamplingParams

            llm = LLM(engine)
            start = time.perf_counter()
            outs = llm.generate(run.prompts, SamplingParams(max_new_tokens=run.max_new_tokens), chat=run.chat)
            elapsed = time.perf_counter() - start
            ok = [o for o in outs if not o.error]
            ntok = sum(len(o.output_token_ids) for o in ok)
            med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
            del llm
            from llmc.evaluate import greedy_agreement

            # would the unquantized checkpoint have answered the same? (the run stage decodes greedily)
            agreement = (greedy_agreement([(o.prompt_token_ids, o.output_token_ids) for o in ok if o.output_token_ids], ckpt).to_dict()
                         if ok else None)
            return {"outputs": [{"prompt": p, "text": o.text, "error": o.error} for p, o in zip(run.prompts, outs)],
                    "greedy_agreement": agreement,
                    "ttft_ms": (med([o.ttft for o in ok if o.ttft]) or 0) * 1e3,
                    "tpot_ms": (med([o.tpot for o in ok if o.tpot]) or 0) * 1e3,
                    "output_tokens_per_s": ntok / elapsed}

        results["run"] = self.stage("run", run.model_dump(), built.key, None, do_run).result
        report = {"recipe": r.name, "workdir": str(wd), "stages": [rec.__dict__ for rec in self.records],
                  "results": results}
        output_under(wd, "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        return report
