"""Runtime: paged KV block manager, in-flight batching scheduler, sampler, generation loop.

Kept free of imports on purpose: `llmc.runtime.kv_blocks`, `.scheduler` and `.sampling` are pure
Python/numpy and must stay cheap to import (CLI start-up, unit tests), so import the submodule you
need instead of re-exporting everything here.
"""
