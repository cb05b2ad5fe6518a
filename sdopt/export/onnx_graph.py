"""torch module -> cleaned ONNX file: trace, fold, infer shapes, optional fp16, save.

Two exporters: `torchscript` (torch.onnx's tracing exporter; default: ~30x faster to export
here, and its graphs are the ones ONNX Runtime's and TensorRT's attention fusions know) and
`dynamo` (torch.export-based; the future default of torch.onnx).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from sdopt.export.components import ComponentPlan

TWO_GB = 2**31 - 1
EXTERNAL_DATA = "model.onnx.data"


def export_raw(plan: ComponentPlan, path: Path, example: dict[str, np.ndarray], opset: int, exporter: str) -> None:
    """Trace `plan.module` on `example` (batch 2: dynamo rejects a dynamic batch traced at 1)."""
    args = tuple(torch.from_numpy(example[s.name]) for s in plan.inputs)
    names_in = [s.name for s in plan.inputs]
    names_out = [s.name for s in plan.outputs]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {
                s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in plan.inputs + plan.outputs
            }
            torch.onnx.export(
                plan.module,
                args,
                str(path),
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        elif exporter == "dynamo":
            torch.onnx.export(
                plan.module,
                args,
                str(path),
                input_names=names_in,
                output_names=names_out,
                dynamic_shapes=_dynamo_shapes(plan),
                opset_version=opset,
                dynamo=True,
                external_data=True,
                verbose=False,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}")


def _dynamo_shapes(plan: ComponentPlan) -> tuple[dict[int, object], ...]:
    """torch.export Dims per positional argument; sizes that must be multiples of k (U-Net
    downsampling) are expressed as k * Dim so the exporter can prove them."""
    Dim = torch.export.Dim
    dims: dict[str, object] = {}
    for name, r in plan.dims.items():
        k = plan.size_multiple if name != "batch" else 1
        dims[name] = Dim(name, min=r.min // k, max=r.max // k) * k if k > 1 else Dim(name, min=r.min, max=r.max)
    return tuple({i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} for s in plan.inputs)


def finalize(raw: Path, out: Path, fp16_ops: list[str] | None, location: str | None = None) -> None:
    """Clean the raw export and write `out` (one external data file when over 2 GB, or always
    into `location` when given: a weights file that several graphs of one folder share).

    fp16_ops=None keeps fp32; a list converts to fp16 while keeping those op types in fp32
    (the islands where fp16 overflows), which is how TensorRT 11 strongly typed networks
    get fp16. Graph cleanup and constant folding run only where the model fits in one 2 GB
    protobuf; the exporters already fold the constants of larger ones.
    """
    # Sized on disk: ModelProto.ByteSize() itself fails past protobuf's 2 GB limit.
    large = sum(p.stat().st_size for p in raw.parent.iterdir()) >= TWO_GB
    model = onnx.load(str(raw))
    if not large:
        model = _fold(model)
    if fp16_ops is not None:
        model = to_fp16(model, fp16_ops, shape_inference=not large)
    out.parent.mkdir(parents=True, exist_ok=True)
    if location is None and sum(t.ByteSize() for t in model.graph.initializer) < TWO_GB - (256 << 20):
        model = onnx.shape_inference.infer_shapes(model)  # (the check above leaves room for the graph)
        onnx.save_model(model, str(out))
    else:
        onnx.save_model(
            model,
            str(out),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location or EXTERNAL_DATA,
            size_threshold=1024,
        )
        del model
        onnx.shape_inference.infer_shapes_path(str(out))


def drop_outputs(src: Path, dst: Path, names: list[str]) -> None:
    """Write `src`'s graph without the outputs `names` to `dst` in the same folder: the weights
    stay in `src`'s external data file, which both graphs then reference (no second copy)."""
    if src.parent != dst.parent:
        raise ValueError("graphs share external data only within one folder (onnx and ONNX Runtime reject '..')")
    model = onnx.load(str(src), load_external_data=False)
    kept = [o for o in model.graph.output if o.name not in names]
    if len(kept) != len(model.graph.output) - len(names):
        raise ValueError(f"{src} lacks some of the outputs {names}")
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save_model(model, str(dst))


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding without shape folding: onnx-graphsurgeon 0.6.1 ignores Shape's
    start/end attributes (emitted by the dynamo exporter) and would fold wrong reshapes."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    model = fold_constants(model, fold_shapes=False, error_ok=True)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def to_fp16(model: onnx.ModelProto, fp32_ops: list[str], shape_inference: bool = True) -> onnx.ModelProto:
    """fp16 weights and activations, `fp32_ops` op types kept fp32 behind Cast nodes.

    Constant nodes become initializers first: the converter keeps the inputs that must stay float
    (Resize's scales) fp32 only when they are initializers, and converts a Constant node's value.
    Folding does this for graphs under 2 GB; a larger graph (the sd15 U-Net) is not folded, and
    its upsamplers' Resize would get fp16 scales, which ONNX Runtime rejects as an invalid graph.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    constants_to_initializers(model)
    return convert_float_to_float16(
        model, keep_io_types=False, op_block_list=fp32_ops, disable_shape_infer=not shape_inference
    )


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn the main graph's tensor-valued Constant nodes into initializers of the same name, in place.

    Args:
        model: the model to change.

    Returns:
        How many Constant nodes were turned.
    """
    graph = model.graph
    kept, turned = [], 0
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        turned += 1
    if turned:
        del graph.node[:]
        graph.node.extend(kept)
    return turned


def graph_io(path: Path) -> dict[str, str]:
    """name -> numpy dtype name of the saved graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)
    np_type = onnx.helper.tensor_dtype_to_np_dtype
    return {
        v.name: np.dtype(np_type(v.type.tensor_type.elem_type)).name for v in [*model.graph.input, *model.graph.output]
    }


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
