"""The recipe schema: every stage's options, generated from the CLI's option objects.

Unknown keys are rejected (a typo must not silently fall back to a default), and every error
names the field and the reason.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from llmc.errors import LlmcError, did_you_mean, first_line

# The default recipe must answer its demo prompts exactly as the float32 model does, and be fast.
# Measured (benchmarks/bench_quantize.py, README "Quantization accuracy"): no engine whose weight-only
# matmuls run at ONNX Runtime's int8 accuracy level keeps the answers (SmolLM2's first answer token
# to "What is the capital of France?" wins by 0.08 logits, and the int8 rounding of activations
# inside MatMulNBits flips it), and no PTQ format that changes the weights keeps them all. The
# embedded model's weights are GGUF Q4_1 (asymmetric, 32-wide groups), which int4_asym g32 stores
# exactly; with --matmul-accuracy fp32 its engine reproduces the float32 model (32/32 greedy answers
# identical, KL 0) at about int8_sq's decode speed. That is a property of this model's source, not
# of int4_asym in general (on float weights it is plain asymmetric round-to-nearest).
DEFAULT_RECIPE = "smollm2-int4_asym"


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _checked(name: str, spec):
    """A pydantic after-validator that applies the option's choices and bounds (the same wording
    as the CLI's check, minus the flag: the error names the recipe key)."""
    from llmc.optionfields import value_problem

    def check(v):
        problem = value_problem(name, v, spec)
        if problem is not None:
            raise ValueError(problem)
        return v

    return AfterValidator(check)


def stage_model(name: str, options_cls: type, doc: str) -> type[_Stage]:
    """A recipe stage generated from a stage's options dataclass: every option a recipe may set
    (`OptionSpec.recipe`), under the CLI's name, with the CLI's default and checks. Declaring the
    stage a second time here is how recipe and CLI defaults drifted apart before."""
    from llmc.optionfields import spec_of

    hints = get_type_hints(options_cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(options_cls):
        spec = spec_of(f)
        if not spec.recipe:
            continue
        if f.default is not dataclasses.MISSING:
            default = Field(f.default, description=spec.derived)
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory, description=spec.derived)
        else:
            default = Field(...)
        fields[f.name] = (Annotated[hints[f.name], _checked(f.name, spec)], default)
    model = create_model(name, __base__=_Stage, __doc__=doc, **fields)
    model.__module__ = __name__
    return model


def _stages():
    from llmc.converters.options import ConvertOptions
    from llmc.build.options import BuildOptions
    from llmc.quantize.options import QuantizeOptions

    return (stage_model("ConvertStage", ConvertOptions, "`llmc convert`'s options (ConvertOptions)."),
            stage_model("QuantizeStage", QuantizeOptions, "`llmc quantize`'s options (QuantizeOptions; "
                        "formats.DEFAULTS). exclude [] quantizes every linear, the default keeps lm_head float."),
            stage_model("BuildStage", BuildOptions, "`llmc build`'s options (BuildOptions)."))


ConvertStage, QuantizeStage, BuildStage = _stages()


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

    @model_validator(mode="after")
    def _keep_quantization_alone(self) -> "Recipe":
        """A kept-quantization checkpoint is already quantized and written as one rank, as
        `llmc convert --keep-quantization` refuses too: say so before any stage runs."""
        if self.convert.keep_quantization:
            if self.quantize is not None:
                raise ValueError("convert.keep_quantization writes a quantized checkpoint: drop the quantize stage")
            if self.convert.tp_size != 1:
                raise ValueError("convert.keep_quantization writes one rank: set convert.tp_size to 1")
        return self


def _model_of(model: Any, key: Any) -> type[BaseModel] | None:
    """The pydantic model stored under `key` of `model` (a stage, also when it is optional)."""
    field = model.model_fields.get(key) if isinstance(key, str) else None
    ann = getattr(field, "annotation", None)
    return next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type)
                 and issubclass(a, BaseModel)), None)


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` was found (for "did you mean")."""
    model: Any = Recipe
    for part in loc[:-1]:
        model = _model_of(model, part)
        if model is None:
            return []
    return list(model.model_fields)


def _format_error(exc: ValidationError, source: object) -> LlmcError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg += f": unknown key{did_you_mean(str(err['loc'][-1]), _known_keys(err['loc']))}"
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
        raise LlmcError(f"invalid YAML ({first_line(exc)})", path) from None


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


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as YAML with every option filled in; an option left to be derived (null) carries
    a comment saying what it becomes, so the output shows every effective setting and still loads
    as a recipe."""
    import re

    import yaml

    lines, stage = [], None
    for line in yaml.safe_dump(recipe.model_dump(), sort_keys=False).splitlines():
        top = re.match(r"^(\w+):", line)
        if top:
            stage = _model_of(Recipe, top.group(1))
        unset = re.match(r"^  (\w+): null$", line)
        field = stage.model_fields.get(unset.group(1)) if unset and stage else None
        if field is not None and field.description:
            line += f"  # {field.description}"
        lines.append(line)
    return "\n".join(lines) + "\n"
