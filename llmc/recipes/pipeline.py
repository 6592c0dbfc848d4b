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
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmc import __version__
from llmc.errors import LlmcError
from llmc.fsutil import dir_size, write_file_atomic
from llmc.measure import PeakRSS
from llmc.recipes.schema import Recipe

_logger = logging.getLogger(__name__)


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
        write_file_atomic(self.records_dir / f"{rec.stage}.json", json.dumps(rec.__dict__, indent=2, default=str) + "\n")

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
        _logger.debug("pipeline stage %s: %.2f s, peak RSS %.0f MiB", name, mem.seconds, mem.peak_bytes / 2**20)
        rec = StageRecord(name, key, options, "ran", reason, mem.seconds, mem.peak_bytes,
                          str(artifact) if artifact else None,
                          dir_size(artifact) if artifact is not None and artifact.exists() else None, result)
        self._save(rec)
        self.records.append(rec)
        return rec

    # ---- the stages ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or skip) every stage in order and write report.json. Each stage's key chains the
        keys it reads from, so a changed option reruns that stage and everything downstream."""
        wd = self.workdir
        wd.mkdir(parents=True, exist_ok=True)
        self.records_dir = output_under(wd, "records")
        self.checkpoint = output_under(wd, "checkpoint")
        self.engine = output_under(wd, "engine")
        conv = self._convert()
        model_ckpt, upstream = self.checkpoint, conv.key
        if self.recipe.quantize is not None:
            model_ckpt = output_under(wd, "quantized")
            upstream = self._quantize(model_ckpt, upstream).key
        built = self._build(model_ckpt, upstream)
        results: dict[str, Any] = {}
        if self.recipe.eval is not None:
            results["eval"] = self._eval(model_ckpt, _hash(conv.key, built.key)).result
        results["run"] = self._run(built.key).result
        report = {"recipe": self.recipe.name, "workdir": str(wd), "stages": [rec.__dict__ for rec in self.records],
                  "results": results}
        write_file_atomic(output_under(wd, "report.json"), json.dumps(report, indent=2, default=str) + "\n")
        return report

    def _convert(self) -> StageRecord:
        """Source -> checkpoint/. The source's file sizes and mtimes stand in for its content in
        the key (hashing gigabytes on every run would cost more than converting small models)."""
        source = resolve_model(self.recipe.model)
        c = self.recipe.convert

        def do_convert():
            if c.keep_quantization:
                from llmc.quantize.gguf_keep import convert_keeping_quantization

                res = convert_keeping_quantization(source, self.checkpoint, force=True)
                return {"kept": res.kept, "dequantized": len(res.dequantized)}
            from llmc.converters.convert import convert

            res = convert(source, self.checkpoint, dtype=c.dtype, tp_size=c.tp_size, force=True,
                          progress=self.progress)
            return {"parameters": res.num_params}

        options = {"source": _source_signature(source), **c.model_dump()}
        return self.stage("convert", options, "", self.checkpoint, do_convert)

    def _quantize(self, qdir: Path, upstream: str) -> StageRecord:
        """checkpoint/ -> quantized/ with the recipe's quantize options (QuantizeOptions)."""
        q = self.recipe.quantize

        def do_quantize():
            from llmc.quantize import quantize_checkpoint

            quantize_checkpoint(self.checkpoint, qdir, **q.model_dump(), force=True, progress=self.progress)
            return {}

        return self.stage("quantize", q.model_dump(), upstream, qdir, do_quantize)

    def _build(self, model_ckpt: Path, upstream: str) -> StageRecord:
        """The (quantized) checkpoint -> engine/ with the recipe's BuildOptions."""
        b = self.recipe.build

        def do_build():
            from llmc.build.builder import build_engine
            from llmc.build.options import BuildOptions

            opts = BuildOptions.from_dict({**b.model_dump(), "force": True})
            res = build_engine(model_ckpt, self.engine, opts, console=self.console)
            return {"backend": getattr(res, "backend", b.backend)}

        return self.stage("build", b.model_dump(), upstream, self.engine, do_build)

    def _eval(self, model_ckpt: Path, upstream: str) -> StageRecord:
        """Perplexity of the unquantized checkpoint, the simulated quantized checkpoint (when
        there is one) and the engine on the same windows, with the engine's divergence from the
        unquantized checkpoint: the accuracy cost of each step, separately."""
        ev, ckpt = self.recipe.eval, self.checkpoint

        def do_eval():
            from llmc.evaluate import compare

            paths = [ckpt, *([model_ckpt] if model_ckpt != ckpt else []), self.engine]
            res = compare(paths, ev.data, seq_len=ev.seq_len, max_chunks=ev.max_chunks,
                          progress=self.progress, reference=ckpt)
            base, eng = res[0].perplexity, res[-1].perplexity
            out = {"baseline_ppl": base, "engine_ppl": eng, "delta_pct": 100 * (eng / base - 1),
                   "tokens": res[-1].tokens, "data": res[-1].data, "engine_divergence": res[-1].divergence}
            if len(res) == 3:
                out["checkpoint_ppl"] = res[1].perplexity
                out["checkpoint_divergence"] = res[1].divergence
            return out

        return self.stage("eval", ev.model_dump(), upstream, None, do_eval)

    def _run(self, upstream: str) -> StageRecord:
        """The recipe's prompts through the engine (greedy), with speed figures and whether the
        unquantized checkpoint would have answered the same."""
        run = self.recipe.run
        return self.stage("run", run.model_dump(), upstream, None,
                          lambda: run_prompts(self.engine, self.checkpoint, run.prompts, run.max_new_tokens, run.chat))


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def run_prompts(engine: Path, reference: Path, prompts: list[str], max_new_tokens: int, chat: bool) -> dict[str, Any]:
    """The run stage's result: outputs, greedy agreement with `reference`, TTFT/TPOT medians and
    output tokens/s. The engine is released before the reference model loads (peak memory)."""
    from llmc.evaluate import greedy_agreement
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampling import SamplingParams

    llm = LLM(engine)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens), chat=chat)
    elapsed = time.perf_counter() - start
    del llm
    ok = [o for o in outs if not o.error]
    answered = [(o.prompt_token_ids, o.output_token_ids) for o in ok if o.output_token_ids]
    agreement = greedy_agreement(answered, reference).to_dict() if ok else None
    return {"outputs": [{"prompt": p, "text": o.text, "error": o.error} for p, o in zip(prompts, outs)],
            "greedy_agreement": agreement,
            "ttft_ms": (_median([o.ttft for o in ok if o.ttft]) or 0) * 1e3,
            "tpot_ms": (_median([o.tpot for o in ok if o.tpot]) or 0) * 1e3,
            "output_tokens_per_s": sum(len(o.output_token_ids) for o in ok) / elapsed}
