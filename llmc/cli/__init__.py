"""The typer CLI: one small module per command, thin over library calls."""
