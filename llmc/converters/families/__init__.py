"""One module per model family; each defines a module-level `FAMILY`. Adding a family = one file."""
