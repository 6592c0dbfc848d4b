"""What an ONNX Runtime engine graph and the runtime that loads it agree on (build and engine
both import this; it imports no llmc package).

- `ACCURACY_LEVELS`: the MatMulNBits accuracy level of each `--matmul-accuracy`: 4 = int8
  activations inside the kernel (fast, 1e-3..1e-2 relative error), 1 = fp32 compute (matches the
  fake-quant reference to ~1e-6; fast for 4-bit weights only: 8-bit ones then fall back to a
  30-50x slower path, which is why an fp32-accuracy build emits them as explicit level-4 nodes on
  compensated activations, `llmc.plugins.linear`).
- `SESSION_LEVEL_DOC`: the doc_string of the MatMulNBits nodes whose accuracy_level the engine
  sets when it loads (the built level, or a caller's override such as the exact level 0 the
  parity tests use); the compensated 8-bit nodes do not carry it and stay at level 4.
- `walk_nodes`: every node of a graph, If bodies included (an engine with step variants runs its
  layers inside one If per step).
"""

from __future__ import annotations

from typing import Any, Iterable

ACCURACY_LEVELS = {"int8": 4, "fp32": 1}
SESSION_LEVEL_DOC = "llmc: accuracy_level follows the engine's matmul accuracy (set when the engine loads)"


def walk_nodes(graph: Any) -> Iterable[Any]:
    """Every node of an onnx GraphProto and of its subgraphs, depth first."""
    from onnx import AttributeProto

    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from walk_nodes(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from walk_nodes(sub)
