"""Read an ONNX file's inputs, outputs and opset without the `onnx` package or loading weights.

The runtime must not depend on `onnx`, and an ONNX Runtime session would load (GBs of) weights
just to name its inputs. This walks the protobuf wire format of `ModelProto` and reads only what
a signature needs: `graph.input`, `graph.output` (name, element type, shape) and the default
domain's opset; initializers and nodes are skipped by length. The file is memory-mapped, so a
graph with its weights inline is not read into memory either.

Field numbers are onnx.proto3's: ModelProto.graph = 7, opset_import = 8; GraphProto.initializer
= 5, input = 11, output = 12; ValueInfoProto.name = 1, type = 2; TypeProto.tensor_type = 1;
Tensor.elem_type = 1, shape = 2; TensorShapeProto.dim = 1; Dimension.dim_value = 1,
dim_param = 2; TensorProto.name = 8; OperatorSetIdProto.domain = 1, version = 2.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError

# onnx TensorProto.DataType -> numpy dtype name
ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


@dataclass
class ValueSignature:
    name: str
    dtype: str
    shape: list[int | str]  # ints, dim_param names, "?" where neither is set


@dataclass
class GraphSignature:
    inputs: list[ValueSignature] = field(default_factory=list)
    outputs: list[ValueSignature] = field(default_factory=list)
    opset: int = 0


def varint(buf: Any, pos: int) -> tuple[int, int]:
    """(value, next position) of the protobuf varint at `pos`."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def wire_fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """The fields of the protobuf message in `buf[start:end]`, without copying it.

    Yields:
        (field number, wire type, value): an int for varints, the (start, end) offsets of the
        bytes for length-delimited fields; fixed32/fixed64 fields are skipped.
    """
    pos = start
    while pos < end:
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = varint(buf, pos)
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire in (1, 5):  # fixed64 / fixed32: skipped
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, int value or length-delimited bytes) of one message."""
    for number, wire, value in wire_fields(buf, 0, len(buf)):
        yield number, buf[value[0] : value[1]] if wire == 2 else value


def _msg(value: int | memoryview) -> memoryview:
    """A length-delimited field's bytes (a sub-message or a string)."""
    if isinstance(value, int):
        raise ValueError("expected a length-delimited field, found a varint")
    return value


def _int(value: int | memoryview) -> int:
    if not isinstance(value, int):
        raise ValueError("expected a varint field, found bytes")
    return value


def _value_info(buf: memoryview) -> ValueSignature:
    name, dtype, shape = "", "?", []
    for number, value in _fields(buf):
        if number == 1:
            name = bytes(_msg(value)).decode()
        elif number == 2:
            for n2, tensor in _fields(_msg(value)):
                if n2 != 1:  # not a tensor type (sequence, map): leave as "?"
                    continue
                for n3, v3 in _fields(_msg(tensor)):
                    if n3 == 1:
                        dtype = ELEM_TYPES.get(_int(v3), str(v3))
                    elif n3 == 2:
                        shape = [_dim(_msg(d)) for n4, d in _fields(_msg(v3)) if n4 == 1]
    return ValueSignature(name, dtype, shape)


def _dim(buf: memoryview) -> int | str:
    for number, value in _fields(buf):
        if number == 1:
            return int(value)
        if number == 2:
            return bytes(value).decode()
    return "?"


def read_signature(path: str | Path) -> GraphSignature:
    """Inputs (initializers excluded), outputs and default-domain opset of an ONNX file.

    Args:
        path: the .onnx file (its external data, if any, is not touched).

    Returns:
        The graph's signature.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                return _signature(buf)
            finally:
                buf.release()
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise SdoptError(f"{path} is not a readable ONNX file ({e})", "re-export the model") from e


def _signature(buf: memoryview) -> GraphSignature:
    sig = GraphSignature()
    initializers: set[str] = set()
    for number, value in _fields(buf):
        if number == 8:
            opset = dict(_fields(_msg(value)))
            if not bytes(_msg(opset.get(1, memoryview(b"")))):
                sig.opset = _int(opset.get(2, 0))
        elif number == 7:
            for n2, v2 in _fields(_msg(value)):
                if n2 == 11:
                    sig.inputs.append(_value_info(_msg(v2)))
                elif n2 == 12:
                    sig.outputs.append(_value_info(_msg(v2)))
                elif n2 == 5:
                    initializers.update(bytes(_msg(v)).decode() for n3, v in _fields(_msg(v2)) if n3 == 8)
    sig.inputs = [v for v in sig.inputs if v.name not in initializers]  # IR < 4 lists weights as inputs
    return sig
