"""`llmc` entry point.

Command modules import only typer and the standard library at module level; torch, ModelOpt,
ONNX Runtime and TensorRT are imported inside command bodies, so `llmc --help` stays instant.
User mistakes raise `LlmcError`, printed here as one line with exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from llmc.errors import LlmcError

app = typer.Typer(
    name="llmc",
    help="llmc: compile Hugging Face LLMs into fast engines. "
    "convert -> quantize -> build -> run, or all at once with `pipeline`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, module, function) — the order is the order of `llmc --help`.
COMMANDS = [
    ("convert", "llmc.cli.convert_cmd", "convert"),
    ("quantize", "llmc.cli.quantize_cmd", "quantize"),
    ("build", "llmc.cli.build_cmd", "build"),
    ("run", "llmc.cli.run_cmd", "run"),
    ("serve", "llmc.cli.serve_cmd", "serve"),
    ("bench", "llmc.cli.bench_cmd", "bench"),
    ("eval", "llmc.cli.eval_cmd", "eval_cmd"),
    ("inspect", "llmc.cli.inspect_cmd", "inspect"),
    ("pipeline", "llmc.cli.pipeline_cmd", "pipeline"),
    ("default-model", "llmc.cli.default_model_cmd", "default_model"),
]
GROUPS = [("recipes", "llmc.cli.recipes_cmd", "recipes_app")]

for _name, _module, _func in COMMANDS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:  # a command still under construction
        if _exc.name != _module:
            raise
        continue
    app.command(_name)(getattr(_mod, _func))
for _name, _module, _attr in GROUPS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise
        continue
    app.add_typer(getattr(_mod, _attr), name=_name)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except LlmcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
