"""The recipe schema: every stage's options, with the same defaults as the CLI.

Unknown keys are rejected (a typo must not silently fall back to a default), and every error
names the field and the reason.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmc.errors import LlmcError

# The default recipe must answer its demo prompts exactly as the float32 model does. Measured
# (benchmarks/bench_quantize.py, README "Quantization accuracy"): no quantized ONNX Runtime engine
# does, because the fast kernels (MatMulNBits at accuracy level 4, MatMulInteger) round the
# activations to int8 and SmolLM2's first answer token to "What is the capital of France?" wins by
# 0.08 logits ("The" 25.33 vs "L" 25.24); even int4_asym g32, whose weights are bit-identical to the
# float model's, flips it. The README's main job must quantize (convert -> quantize -> build -> run),
# so the default is the quantized format closest to float32 that is at least as fast as the former
# default int8_sq: int8_wo (8-bit MatMulNBits; KL 0.008, the lowest of every PTQ format, 1.87x the
# fp32 engine's decode speed vs int8_sq's 1.73x). It answers "The capital of France is Paris." like
# float32; its haiku differs after 54% of the tokens (1 of 2 demo answers identical).
DEFAULT_RECIPE = "smollm2-int8_wo"


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConvertStage(_Stage):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    tp_size: int = Field(1, ge=1)


class QuantizeStage(_Stage):
    """None means `llmc quantize`'s default (llmc.quantize.formats.DEFAULTS): one source of truth.

    exclude: None keeps lm_head float (the CLI default); [] quantizes every linear.
    """

    qformat: str
    kv_cache_dtype: Literal["fp8", "int8"] | None = None
    calib_data: str | None = None
    calib_size: int | None = Field(None, ge=1)
    calib_seq_len: int | None = Field(None, ge=8)
    batch_size: int | None = Field(None, ge=1)
    group_size: int | None = Field(None, ge=8)
    sq_alpha: float | None = Field(None, ge=0.0, le=1.0)
    awq_method: Literal["lite", "clip", "full"] | None = None
    exclude: list[str] | None = None
    seed: int | None = None

    @field_validator("qformat")
    @classmethod
    def _known_qformat(cls, v: str) -> str:
        from llmc.quantize.formats import QFORMATS

        if v not in QFORMATS:
            raise ValueError(f"unknown qformat {v!r}; choose from {', '.join(QFORMATS)}")
        return v


class BuildStage(_Stage):
    backend: Literal["auto", "onnxruntime", "tensorrt", "tensorrt-llm"] = "onnxruntime"
    paged_kv_cache: bool = True
    inflight_batching: bool = True
    tokens_per_block: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1)
    max_input_len: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=1)
    max_num_tokens: int | None = Field(None, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    lm_head: Literal["auto", "float", "int8"] = "auto"


class EvalStage(_Stage):
    data: str = "builtin:brown"
    seq_len: int = Field(256, ge=8)
    max_chunks: int | None = Field(32, ge=1)


class RunStage(_Stage):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(48, ge=1)
    chat: bool = True


PLAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Recipe(_Stage):
    # The default work dir is llmc-work/<name>: a plain name, never a path (no "/", "..", absolute).
    name: str = Field(pattern=PLAIN_NAME, description="a plain name: letters, digits, '.', '_', '-'")
    description: str = ""
    model: str = Field(description="builtin:smollm2, or a Hugging Face directory / .gguf path (override with --model)")
    convert: ConvertStage = Field(default_factory=ConvertStage)
    quantize: QuantizeStage | None = None
    build: BuildStage = Field(default_factory=BuildStage)
    eval: EvalStage | None = Field(default_factory=EvalStage)
    run: RunStage


def _format_error(exc: ValidationError, source: object) -> LlmcError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") == "string_pattern_mismatch" and loc == "name":
        msg = (f"must be a plain name (letters, digits, '.', '_', '-'; no path separators), "
               f"got {err.get('input')!r}")
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return LlmcError(f"invalid recipe: {loc}: {msg}{more}", source)


def parse_recipe(data: Any, source: object) -> Recipe:
    if not isinstance(data, dict):
        raise LlmcError("invalid recipe: expected a mapping of stage -> options", source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _format_error(exc, source) from None


def shipped_recipes() -> dict[str, Path]:
    root = resources.files("llmc.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LlmcError("no such recipe file", path) from None
    except yaml.YAMLError as exc:
        raise LlmcError(f"invalid YAML ({(str(exc).splitlines() or [type(exc).__name__])[0]})", path) from None


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a YAML file by path."""
    shipped = shipped_recipes()
    if name_or_path in ("default", ""):
        name_or_path = DEFAULT_RECIPE
    if name_or_path in shipped:
        path = shipped[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise LlmcError(f"no recipe named {name_or_path!r} and no such file; shipped recipes: "
                            f"{', '.join(sorted(shipped))}")
    return parse_recipe(load_yaml(path), path)


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """--set stage.option=value (value parsed as YAML, so 8, true, null and [a, b] work)."""
    import yaml

    data = recipe.model_dump()
    for item in overrides:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise LlmcError(f"--set expects stage.option=value, got {item!r}")
        target = data
        for p in parts[:-1]:
            if target.get(p) is None:
                target[p] = {}
            target = target[p]
            if not isinstance(target, dict):
                raise LlmcError(f"--set {key}: {p} is not a stage")
        try:
            target[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            target[parts[-1]] = raw
    return parse_recipe(data, "--set")
