"""`llmc eval`: perplexity of checkpoints (float and quantized), engines via the step API, compare."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from llmc.cli.app import main
from llmc.evaluate import compare, evaluate, is_engine_dir, token_windows
from llmc.models.reference import ReferenceModel
from llmc.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from test_quantize import make_text

    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(make_text(3000, seed=7))
    return path


def manual_ppl(ckpt, windows):
    model = ReferenceModel.from_checkpoint(ckpt)
    with torch.no_grad():
        logits = model(windows)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


def test_float_checkpoint_ppl_matches_manual(tiny_checkpoints, text_file):
    ck = tiny_checkpoints["llama"]
    r = evaluate(ck, text_file, seq_len=64, max_chunks=5, progress=False)
    windows, _ = token_windows(load_tokenizer(ck), text_file, 64, 5)
    assert r.chunks == 5 and r.tokens == 5 * 63 and r.quantization == "none" and r.kind == "checkpoint"
    assert r.perplexity == pytest.approx(manual_ppl(ck, windows), rel=1e-5)
    # windows are consecutive and non-overlapping
    all_ids = load_tokenizer(ck)(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert windows.reshape(-1).tolist() == all_ids[: 5 * 64]


def test_quantized_checkpoint_uses_simulation(tiny_checkpoints, text_file, tmp_path):
    from llmc.quantize.api import quantize_checkpoint
    from llmc.quantize.simulate import build_simulated_model

    ck = tiny_checkpoints["llama"]
    q = quantize_checkpoint(ck, tmp_path / "q", "int8_wo", progress=False).out
    r = evaluate(q, text_file, seq_len=64, max_chunks=3, progress=False)
    windows, _ = token_windows(load_tokenizer(q), text_file, 64, 3)
    with torch.no_grad():
        logits = build_simulated_model(q)(windows)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert r.quantization == "W8A16" and r.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    base = evaluate(ck, text_file, seq_len=64, max_chunks=3, progress=False)
    assert r.perplexity != base.perplexity and r.perplexity == pytest.approx(base.perplexity, rel=0.05)


class FakeEngine:
    """Implements the documented step API over the reference model, with a real slot-addressed
    KV store (tokens by slot), so chunked prefill has to supply correct positions and slots."""

    def __init__(self, ckpt, max_num_tokens):
        self.model = ReferenceModel.from_checkpoint(ckpt)
        self.config = {"tokens_per_block": 16, "max_num_tokens": max_num_tokens, "max_seq_len": 256}
        self.steps = 0

    def allocate_kv_pool(self, num_blocks):
        self.pool = np.full(num_blocks * 16, -1, np.int64)

    def step(self, batch):
        self.steps += 1
        assert len(batch.seqs) == 1
        seq = batch.seqs[0]
        self.pool[batch.slot_mapping] = batch.input_ids
        table = seq.block_table
        slots = [table[p // 16] * 16 + p % 16 for p in range(seq.context_len)]
        ids = torch.from_numpy(self.pool[slots])[None]
        assert (ids >= 0).all(), "a context token was never written to its slot"
        with torch.no_grad():
            logits = self.model(ids)[0]
        return logits[torch.from_numpy(batch.positions)][batch.logits_indices].numpy()


def test_engine_dir_goes_through_step_api(tiny_checkpoints, text_file, tmp_path, monkeypatch):
    import llmc.engine

    ck = tiny_checkpoints["llama"]
    eng = tmp_path / "engine"
    eng.mkdir()
    (eng / "config.json").write_text(json.dumps({"engine": {"backend": "fake"}}))
    shutil.copy(ck / "tokenizer.json", eng / "tokenizer.json")
    shutil.copy(ck / "tokenizer_config.json", eng / "tokenizer_config.json")
    assert is_engine_dir(eng) and not is_engine_dir(ck)
    fake = FakeEngine(ck, max_num_tokens=24)
    monkeypatch.setattr(llmc.engine, "load_engine", lambda path: fake, raising=False)
    r = evaluate(eng, text_file, seq_len=64, max_chunks=2, progress=False)
    assert r.kind == "engine" and fake.steps == 2 * 3  # 64 tokens in chunks of <= 24
    base = evaluate(ck, text_file, seq_len=64, max_chunks=2, progress=False)
    assert r.perplexity == pytest.approx(base.perplexity, rel=1e-5)


def test_compare_cli_table(tiny_checkpoints, text_file, tmp_path, capsys):
    from llmc.quantize.api import quantize_checkpoint

    ck = tiny_checkpoints["llama"]
    q = quantize_checkpoint(ck, tmp_path / "q4", "int4_wo", progress=False).out
    res = compare([ck, q], text_file, seq_len=64, max_chunks=2, progress=False)
    assert res[0].tokens == res[1].tokens
    code = main(["eval", "--compare", str(ck), str(q), "--data", str(text_file), "--seq-len", "64", "--max-chunks", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "W4A16_AWQ" in out and "delta" in out and "%" in out
    code = main(["eval", str(q), "--data", str(text_file), "--seq-len", "64", "--max-chunks", "2", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data[0]["perplexity"] == pytest.approx(res[1].perplexity, rel=1e-6)


def test_eval_errors(tiny_checkpoints, text_file, tmp_path, capsys):
    ck = str(tiny_checkpoints["llama"])
    assert main(["eval", ck, "--data", str(text_file), "--seq-len", "100000"]) == 2
    err = capsys.readouterr().err
    # issue 10: a window longer than the model's positions is refused before tokenizing
    assert "exceeds the model's max_position_embeddings (512)" in err and len(err.strip().splitlines()) == 1
    # Several paths imply --compare (issue 13); tests/test_cli_conventions.py checks it runs.
    assert main(["eval", ck, "--data", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_real_engine_matches_checkpoint(tiny_checkpoints, text_file, tmp_path):
    """An ONNX Runtime engine built from the checkpoint scores the same text the same way."""
    from llmc.build import BuildOptions, build_engine

    ck = tiny_checkpoints["llama"]
    eng = build_engine(ck, tmp_path / "eng", BuildOptions(
        tokens_per_block=16, max_batch_size=2, max_seq_len=128, max_num_tokens=48)).out
    a, b = compare([ck, eng], text_file, seq_len=64, max_chunks=2, progress=False)
    assert b.kind == "engine" and b.perplexity == pytest.approx(a.perplexity, rel=1e-4)


# ---- distribution-level accuracy (--reference) ---------------------------------------------

def _scipy_kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    from scipy.special import rel_entr, softmax

    return rel_entr(softmax(ref_logits.astype(np.float64), -1), softmax(logits.astype(np.float64), -1)).sum(-1)


def test_kl_per_position_matches_scipy():
    from llmc.evaluate import kl_per_position

    rng = np.random.default_rng(0)
    ref = rng.normal(0, 4, (3, 7, 500)).astype(np.float32)
    other = (ref + rng.normal(0, 0.7, ref.shape)).astype(np.float32)
    other[0, 0] = ref[0, 0]  # one identical distribution: KL 0
    kl, same = kl_per_position(torch.from_numpy(ref), torch.from_numpy(other))
    expect = _scipy_kl(ref, other).reshape(-1)
    np.testing.assert_allclose(kl.numpy(), expect, rtol=1e-4, atol=1e-6)
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and (expect > 1e-3).sum() > 10
    assert same.numpy().tolist() == (ref.argmax(-1) == other.argmax(-1)).reshape(-1).tolist()


def test_reference_divergence_against_independent_computation(tiny_checkpoints, text_file, tmp_path, capsys):
    from llmc.quantize.api import quantize_checkpoint
    from llmc.quantize.simulate import build_simulated_model

    ck = tiny_checkpoints["llama"]
    q = quantize_checkpoint(ck, tmp_path / "q4", "int4_wo", progress=False).out
    base, res = compare([ck, q], text_file, seq_len=64, max_chunks=3, progress=False, reference=ck)
    assert base.divergence["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    assert base.divergence["same_top1_pct"] == 100.0 and base.divergence["ppl_ratio"] == pytest.approx(1.0)

    windows, _ = token_windows(load_tokenizer(ck), text_file, 64, 3)
    with torch.no_grad():
        ref_logits = ReferenceModel.from_checkpoint(ck)(windows).numpy()
        q_logits = build_simulated_model(q)(windows).numpy()
    half = slice(32, 63)  # second half of a 64-token window: positions 32..62 predict tokens 33..63
    kl = _scipy_kl(ref_logits[:, half], q_logits[:, half]).reshape(-1)
    d = res.divergence
    assert d["positions"] == 3 * 31 == kl.size
    assert d["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4) and d["kl_mean"] > 1e-4
    assert d["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-4)
    same = (ref_logits[:, half].argmax(-1) == q_logits[:, half].argmax(-1)).mean() * 100
    assert d["same_top1_pct"] == pytest.approx(same)
    assert d["ppl_ratio"] == pytest.approx(res.perplexity / base.perplexity, rel=1e-6)

    # the reference need not be among the evaluated paths; the CLI prints the figures
    alone = evaluate(q, text_file, seq_len=64, max_chunks=3, progress=False, reference=ck)
    assert alone.divergence["kl_mean"] == pytest.approx(d["kl_mean"], rel=1e-6)
    code = main(["eval", "--compare", str(ck), str(q), "--data", str(text_file), "--seq-len", "64",
                 "--max-chunks", "3", "--reference", str(ck)])
    out = capsys.readouterr().out
    assert code == 0 and "KL(reference || model)" in out and "ppl" in out
    code = main(["eval", str(q), "--data", str(text_file), "--seq-len", "64", "--max-chunks", "3",
                 "--reference", str(ck), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data[0]["divergence"]["kl_p99"] == pytest.approx(d["kl_p99"], rel=1e-6)
    assert main(["eval", str(q), "--data", str(text_file), "--reference", str(tmp_path / "nope")]) == 2


def test_greedy_agreement_teacher_forced(tiny_checkpoints):
    from llmc.evaluate import greedy_agreement

    ck = tiny_checkpoints["llama"]
    model = ReferenceModel.from_checkpoint(ck)
    requests = []
    for seed in range(3):
        prompt = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):  # plain greedy generation loop, no cache
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        requests.append((prompt, ids[len(prompt):]))
    g = greedy_agreement(requests, ck)
    assert (g.prompts, g.identical, g.first_token, g.prefix_pct) == (3, 3, 3, 100.0)
    p, o = requests[1]
    bad = o[:3] + [(o[3] + 1) % 200] + o[4:]  # diverges at its 4th token
    g = greedy_agreement([requests[0], (p, bad)], ck)
    assert (g.identical, g.first_token, g.differing) == (1, 2, [1]) and g.prefix_pct == pytest.approx((100 + 50) / 2)
