"""llmc: a model compilation toolchain for large language models.

Stages (each a library function first and a CLI command second):
convert -> quantize -> build -> run/bench/eval, chained by `pipeline`.
"""

__version__ = "0.1.0"
