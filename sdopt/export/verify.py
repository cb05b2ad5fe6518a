"""Exported graph vs PyTorch module: same seeded inputs, ONNX Runtime on the CPU.

Errors are measured relative to the largest reference magnitude of each output, so one
tolerance fits the U-Net (values ~1) and the text encoder (values ~10).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdopt.engines.ort import session_options
from sdopt.errors import SdoptError
from sdopt.export.components import ComponentPlan
from sdopt.manifest import Verification

TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


def verify_component(
    plan: ComponentPlan, onnx_path: Path, shapes: list[dict[str, int]], tolerance: float, seed: int = 0
) -> Verification:
    """Run the graph and the module on seeded inputs of each dim-value set in `shapes`."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types (InvalidGraph, Fail, ...) share no public base
        raise SdoptError(
            f"ONNX Runtime cannot load the exported graph {onnx_path.parent.name}/{onnx_path.name}: {e}",
            "this is an export bug, not your input: please report it with the --debug output",
        ) from e
    input_types = {i.name: _np_dtype(i.type) for i in session.get_inputs()}
    per_output: dict[str, dict[str, float]] = {}
    for k, values in enumerate(shapes):
        feed = plan.example_inputs(values, seed + k)
        with torch.no_grad():
            ref = plan.module(*(torch.from_numpy(feed[s.name]) for s in plan.inputs))
        refs = [r.float().numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        got = session.run([s.name for s in plan.outputs], {n: a.astype(input_types[n]) for n, a in feed.items()})
        for spec, r, g in zip(plan.outputs, refs, got, strict=True):
            g = g.astype(np.float32)
            abs_err = float(np.max(np.abs(g - r))) if np.all(np.isfinite(g)) else float("inf")
            rel_err = abs_err / max(float(np.max(np.abs(r))), 1e-6)
            worst = per_output.setdefault(spec.name, {"max_abs_err": 0.0, "max_rel_err": 0.0})
            worst["max_abs_err"] = max(worst["max_abs_err"], abs_err)
            worst["max_rel_err"] = max(worst["max_rel_err"], rel_err)
    max_abs = max(v["max_abs_err"] for v in per_output.values())
    max_rel = max(v["max_rel_err"] for v in per_output.values())
    return Verification(max_abs, max_rel, tolerance, bool(max_rel <= tolerance), per_output)


def _np_dtype(ort_type: str) -> np.dtype:
    return np.dtype(
        {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}[
            ort_type
        ]
    )
