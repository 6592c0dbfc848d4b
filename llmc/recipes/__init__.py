"""Named pipeline presets (YAML) shipped with the package, and their schema."""
