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
