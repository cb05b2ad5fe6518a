"""Where each LoRA-able torch weight ended up in an exported ONNX graph.

The exporters rename and reshape weights: torch.onnx's tracing exporter keeps
`unet.conv_in.weight` for a Conv but stores a Linear's weight transposed under a fresh
name (`onnx::MatMul_1636`) for MatMul; constant folding and the fp16 conversion rename or
recast others. Names are therefore not trusted: after the export, every Linear/Conv2d weight
is found by value among the graph's initializers (its exact bytes, or its transpose's, in
the initializer's dtype, cast as the fp16 converter casts). The result goes into the
manifest (`Component.weights`) so the torch-free runtime can swap LoRA-merged weights in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from sdopt.manifest import WeightRef

# Components whose weights LoRA files target (unet_shallow shares the U-Net's weights).
LORA_COMPONENTS = ("unet", "unet_deep", "unet_shallow", "text_encoder", "text_encoder_2")


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """module path -> module, for every Linear and Conv2d (what LoRA targets)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n}


def map_weights(model: torch.nn.Module, onnx_path: Path, partial: bool = False) -> dict[str, WeightRef]:
    """Find every Linear/Conv2d weight of `model` among `onnx_path`'s initializers.

    Args:
        model: the diffusers/transformers model the graph was traced from (unwrapped).
        onnx_path: the final graph (external data beside it is read too).
        partial: the graph computes only part of the model (unet_shallow): weights it
            lacks are left out instead of being recorded as unmapped.
    Returns:
        "<module>.weight" -> WeightRef; `initializer` is "" where the weight is in no
        initializer as-is or transposed (folded into another constant): no runtime swap there.
    """
    from sdopt.lora.onnx_weights import initializer_locations  # one tensor in memory at a time

    by_hash: dict[tuple[str, bytes], list[str]] = {}
    dtypes: set[np.dtype] = set()
    for name, loc in initializer_locations(onnx_path).items():
        if np.dtype(loc.dtype) not in (np.float32, np.float16) or len(loc.shape) < 2:
            continue
        array = loc.read()
        dtypes.add(array.dtype)
        by_hash.setdefault(_key(array), []).append(name)
    out: dict[str, WeightRef] = {}
    for name, module in lora_modules(model).items():
        weight = module.weight.detach().cpu().float().numpy()
        ref = _find(weight, dtypes, by_hash)
        if ref is not None:
            out[name + ".weight"] = ref
        elif not partial:
            out[name + ".weight"] = WeightRef("", list(weight.shape))
    return out


def _find(weight: np.ndarray, dtypes: set[np.dtype], by_hash: dict[tuple[str, bytes], list[str]]) -> WeightRef | None:
    for dtype in dtypes:
        cast = _cast(weight, dtype)
        candidates = [(cast, False)] + ([(np.ascontiguousarray(cast.T), True)] if cast.ndim == 2 else [])
        for array, transposed in candidates:
            names = by_hash.get(_key(array), [])
            if len(names) == 1:  # several: identical initializers, no way to tell which is ours
                return WeightRef(names[0], list(weight.shape), transposed)
    return None


def _cast(weight: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """fp16 exactly as onnxruntime's float16 converter casts (tiny values clamp to +-5.96e-8)."""
    if dtype == np.float16:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        return np.ascontiguousarray(convert_np_to_float16(weight))
    return np.ascontiguousarray(weight.astype(dtype))


def _key(array: np.ndarray) -> tuple[str, bytes]:
    shape = "x".join(map(str, array.shape))
    digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()
    return f"{array.dtype.name}:{shape}", digest


def lora_weight_map(plan, path: Path) -> dict[str, WeightRef]:
    """The weight map of one exported component plan (empty for components LoRA never touches).

    Args:
        plan: the ComponentPlan; its module wraps the diffusers model as its only child.
        path: the component's final model.onnx.
    Returns:
        See `map_weights`.
    """
    if plan.name not in LORA_COMPONENTS:
        return {}
    model = next(plan.module.children())
    refs = map_weights(model, path, partial=plan.name == "unet_shallow")
    ort_cpu = path.with_name(path.stem + ".ort-cpu.onnx")  # where artifact.py saves it
    if ort_cpu.is_file():
        mark_ort_cpu(refs, path, ort_cpu)
    return refs


def mark_ort_cpu(refs: dict[str, WeightRef], path: Path, ort_cpu: Path) -> None:
    """Record where ONNX Runtime's saved optimised graph holds each weight: under the same
    name with the same bytes (MatMul weights), or re-laid out in NCHWc blocks under a new
    name (convolutions), found by value. Weights found neither way keep `ort_cpu=False` and
    a LoRA on them loads the original graph.

    Args:
        refs: from `map_weights`, updated in place.
        path: the component's model.onnx.
        ort_cpu: its model.ort-cpu.onnx.
    """
    from sdopt.lora.layout import LAYOUTS, to_layout
    from sdopt.lora.onnx_weights import initializer_locations  # the reader the runtime uses: what it will see

    wanted = {r.initializer for r in refs.values() if r.initializer}
    original = initializer_locations(path, wanted)
    optimised = initializer_locations(ort_cpu)
    blocked: dict[tuple[str, bytes], list[str]] = {}
    for name, loc in optimised.items():
        if len(loc.shape) == 4 and name not in original:
            blocked.setdefault(_key(loc.read().reshape(-1)), []).append(name)
    for ref in refs.values():
        if not ref.initializer:
            continue
        base = original[ref.initializer].read()
        same = optimised.get(ref.initializer)
        if same is not None and np.array_equal(base, same.read()):
            ref.ort_cpu, ref.ort_cpu_initializer = True, ref.initializer
            continue
        for layout in LAYOUTS if base.ndim == 4 else ():
            names = blocked.get(_key(to_layout(base, layout).reshape(-1)), [])
            if len(names) == 1:
                ref.ort_cpu, ref.ort_cpu_initializer, ref.ort_cpu_layout = True, names[0], layout
                break
