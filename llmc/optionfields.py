"""Stage options declared once: a dataclass field carries its default, its allowed values and bounds.

Each stage has one options dataclass (`llmc.converters.options.ConvertOptions`,
`llmc.quantize.options.QuantizeOptions`, `llmc.build.options.BuildOptions`). Its fields are
declared with `option(...)`, so the facts about an option live in one place, and three consumers
read them:

- the CLI takes its defaults from the dataclass (a test compares every command's defaults with it),
- the recipe schema (`llmc.recipes.schema`) generates each stage's pydantic model from it, so a
  recipe can set every CLI option under the same name with the same default,
- `check_values` validates choices and bounds with one-line `LlmcError`s named like the CLI flag.

Only the standard library is imported here: option modules are imported by `llmc --help`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from llmc.errors import LlmcError, did_you_mean

_KEY = "llmc"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """What a field's metadata says beyond its type and default."""

    choices: tuple[str, ...] | None = None   # allowed values (None always allowed when the default is None)
    ge: float | None = None                   # lower bound (inclusive)
    le: float | None = None                   # upper bound (inclusive)
    derived: str | None = None                # what None means: shown by `llmc recipes show`
    parse: Callable[[Any], Any] | None = None  # CLI spelling -> field value (e.g. "a,b" -> ["a", "b"])
    recipe: bool = True                       # settable in a recipe (False: per-invocation, e.g. --force)


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           choices: Sequence[str] | None = None, ge: float | None = None, le: float | None = None,
           derived: str | None = None, parse: Callable[[Any], Any] | None = None,
           recipe: bool = True) -> Any:
    """A dataclass field with an `OptionSpec` in its metadata."""
    spec = OptionSpec(tuple(choices) if choices is not None else None, ge, le, derived, parse, recipe)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: spec})


def spec_of(f: dataclasses.Field) -> OptionSpec:
    return f.metadata.get(_KEY) or OptionSpec()


def flag(name: str) -> str:
    """The CLI flag of a field: max_batch_size -> --max-batch-size."""
    return "--" + name.replace("_", "-")


def value_problem(name: str, value: Any, spec: OptionSpec) -> str | None:
    """Why `value` is not allowed for option `name` (None when it is). Shared by the CLI checks and
    the recipe schema, so both say the same thing."""
    if value is None:
        return None
    if spec.choices is not None and value not in spec.choices:
        return (f"unknown {name} {value!r}; choose from {', '.join(spec.choices)}"
                f"{did_you_mean(str(value), spec.choices)}")
    if spec.ge is not None and spec.le is not None and not spec.ge <= value <= spec.le:
        return f"must be in {spec.ge:g}..{spec.le:g} (got {value})"
    if spec.ge is not None and value < spec.ge:
        return f"must be >= {spec.ge:g} (got {value})"
    if spec.le is not None and value > spec.le:
        return f"must be <= {spec.le:g} (got {value})"
    return None


def check_values(obj: Any) -> None:
    """Raise a one-line LlmcError naming the CLI flag of the first option out of its choices/bounds."""
    for f in dataclasses.fields(obj):
        spec = spec_of(f)
        value = getattr(obj, f.name)
        problem = value_problem(f.name, value, spec)
        if problem is None:
            continue
        if spec.choices is not None:  # the CLI's wording for a choice
            problem = f"must be one of {', '.join(spec.choices)} (got {value!r})"
        raise LlmcError(f"{flag(f.name)} {problem}")
