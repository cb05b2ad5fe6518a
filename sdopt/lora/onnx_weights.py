"""Read named initializers straight out of an `.onnx` file, without the onnx package.

The runtime needs the base value of each weight a LoRA changes (W + delta). An ONNX file is
a protobuf ModelProto; this walks its wire format just far enough to find each
initializer's name, type, dims and where its bytes are (inline `raw_data`, or the external
data file the tensor points to), without copying the weights it skips. A tensor is then read
with one `np.fromfile` (a new array) or memory-mapped (`mapped`: no copy, for a value read once).

Wire format (protobuf encoding; onnx.proto field numbers): ModelProto.graph = 7;
GraphProto.initializer = 5; TensorProto: dims = 1, data_type = 2, float_data = 4,
name = 8, raw_data = 9, external_data = 13 (key = 1, value = 2), data_location = 14.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.onnx_signature import varint, wire_fields

_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}


@dataclass(frozen=True)
class TensorLocation:
    """Where one initializer's little-endian bytes are."""

    file: Path
    offset: int
    dtype: type
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        """A new array with the tensor's values."""
        count = int(np.prod(self.shape)) if self.shape else 1
        return np.fromfile(
            self.file, dtype=np.dtype(self.dtype).newbyteorder("<"), count=count, offset=self.offset
        ).reshape(self.shape)

    def mapped(self) -> np.ndarray:
        """A read-only memory map of the tensor's bytes (no copy; the file stays mapped while it lives).

        For a value used once (base + delta), this skips copying the file's page-cached bytes into
        new memory first.
        """
        return np.memmap(
            self.file, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r", offset=self.offset, shape=self.shape
        )


def initializer_locations(path: Path, names: set[str] | None = None) -> dict[str, TensorLocation]:
    """name -> TensorLocation of the initializers of `path` (only `names` when given).

    Args:
        path: an .onnx file; external data is resolved relative to its folder.
        names: the initializers wanted (None: every one).
    Returns:
        The locations found; a wanted name that is not there is simply absent.
    """
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            graphs = [v for n, w, v in wire_fields(buf, 0, len(buf)) if n == 7 and w == 2]
            out: dict[str, TensorLocation] = {}
            for g_start, g_end in graphs:
                for number, wire, span in wire_fields(buf, g_start, g_end):
                    if number == 5 and wire == 2:
                        loc = _tensor(buf, span, path, names)
                        if loc is not None:
                            out[loc[0]] = loc[1]
            return out
        except (ValueError, IndexError) as e:
            raise SdoptError(f"{path} is not a readable ONNX file ({e})", "re-export the artifact") from e


def _dims(buf: Any, wire: int, value: Any) -> list[int]:
    if wire == 0:
        return [value]
    out: list[int] = []
    pos, end = value  # packed
    while pos < end:
        d, pos = varint(buf, pos)
        out.append(d)
    return out


def _tensor(buf: Any, span: tuple[int, int], path: Path, names: set[str] | None) -> tuple[str, TensorLocation] | None:
    dims: list[int] = []
    dtype = 0
    name = ""
    data: tuple[int, int] | None = None
    external: dict[str, str] = {}
    for number, wire, value in wire_fields(buf, *span):
        if number == 1:
            dims.extend(_dims(buf, wire, value))
        elif number == 2:
            dtype = value
        elif number == 8:
            name = bytes(buf[value[0] : value[1]]).decode()
        elif number in (9, 4) and wire == 2:  # raw_data, or packed float_data (same bytes)
            data = value
        elif number == 13:
            entry = {n: bytes(buf[v[0] : v[1]]).decode() for n, w, v in wire_fields(buf, *value) if w == 2}
            external[entry.get(1, "")] = entry.get(2, "")
    if (names is not None and name not in names) or (names is None and dtype not in _DTYPES):
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"initializer {name} has ONNX data type {dtype}")
    if external:
        return name, TensorLocation(
            path.parent / external["location"], int(external.get("offset", 0)), _DTYPES[dtype], tuple(dims)
        )
    if data is None and names is None:
        return None  # small typed constants (int64 axes ...) are never weights
    if data is None:
        raise ValueError(f"initializer {name} keeps its values in a typed field this reader does not handle")
    return name, TensorLocation(path, data[0], _DTYPES[dtype], tuple(dims))
