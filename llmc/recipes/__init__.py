"""Recipes: named pipeline presets (YAML) shipped with the package, and what runs them.

    schema.py    the recipe schema; stages generated from the commands' option objects
    pipeline.py  Pipeline: convert -> quantize -> build -> eval -> run, resumable
    report.py    the pipeline's closing report

The pipeline lives here, not at the package top, because it is the recipes' interpreter: it
reads nothing but a Recipe, and nothing but `llmc pipeline` (and benchmarks) runs it.
"""
