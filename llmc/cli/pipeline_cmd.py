"""`llmc pipeline`: one command from a model to a measured engine."""

from __future__ import annotations

from pathlib import Path

import typer


def pipeline(
    recipe: str = typer.Argument("default", help="A shipped recipe name (see `llmc recipes list`) or a YAML file."),
    model: str = typer.Option(None, "--model", help="Override the recipe's model source (HF dir or .gguf)."),
    workdir: Path = typer.Option(None, "-o", "--workdir", help="Where artifacts and stage records go (default: ./llmc-work/<recipe>)."),
    set_: list[str] = typer.Option(None, "--set", help="Override an option: stage.option=value (repeatable), e.g. --set quantize.calib_size=32."),
    as_json: bool = typer.Option(False, "--json", help="Print the report (report.json) as one JSON document on stdout and nothing else."),
) -> None:
    """Run convert, quantize, build, eval and run; skip stages whose inputs and options are unchanged."""
    from llmc.cli.output import err_console, out_console, print_json, state
    from llmc.recipes.pipeline import Pipeline
    from llmc.recipes.report import print_report
    from llmc.recipes.schema import apply_overrides, load_recipe

    r = load_recipe(recipe)
    overrides = list(set_ or [])
    if model:
        overrides.append(f"model={model}")
    if overrides:
        r = apply_overrides(r, overrides)
    log = err_console() if as_json else out_console()  # stage lines: stdout unless it must hold only JSON
    wd = workdir or Path("llmc-work") / r.name
    log.print(f"[bold]llmc pipeline[/] {r.name}: {r.description}")
    report = Pipeline(r, wd, console=log, progress=not state.quiet).run()
    if as_json:
        print_json(report)
    else:
        print_report(report, out_console())
