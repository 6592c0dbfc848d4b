"""`llmc pipeline`: end to end, resume, partial rerun, and a kill mid-stage (issue 6)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import yaml

from llmc.recipes.pipeline import Pipeline
from llmc.recipes.schema import apply_overrides, load_recipe, parse_recipe


@pytest.fixture
def tiny_recipe(tmp_path, tiny_hf_dirs):
    text = tmp_path / "eval.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)
    data = {
        "name": "tiny", "model": str(tiny_hf_dirs["llama"]),
        "quantize": {"qformat": "int4_wo", "calib_data": str(text), "calib_size": 4, "calib_seq_len": 32},
        "build": {"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 128, "tokens_per_block": 16},
        "eval": {"data": str(text), "seq_len": 64, "max_chunks": 4},
        "run": {"prompts": ["hello", "world"], "max_new_tokens": 4, "chat": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_recipe(data, path)


def _statuses(report) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in report["stages"]}


def test_resume_and_partial_rerun(tiny_recipe, tmp_path):
    wd = tmp_path / "work"
    first = Pipeline(tiny_recipe, wd, progress=False).run()
    assert _statuses(first) == dict.fromkeys(["convert", "quantize", "build", "eval", "run"], "ran")
    assert first["results"]["eval"]["engine_ppl"] > 1
    assert all(o["error"] is None for o in first["results"]["run"]["outputs"])
    # distribution-level accuracy vs the unquantized checkpoint: the INT4 engine moves the
    # distributions as much as its exact simulation does
    ev = first["results"]["eval"]
    eng_kl, sim_kl = ev["engine_divergence"]["kl_mean"], ev["checkpoint_divergence"]["kl_mean"]
    assert eng_kl > 0 and eng_kl == pytest.approx(sim_kl, rel=0.05), ev
    g = first["results"]["run"]["greedy_agreement"]
    assert g["prompts"] == 2 and 0 <= g["identical"] <= g["first_token"] <= 2
    import io

    from rich.console import Console

    from llmc.recipes.report import print_report

    buf = io.StringIO()
    print_report(first, Console(file=buf, width=200))
    assert "KL mean" in buf.getvalue() and "greedy agreement" in buf.getvalue()
    for s in first["stages"]:
        assert s["seconds"] > 0 and s["peak_rss_bytes"] > 0
    assert json.loads((wd / "report.json").read_text())["recipe"] == "tiny"
    # Unset recipe options mean `llmc quantize`'s defaults: lm_head stays float, as on the CLI.
    qcfg = json.loads((wd / "quantized" / "config.json").read_text())
    assert qcfg["quantization"]["exclude_modules"] == ["lm_head"]

    again = Pipeline(tiny_recipe, wd, progress=False).run()
    assert set(_statuses(again).values()) == {"skipped"}
    assert again["results"]["eval"] == first["results"]["eval"]

    changed = apply_overrides(tiny_recipe, ["build.max_batch_size=3"])
    third = Pipeline(changed, wd, progress=False).run()
    assert _statuses(third) == {"convert": "skipped", "quantize": "skipped", "build": "ran",
                                "eval": "ran", "run": "ran"}
    build = next(s for s in third["stages"] if s["stage"] == "build")
    assert build["reason"] == "options changed: max_batch_size"


def _killed_run(recipe_json: str, wd: str) -> None:
    """Child process: die by SIGKILL right before the engine directory would be renamed in."""
    import llmc.fsutil as fsutil

    real_rename = os.rename

    def rename(src, dst):
        if str(dst).endswith("engine"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst)

    fsutil.os.rename = rename
    from llmc.recipes.schema import Recipe

    Pipeline(Recipe.model_validate_json(recipe_json), Path(wd), progress=False).run()


def test_killed_mid_stage_then_rerun(tiny_recipe, tmp_path):
    wd = tmp_path / "work"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_killed_run, args=(tiny_recipe.model_dump_json(), str(wd)))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    assert not (wd / "engine").exists(), "no half-written engine may appear under its real name"
    assert not (wd / "records" / "build.json").exists()
    report = Pipeline(tiny_recipe, wd, progress=False).run()
    st = _statuses(report)
    assert st["convert"] == st["quantize"] == "skipped" and st["build"] == "ran"
    assert all(o["error"] is None for o in report["results"]["run"]["outputs"])


@pytest.mark.slow
def test_default_smollm2_recipe_end_to_end(tmp_path):
    """The README's main job: the default recipe on the embedded SmolLM2, every stage for real."""
    recipe = apply_overrides(load_recipe("default"), ["eval.max_chunks=8", "run.max_new_tokens=16"])
    assert recipe.name == "smollm2-int4_asym" and recipe.quantize is not None  # see llmc.recipes.schema.DEFAULT_RECIPE
    report = Pipeline(recipe, tmp_path / "work", progress=False).run()
    assert set(_statuses(report).values()) == {"ran"}
    ev = report["results"]["eval"]
    assert abs(ev["delta_pct"]) < 0.1 and ev["engine_divergence"]["kl_mean"] < 1e-4, ev
    outs = report["results"]["run"]["outputs"]
    assert all(o["error"] is None and o["text"].strip() for o in outs), outs
    assert "Paris" in outs[0]["text"], outs[0]["text"]
    g = report["results"]["run"]["greedy_agreement"]  # measured against the float32 checkpoint
    # the requirement: the default answers its demo prompts exactly as float32 does
    assert g["prompts"] == len(outs) and g["identical"] == len(outs), g


def test_cli_json_is_the_report_and_quiet_is_silent(tiny_recipe, tmp_path):
    """`llmc -q pipeline FILE --json`: stdout is report.json and nothing else, stderr is empty
    (tiny_recipe wrote the recipe to tmp_path / "tiny.yaml")."""
    import subprocess
    import sys

    wd = tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "-q", "pipeline", str(tmp_path / "tiny.yaml"),
                        "-o", str(wd), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report == json.loads((wd / "report.json").read_text())
    assert _statuses(report) == dict.fromkeys(["convert", "quantize", "build", "eval", "run"], "ran")
    assert r.stderr == "", r.stderr
    loud = subprocess.run([sys.executable, "-m", "llmc.cli.app", "pipeline", str(tmp_path / "tiny.yaml"),
                           "-o", str(wd)], capture_output=True, text=True, timeout=900)
    assert loud.returncode == 0 and "skipped" in loud.stdout and "pipeline tiny" in loud.stdout, loud.stderr
