"""`llmc` entry point.

Command modules import only typer and the standard library at module level; torch, ModelOpt,
ONNX Runtime and TensorRT are imported inside command bodies, so `llmc --help` stays instant.
User mistakes raise `LlmcError`, and usage mistakes (an unknown option, a value not among the
choices) are click's UsageError: both are printed here as one line with exit code 2.

Help is click's plain formatter (it wraps; rich's panels cut option names at 80 columns when
piped). Global options: --version, -v/--verbose, -q/--quiet; shell completion is typer's own
(--install-completion / --show-completion).
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
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120, "help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from llmc import __version__

        typer.echo(f"llmc {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print llmc's version and exit."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logs on stderr."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars or notes on stderr "
                               "(errors still print)."),
) -> None:
    """llmc: compile Hugging Face LLMs into fast engines. convert -> quantize -> build -> run
    (or serve), or all at once with `pipeline`."""
    from llmc.cli.output import configure_logging

    configure_logging(verbose, quiet)

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
GROUPS = [("recipes", "llmc.cli.recipes_cmd", "recipes_app"), ("export", "llmc.cli.export_cmd", "export_app")]

for _name, _module, _func in COMMANDS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:  # a command still under construction
        if _exc.name != _module:
            raise
        continue
    _fn = getattr(_mod, _func)
    # The whole first paragraph in the command list: click would cut it at 45 characters.
    app.command(_name, short_help=" ".join((_fn.__doc__ or "").split("\n\n")[0].split()))(_fn)
for _name, _module, _attr in GROUPS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise
        continue
    app.add_typer(getattr(_mod, _attr), name=_name)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user and usage errors become one line on stderr and exit code 2. SIGTERM is
    handled like Ctrl-C (temporaries removed), exit code 143."""
    from llmc.fsutil import Terminated, sigterm_as_interrupt

    try:  # typer >= 0.29 vendors click; older releases use click itself
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    try:
        with sigterm_as_interrupt():
            result = app(args=argv, standalone_mode=False, prog_name="llmc")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except LlmcError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except click_exc.NoArgsIsHelpError as exc:  # `llmc` alone: the help, as click would show it
        print(exc.format_message(), file=sys.stderr)
        return 2
    except click_exc.UsageError as exc:
        where = f"llmc {exc.ctx.info_name}: " if exc.ctx is not None and exc.ctx.parent is not None else ""
        print(f"error: {where}{_one_line(exc.format_message())} (see --help)", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except click_exc.ClickException as exc:
        print(f"error: {_one_line(exc.format_message())}", file=sys.stderr)
        return exc.exit_code
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
