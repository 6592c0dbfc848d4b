"""`llmc recipes list|show`: the presets shipped in llmc/recipes/."""

from __future__ import annotations

import typer

recipes_app = typer.Typer(help="List and show the shipped pipeline recipes.", no_args_is_help=True)


@recipes_app.command("list", short_help="List shipped recipes (name, model, qformat, backend).")
def list_recipes() -> None:
    """List shipped recipes (name, model, qformat, backend)."""
    from llmc.cli.output import out_console, table
    from llmc.recipes.schema import DEFAULT_RECIPE, load_recipe, shipped_recipes

    t = table("llmc recipes", ["name", "model", "qformat", "backend"])
    for name in sorted(shipped_recipes()):
        r = load_recipe(name)
        t.add_row(name + (" (default)" if name == DEFAULT_RECIPE else ""), r.model,
                  r.quantize.qformat if r.quantize else "-", r.build.backend)
    out_console().print(t)


@recipes_app.command("show", short_help="Print a recipe with every default filled in (valid YAML you can copy and edit).")
def show_recipe(name: str = typer.Argument(..., help="Recipe name or YAML path.")) -> None:
    """Print a recipe with every default filled in (valid YAML you can copy and edit); an option
    derived from the model or the format is null with a comment saying what it becomes."""
    from llmc.recipes.schema import load_recipe, recipe_yaml

    typer.echo(recipe_yaml(load_recipe(name)), nl=False)
