"""A streaming safetensors writer.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; converting a model
that way costs the whole model in RAM. The safetensors format is a JSON header of names, dtypes,
shapes and byte offsets followed by the raw bytes, so when the plan (names, dtypes, shapes) is
known up front, the header can be written first and each tensor appended as it is produced and
then dropped. Peak memory is then the largest tensor, not the model. Files written here are
read back by the `safetensors` library itself (tests check this).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
    torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3",
}


class StreamingSafetensorsWriter:
    """Write tensors in a fixed, pre-declared order without holding them all in memory."""

    def __init__(self, path: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = [name for name, _, _ in plan]
        self._spec = {name: (dtype, tuple(shape)) for name, dtype, shape in plan}
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in plan:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"tensor {name} written out of order (expected {expected})")
        dtype, shape = self._spec[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{name}: got {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
        t = tensor.detach().contiguous().cpu()
        self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._file.close()
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self._order)} tensors written")
        self._file.close()

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
