"""The runtime over a real engine: in-flight batching == one at a time, bad input (issue 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.build import BuildOptions, build_engine
from llmc.runtime.llm import LLM
from llmc.runtime.sampling import SamplingParams

SYSTEM = "You are a careful assistant. "  # shared by every prompt: a prefix-cache hit
QUESTIONS = ["What did Washington say about the militia?", "Summarise the economy.",
             "Name two treaties.", "Why do tariffs matter to farmers, and to industry?", "Hi",
             "Describe the navy."]


def _build(ckpt: Path, out: Path, **kw) -> Path:
    opts = dict(max_batch_size=4, max_input_len=160, max_seq_len=192, tokens_per_block=16)
    opts.update(kw)
    build_engine(ckpt, out, BuildOptions(**opts))
    return out


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoints, tmp_path_factory) -> Path:
    return _build(tiny_checkpoints["llama"], tmp_path_factory.mktemp("eng") / "tiny")


def _alone(engine: Path, prompts: list[list[int]], new: list[int]) -> list[list[int]]:
    outs = []
    for p, n in zip(prompts, new):
        llm = LLM(engine, num_blocks=64)
        outs.append(llm.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].output_token_ids)
    return outs


def _inflight(engine: Path, prompts: list[list[int]], new: list[int], num_blocks: int, prefill_budget=None):
    """Staggered arrivals: two requests first, the rest join while those are decoding."""
    llm = LLM(engine, num_blocks=num_blocks, prefill_budget=prefill_budget)
    done = {}
    pending = list(range(len(prompts)))
    for i in pending[:2]:
        llm.add_request(prompts[i], SamplingParams(max_new_tokens=new[i], ignore_eos=True), request_id=i)
    pending = pending[2:]
    steps = 0
    while llm.has_unfinished() or pending:
        if pending and steps % 3 == 2:
            i = pending.pop(0)
            llm.add_request(prompts[i], SamplingParams(max_new_tokens=new[i], ignore_eos=True), request_id=i)
        for out in llm.step():
            done[out.request_id] = out
        llm.scheduler.check_invariants()
        steps += 1
    return llm, [done[i] for i in range(len(prompts))]


def _workload(llm_tokenizer_dir: Path):
    from llmc.tokenizer import load_tokenizer

    tok = load_tokenizer(llm_tokenizer_dir)
    prompts = [tok.encode(SYSTEM + q, add_special_tokens=False) for q in QUESTIONS]
    new = [24, 9, 31, 17, 40, 12]
    return prompts, new


def test_inflight_matches_alone_tiny(tiny_engine):
    prompts, new = _workload(tiny_engine)
    expected = _alone(tiny_engine, prompts, new)
    llm, outs = _inflight(tiny_engine, prompts, new, num_blocks=13)
    assert [o.output_token_ids for o in outs] == expected
    assert sum(o.num_preemptions for o in outs) > 0, "the small pool should have forced preemption"
    assert llm.block_manager.num_used_blocks == 0
    llm.block_manager.check_invariants()
    assert llm.block_manager.prefix_hit_tokens > 0, "the shared system prompt should hit the prefix cache"


def test_prefill_budget_keeps_greedy_outputs(tiny_engine):
    """The prefill-budget policy only changes how prompts are chunked into steps: a float engine's
    greedy outputs are the same token for token (and prompts still hit the prefix cache)."""
    prompts, new = _workload(tiny_engine)
    expected = _alone(tiny_engine, prompts, new)
    llm, outs = _inflight(tiny_engine, prompts, new, num_blocks=64, prefill_budget=7)
    assert [o.output_token_ids for o in outs] == expected
    assert max(s.num_tokens - s.num_decode for s in llm.step_stats) <= 7
    assert llm.block_manager.num_used_blocks == 0


def test_bad_requests_fail_alone(tiny_engine):
    llm = LLM(tiny_engine, num_blocks=64)
    long_prompt = list(range(5, 5 + 200))  # > max_input_len 160
    outs = llm.generate([long_prompt, "fine", "", "capped"],
                        [SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4),
                         SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=10_000, ignore_eos=True)])
    assert outs[0].finish_reason == "error" and "at most 160" in outs[0].error
    assert outs[1].error is None and len(outs[1].output_token_ids) >= 1
    assert outs[2].error is None and outs[2].prompt_token_ids == [256]  # empty prompt -> BOS
    assert outs[3].finish_reason == "length"
    assert len(outs[3].prompt_token_ids) + len(outs[3].output_token_ids) == 192  # capped at max_seq_len
    assert llm.block_manager.num_used_blocks == 0


def test_sampling_is_seeded_and_streams(tiny_engine):
    llm = LLM(tiny_engine, num_blocks=64)
    sp = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_new_tokens=12, ignore_eos=True)
    a = llm.generate(["abc"], sp)[0].output_token_ids
    b = llm.generate(["abc"], sp)[0].output_token_ids
    assert a == b
    pieces = list(llm.stream("abc", SamplingParams(max_new_tokens=6, ignore_eos=True)))
    assert pieces and "".join(pieces) == llm.generate(["abc"], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.cli.app", *args], capture_output=True, text=True)


def test_cli_run_prints_inputs_outputs_and_speed(tiny_engine):
    r = _cli("run", str(tiny_engine), "--prompt", "hello", "--prompt", "world", "--max-new-tokens", "5",
             "--kv-cache-mb", "4")
    assert r.returncode == 0, r.stderr
    assert "Input [0]:" in r.stdout and "Output [1]:" in r.stdout
    assert "TTFT" in r.stdout and "TPOT" in r.stdout and "tokens/s" in r.stdout


def test_cli_run_rejects_missing_and_incompatible_engines(tiny_engine, tmp_path):
    r = _cli("run", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    import shutil

    bad = tmp_path / "old"
    shutil.copytree(tiny_engine, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["engine"]["format_version"] = 999
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _cli("run", str(bad), "--prompt", "x")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "llmc build" in r.stderr, r.stderr


def test_cli_bench_reports_and_sweeps(tiny_engine, tmp_path):
    r = _cli("bench", str(tiny_engine), "--num-requests", "6", "--input-len", "8:40", "--output-len", "4:12",
             "--output", str(tmp_path / "b.json"), "--sweep", "max-batch-size=1,4", "--sweep-out", str(tmp_path / "sw"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [row["max_batch_size"] for row in rows] == [1, 4]
    for row in rows:
        assert row["errors"] == 0 and row["output_tokens"] > 0
        assert set(row["ttft_s"]) == {"p50", "p90", "p99"} and row["peak_kv_blocks"] > 0
    for f in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (tmp_path / "sw" / f).stat().st_size > 0


@pytest.mark.slow
def test_inflight_matches_alone_smollm2(smollm2_checkpoint, tmp_path):
    """fp32 SmolLM2: staggered arrivals, different lengths, shared prefixes, forced preemption."""
    engine = _build(smollm2_checkpoint, tmp_path / "engine", max_input_len=96, max_seq_len=128)
    prompts, new = _workload(engine)
    expected = _alone(engine, prompts, new)
    llm, outs = _inflight(engine, prompts, new, num_blocks=9)
    assert [o.output_token_ids for o in outs] == expected
    assert sum(o.num_preemptions for o in outs) > 0
    assert llm.block_manager.num_used_blocks == 0
    llm.block_manager.check_invariants()
