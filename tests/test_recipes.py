"""Recipes: every shipped one validates; invalid ones name the field and the reason (issue 6)."""

from __future__ import annotations

import pytest

from llmc.errors import LlmcError
from llmc.recipes.schema import DEFAULT_RECIPE, apply_overrides, load_recipe, parse_recipe, shipped_recipes


def test_required_recipes_are_shipped():
    names = set(shipped_recipes())
    for q in ("fp8", "int8_sq", "int4_awq", "w4a8_awq", "int8_wo", "int4_wo", "int4_asym"):
        assert f"smollm2-{q}" in names
    assert "llama3-8b-fp8-tensorrt" in names and "qwen2-int8_sq" in names
    assert DEFAULT_RECIPE in names


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name
    assert r.run.prompts


def test_llama3_recipe_targets_tensorrt_fp8():
    r = load_recipe("llama3-8b-fp8-tensorrt")
    assert r.quantize.qformat == "fp8" and r.build.backend == "tensorrt"


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d["quantize"].update(qformat="int3"), "quantize.qformat: unknown qformat 'int3'"),
    (lambda d: d["build"].update(max_batch_size=0), "build.max_batch_size"),
    (lambda d: d["build"].update(max_batchsize=8), "build.max_batchsize: Extra inputs are not permitted"),
    (lambda d: d.pop("model"), "model: Field required"),
    (lambda d: d["build"].update(backend="vulkan"), "build.backend"),
    (lambda d: d["convert"].update(keep_quantization=True), "drop the quantize stage"),
    (lambda d: (d["convert"].update(keep_quantization=True, tp_size=2), d.update(quantize=None)),
     "convert.tp_size to 1"),
])
def test_invalid_recipe_names_field_and_reason(mutate, fragment):
    data = load_recipe("smollm2-int4_awq").model_dump()
    mutate(data)
    with pytest.raises(LlmcError) as exc:
        parse_recipe(data, "bad.yaml")
    assert fragment in str(exc.value)
    assert "bad.yaml" in str(exc.value)


def test_overrides():
    r = apply_overrides(load_recipe("smollm2-int4_awq"), ["quantize.calib_size=8", "build.max_batch_size=4",
                                                         "eval=null", "model=/tmp/x"])
    assert r.quantize.calib_size == 8 and r.build.max_batch_size == 4 and r.eval is None
    assert r.model == "/tmp/x"
    with pytest.raises(LlmcError, match="stage.option=value"):
        apply_overrides(r, ["quantize.calib_size"])


def test_unknown_recipe_lists_shipped(tmp_path):
    with pytest.raises(LlmcError, match="smollm2-int4_awq"):
        load_recipe("nope")
    bad = tmp_path / "r.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(LlmcError, match="invalid YAML"):
        load_recipe(str(bad))


# ---- options declared once: recipes are generated from the CLI's option objects (issue 13) ----

def _option_classes():
    from llmc.converters.options import ConvertOptions
    from llmc.build.options import BuildOptions
    from llmc.quantize.options import QuantizeOptions

    return {"convert": ConvertOptions, "quantize": QuantizeOptions, "build": BuildOptions}


def _another_value(f):
    """A valid value for option `f` other than its default, derived from its declaration."""
    import dataclasses

    from llmc.optionfields import spec_of

    spec = spec_of(f)
    default = f.default if f.default is not dataclasses.MISSING else None
    if spec.choices:
        return next(c for c in spec.choices if c != default)
    if isinstance(default, bool):
        return not default
    if f.name == "exclude":
        return ["lm_head", "transformer.layers.0.*"]
    if "str" in str(f.type):
        return "elsewhere.bin"
    if "float" in str(f.type):
        return 0.25
    base = default if isinstance(default, int) else 8
    return min(base + 1, spec.le) if spec.le is not None and base + 1 > spec.le else base + 1


@pytest.mark.parametrize("stage", ["convert", "quantize", "build"])
def test_a_recipe_can_set_every_cli_option(stage):
    import dataclasses

    from llmc.optionfields import spec_of

    cls = _option_classes()[stage]
    data = load_recipe("smollm2-int4_awq").model_dump()
    settable = [f for f in dataclasses.fields(cls) if spec_of(f).recipe]
    # keep_quantization excludes a quantize stage and tp_size != 1: set on its own below
    alone = {"keep_quantization"}
    for f in settable:
        if f.name != "qformat" and f.name not in alone:
            data[stage][f.name] = _another_value(f)
    r = parse_recipe(data, "all.yaml")
    got = getattr(r, stage).model_dump()
    assert set(got) == {f.name for f in settable}
    opts = cls(**got)  # the pipeline hands the stage to the options object as is
    for f in settable:
        if f.name != "qformat" and f.name not in alone:
            assert getattr(opts, f.name) == _another_value(f), f.name
    if stage == "convert":
        keep = load_recipe("smollm2-int4_awq").model_dump() | {"quantize": None}
        keep["convert"]["keep_quantization"] = True
        assert parse_recipe(keep, "keep.yaml").convert.keep_quantization is True
    assert {f.name for f in dataclasses.fields(cls)} - set(got) <= {"force"}  # per-invocation only


def test_recipe_stage_defaults_are_the_option_defaults():
    import dataclasses

    from llmc.optionfields import spec_of

    r = parse_recipe({"name": "x", "model": "m.gguf", "quantize": {"qformat": "int8_sq"}, "run": {"prompts": ["hi"]}},
                     "min.yaml")
    for stage, cls in _option_classes().items():
        want = cls(**({"qformat": "int8_sq"} if stage == "quantize" else {}))
        got = getattr(r, stage).model_dump()
        for f in dataclasses.fields(cls):
            if spec_of(f).recipe:
                assert got[f.name] == getattr(want, f.name), (stage, f.name)


@pytest.mark.parametrize("stage", ["convert", "quantize", "build"])
def test_recipe_defaults_equal_cli_defaults(stage):
    """Every CLI option of the stage's command is a recipe option with the same default, and vice
    versa; derived from the click command and the options dataclass, not from a hand list."""
    import dataclasses

    import typer

    from llmc.cli.app import app
    from llmc.optionfields import spec_of

    cls = _option_classes()[stage]
    command = typer.main.get_command(app).commands[stage]
    cli = {p.name: p.default for p in command.params
           if p.param_type_name == "option" and p.name not in ("output", "out", "help")}
    declared = {f.name: f for f in dataclasses.fields(cls)}
    assert set(cli) == set(declared), set(cli) ^ set(declared)
    defaults = (parse_recipe({"name": "x", "model": "m", "quantize": {"qformat": "int8_sq"}, "run": {"prompts": ["p"]}},
                             "d.yaml").model_dump()[stage])
    for name, f in declared.items():
        spec = spec_of(f)
        cli_default = spec.parse(cli[name]) if spec.parse else cli[name]
        if name == "qformat":
            assert cli[name] is None or cli[name] is ...  # required in both
            continue
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert cli_default == want, (stage, name, cli_default, want)
        if spec.recipe:
            assert defaults[name] == want, (stage, name)


def test_unknown_recipe_key_is_one_line_with_did_you_mean():
    data = load_recipe("smollm2-fp32").model_dump()
    data["build"]["kv_cache_dtyp"] = "int8"
    with pytest.raises(LlmcError) as exc:
        parse_recipe(data, "mine.yaml")
    msg = str(exc.value)
    assert msg.startswith("mine.yaml: ") and "build.kv_cache_dtyp" in msg and "'kv_cache_dtype'" in msg, msg
    assert "\n" not in msg
    data = load_recipe("smollm2-fp32").model_dump()
    data["build"]["attention"] = "fusd"
    with pytest.raises(LlmcError, match=r"build.attention: unknown attention 'fusd'.*did you mean 'fused'"):
        parse_recipe(data, "mine.yaml")


def test_recipes_show_prints_every_effective_option(tmp_path):
    """`llmc recipes show` of a recipe that sets almost nothing lists every option of every stage,
    with the CLI's defaults, explains each derived (null) one, and loads back as the same recipe."""
    import dataclasses
    import subprocess
    import sys

    import yaml

    from llmc.optionfields import spec_of

    src = tmp_path / "bare.yaml"
    src.write_text("name: bare\nmodel: m.gguf\nquantize:\n  qformat: int4_awq\nrun:\n  prompts: [hi]\n")
    r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "recipes", "show", str(src)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    for stage, cls in _option_classes().items():
        want = cls(**({"qformat": "int4_awq"} if stage == "quantize" else {}))
        for f in dataclasses.fields(cls):
            if not spec_of(f).recipe:
                continue
            assert shown[stage][f.name] == getattr(want, f.name), (stage, f.name)
            if getattr(want, f.name) is None and spec_of(f).derived:
                assert f"  {f.name}: null  # {spec_of(f).derived}" in r.stdout
    assert set(shown["eval"]) == {"data", "seq_len", "max_chunks"}
    again = tmp_path / "again.yaml"
    again.write_text(r.stdout)
    assert load_recipe(str(again)).model_dump() == load_recipe(str(src)).model_dump()


def test_recipes_calibrate_like_the_cli_unless_they_say_why():
    from llmc.quantize.formats import DEFAULTS

    for name, path in shipped_recipes().items():
        q = load_recipe(name).quantize
        if q is None:
            continue
        text = path.read_text()
        for key in ("calib_size", "calib_seq_len"):
            if getattr(q, key) != DEFAULTS[key]:
                line = next(li for li in text.splitlines() if li.strip().startswith(key + ":"))
                assert "#" in line, f"{name}: {key} differs from the CLI default without a comment"
