"""Two ONNX graphs, one weights file: a graph that reuses another's weights points at them.

ONNX external data (a tensor's `location`, `offset`, `length`) lets several graphs read one
file. ONNX Runtime only reads external data inside the graph's own folder, so both graphs live
in the same folder (unet/model.onnx and unet/control.onnx read unet/model.onnx.data).
Tensors are matched by content (dtype, shape, bytes), not by name: constant folding names the
folded weights differently in each export. Tensors the primary graph lacks stay inline.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

DATA_NAME = "model.onnx.data"  # the exporter's own name for a U-Net's external data
MIN_BYTES = 1024  # smaller tensors stay inline in each graph, as in onnx_graph.finalize


@dataclass
class SharingReport:
    shared_bytes: int  # weights the secondary graph reads from the primary's file
    own_bytes: int  # weights stored inline in the secondary graph
    shared_tensors: int
    own_tensors: int


def externalize(model_path: Path, data_name: str = DATA_NAME) -> Path:
    """Make sure `model_path` keeps its large weights in `data_name` next to it.

    Args:
        model_path: an ONNX file (inline weights, or already external in `data_name`).
        data_name: the weights file's name, in the same folder.
    Returns:
        The weights file's path.
    """
    data = model_path.parent / data_name
    model = onnx.load(str(model_path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        if locations != {data_name}:
            raise ValueError(f"{model_path} keeps weights in {sorted(locations)}, expected {data_name}")
        return data
    tmp = model_path.with_name(model_path.name + ".tmp")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(tmp),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=MIN_BYTES,
    )
    tmp.replace(model_path)
    return data


def _key(data_type: int, dims: list[int], payload: bytes | memoryview) -> tuple[int, tuple[int, ...], str]:
    return data_type, tuple(dims), hashlib.blake2b(payload, digest_size=20).hexdigest()


def _index(primary: Path, data: Path) -> dict[tuple[int, tuple[int, ...], str], tuple[int, int]]:
    """content key -> (offset, length) of every external tensor of `primary` in `data`."""
    model = onnx.load(str(primary), load_external_data=False)
    index = {}
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            index[_key(t.data_type, list(t.dims), memoryview(buf)[offset : offset + length])] = (offset, length)
    return index


def share_weights(primary: Path, secondary_src: Path, secondary_dst: Path) -> SharingReport:
    """Write `secondary_src` as `secondary_dst` (in `primary`'s folder), its weights that
    `primary` also has read from `primary`'s external data file.

    Args:
        primary: a graph with external data in DATA_NAME (see `externalize`).
        secondary_src: the finished secondary graph (inline or external weights, any folder).
        secondary_dst: where to write it; must be in `primary`'s folder (ONNX Runtime's rule).
    Returns:
        What was shared and what stayed inline.
    """
    if secondary_dst.parent.resolve() != primary.parent.resolve():
        raise ValueError("ONNX Runtime reads external data only from the graph's own folder")
    data = primary.parent / DATA_NAME
    index = _index(primary, data)
    model = onnx.load(str(secondary_src))  # with its weights
    report = SharingReport(0, 0, 0, 0)
    for t in model.graph.initializer:
        payload = numpy_helper.to_array(t).tobytes()
        hit = index.get(_key(t.data_type, list(t.dims), payload)) if len(payload) >= MIN_BYTES else None
        if hit is None:
            report.own_bytes += len(payload)
            report.own_tensors += 1
            continue
        t.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(field)
        del t.external_data[:]
        for k, v in (("location", DATA_NAME), ("offset", str(hit[0])), ("length", str(hit[1]))):
            t.external_data.add(key=k, value=v)
        t.data_location = onnx.TensorProto.EXTERNAL
        report.shared_bytes += len(payload)
        report.shared_tensors += 1
    tmp = secondary_dst.with_name(secondary_dst.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(secondary_dst)
    return report
