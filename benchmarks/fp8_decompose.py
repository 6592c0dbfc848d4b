"""Where SmolLM2-135M's FP8 error comes from, and what recovers it (issue 14's FP8 target).

    OMP_NUM_THREADS=1 python benchmarks/fp8_decompose.py [--eval-chunks 16]

FP8 per-channel weights / per-token dynamic activations (fp8_pc_pt, TensorRT-LLM's FP8 rowwise
mode) is fake-quantized straight into the float32 reference model, linear by linear, with the
same arithmetic as `llmc.quantize.simulate` (E4M3, round to nearest even, scale = amax / 448):
- weights only / activations only / both, on every decoder linear;
- one linear type at a time (qkv, dense, fc+gate, proj) and all but one type (what
  `--exclude '*.mlp.proj'` would buy);
- SmoothQuant-style pre-scaling (x / s, W * s with s_j = max|x_j|^a / max|W_j|^(1-a), a = 0.5,
  calibrated on builtin:sotu) before the per-token activation rounding;
- per-tensor FP8 (the `fp8` format: static activation scale) for scale.
Each variant's KL(P_fp32 || P) (second half of every window) and perplexity on builtin:brown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

TYPES = {"qkv": "attention.qkv", "dense": "attention.dense", "fc+gate": "mlp.gate_up", "proj": "mlp.proj"}


def fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from llmc.quantize.layout import fp8_round

    return fp8_round(x / scale) * scale


def per_row_scale(t: torch.Tensor) -> torch.Tensor:
    amax = t.abs().amax(-1, keepdim=True)
    return torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))


class FakeFP8(nn.Module):
    """y = Q_a(x / s) @ Q_w(W * s)^T: per-channel weight, per-token (or static) activation."""

    def __init__(self, lin: nn.Linear, weights: bool, acts: bool, smooth: torch.Tensor | None = None,
                 static_act: float | None = None, per_tensor_w: bool = False):
        super().__init__()
        w = lin.weight.detach().float()
        self.smooth = smooth
        if smooth is not None:
            w = w * smooth[None, :]
        if weights:
            w = fp8(w, w.abs().max() / 448.0) if per_tensor_w else fp8(w, per_row_scale(w))
        self.register_buffer("w", w)
        self.bias = lin.bias
        self.acts, self.static_act = acts, static_act

    def forward(self, x):
        if self.smooth is not None:
            x = x / self.smooth
        if self.acts:
            x = fp8(x, torch.tensor(self.static_act)) if self.static_act else fp8(x, per_row_scale(x))
        y = x @ self.w.T
        return y + self.bias if self.bias is not None else y


def linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def act_stats(model, batches) -> tuple[dict, dict]:
    """Per input channel max |x| and per-tensor max |x| of every decoder linear's input."""
    chan, hooks = {}, []
    for name, m in linears(model).items():
        def hook(mod, inp, out, name=name):
            a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            chan[name] = a if name not in chan else torch.maximum(chan[name], a)
        hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return chan, {n: float(a.max()) for n, a in chan.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_decompose.json"))
    a = ap.parse_args()

    from llmc.checkpoint.io import load_checkpoint
    from llmc.default_model import ensure_default_checkpoint
    from llmc.evaluate import _DivergenceAcc, _nll_sum, token_windows
    from llmc.models.reference import ReferenceModel
    from llmc.quantize.calib_data import calibration_windows
    from llmc.tokenizer import load_tokenizer

    ckpt = ensure_default_checkpoint("float32")
    tok = load_tokenizer(ckpt)
    windows, desc = token_windows(tok, "builtin:brown", a.seq_len, a.eval_chunks)
    calib, _ = calibration_windows(tok, "builtin:sotu", calib_size=8, seq_len=512, seed=0)
    model = ReferenceModel.from_checkpoint(load_checkpoint(ckpt), dtype=torch.float32).eval()
    originals = linears(model)
    chan, tensor_amax = act_stats(model, calib.split(4))
    with torch.no_grad():
        ref = [model(b) for b in windows.split(4)]
    ref_nll = sum(_nll_sum(r, b) for r, b in zip(ref, windows.split(4)))
    ntok = windows.shape[0] * (windows.shape[1] - 1)

    def smooth_for(name, alpha):
        w = originals[name].weight.detach().float().abs().amax(0).clamp_min(1e-5)
        return (chan[name].clamp_min(1e-5) ** alpha / w ** (1 - alpha)).clamp_min(1e-5)

    def variant(select, weights=True, acts=True, alpha=None, static=False, per_tensor_w=False):
        for name, lin in originals.items():
            parent, _, child = name.rpartition(".")
            use = select(name)
            mod = FakeFP8(lin, weights and use, acts and use,
                          smooth_for(name, alpha) if (alpha is not None and use) else None,
                          (tensor_amax[name] / 448.0) if static else None, per_tensor_w) if use else lin
            setattr(model.get_submodule(parent), child, mod)
        acc, nll = _DivergenceAcc(), 0.0
        with torch.no_grad():
            for r, b in zip(ref, windows.split(4)):
                logits = model(b)
                nll += _nll_sum(logits, b)
                acc.add(r, logits)
        for name, lin in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
        d = acc.result("fp32", float(torch.tensor((nll - ref_nll) / ntok).exp()))
        return {"kl_mean": d.kl_mean, "kl_p99": d.kl_p99, "same_top1_pct": d.same_top1_pct,
                "ppl_delta_pct": 100 * (d.ppl_ratio - 1)}

    every = lambda n: True  # noqa: E731
    runs = {
        "fp8_pc_pt (weights + activations)": dict(select=every),
        "weights only": dict(select=every, acts=False),
        "activations only": dict(select=every, weights=False),
    }
    for t, suffix in TYPES.items():
        runs[f"only {t}"] = dict(select=lambda n, s=suffix: n.endswith(s))
    for t, suffix in TYPES.items():
        runs[f"all but {t}"] = dict(select=lambda n, s=suffix: not n.endswith(s))
    runs["smooth a=0.5"] = dict(select=every, alpha=0.5)
    runs["fp8 per-tensor (static act)"] = dict(select=every, static=True, per_tensor_w=True)
    results = {}
    print(f"{desc}: {windows.shape[0]} x {windows.shape[1]}")
    for name, kw in runs.items():
        t0 = time.perf_counter()
        results[name] = variant(**kw)
        r = results[name]
        print(f"{name:38} KL {r['kl_mean']:.4f} p99 {r['kl_p99']:.3f} top1 {r['same_top1_pct']:5.1f}% "
              f"ppl {r['ppl_delta_pct']:+.2f}%  ({time.perf_counter() - t0:.0f}s)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"eval": {"description": desc, "chunks": int(windows.shape[0]), "seq_len": a.seq_len},
                                 "results": results, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
