"""LoRA on TensorRT: refit engines built `--refittable` with the LoRA-merged weights.

TensorRT's ONNX parser names an engine's weights after the ONNX initializers, so the values
`lora_swap.build_overrides` computes for ONNX Runtime (initializer name -> merged value, in the
graph's layout and dtype) are exactly what `trt.Refitter.set_named_weights` takes; the
session's `refit` (sdopt/runtime/backends/tensorrt_session.py, `sdopt.engines.trt.refit_engine`)
hands them over. Going back: every initializer an earlier LoRA changed and the new set does
not is refitted with its base value, read from the same `model.onnx` the engine was built
from, so refitting back to base gives the base engine's weights bit for bit.

Mode: engines are built with `BuilderFlag.REFIT` (sdopt build --refittable), which lets every
weight be refitted with any value. `REFIT_IDENTICAL` is meant for refitting the same weights
the engine was built with (weight-stripped engines) and lets TensorRT fold them, so it is
wrong for LoRA; see TensorRT's "Refitting an Engine" docs.

Fused weights: where TensorRT combined a changed weight with others at build time (a GEMM's
weights with its bias, a convolution's kernel with a folded scale), the refitter names those
partners in `get_missing_weights` and refuses to refit without them. They are then set with
their current values (`partner_values`: the value being refitted where there is one, else the
base value from `model.onnx`, which is what the engine holds for every weight no LoRA changes),
and a partner that is no initializer of that graph fails with one error naming it. The TensorRT
11.3 kREFIT known issue (a REFIT engine may drop a GEMM bias, even without a refit) is a build
problem: re-supplying the bias as a partner does not fix such an engine (README, `--refittable`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.lora.onnx_weights import initializer_locations
from sdopt.manifest import Manifest


def refit_values(
    root: Path, manifest: Manifest, overrides: dict[str, Any], refitted: dict[str, set[str]]
) -> dict[str, dict[str, np.ndarray]]:
    """component -> initializer -> value to refit: the new merged values, plus base values
    for initializers an earlier LoRA changed and the new LoRAs leave alone.

    Args:
        root: the artifact folder.
        manifest: its manifest.
        overrides: component -> lora_swap.Overrides of the new LoRAs.
        refitted: component -> initializers currently refitted away from the base.
    Returns:
        Only components with something to refit.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in set(overrides) | {c for c, names in refitted.items() if names}:
        values = dict(overrides[name].initializers) if name in overrides else {}
        back = refitted.get(name, set()) - set(values)
        if back:
            comp = manifest.components[name]
            values.update({n: loc.read() for n, loc in initializer_locations(root / comp.path, back).items()})
        if values:
            out[name] = values
    return out


def refit_sessions(
    root: Path,
    manifest: Manifest,
    sessions: dict[str, Any],
    overrides: dict[str, Any],
    refitted: dict[str, set[str]],
    partners_set: dict[str, list[str]] | None = None,
) -> dict[str, set[str]]:
    """Refit each affected engine in place; the caller holds the pipeline's write lock.

    Args:
        root: the artifact folder.
        manifest: its manifest.
        sessions: component -> TensorRT session (with `refit`).
        overrides: component -> lora_swap.Overrides of the new LoRAs.
        refitted: component -> initializers currently refitted away from the base.
        partners_set: filled with component -> the fused partner weights set besides the changed ones.
    Returns:
        The new `refitted` state.
    Raises:
        SdoptError: an engine that is not refittable or refuses the weights.
    """
    values = refit_values(root, manifest, overrides, refitted)
    for name, weights in sorted(values.items()):
        session = getattr(sessions[name], "session", sessions[name])  # the engine session under any io adapter
        if not hasattr(session, "refit"):
            raise SdoptError(
                f"the {name} engine cannot change its weights",
                "use --provider cpu/cuda, or merge the LoRA at export: sdopt export --lora FILE",
            )
        graph = root / manifest.components[name].path
        supplied = session.refit(weights, partial(partner_values, current=weights, base=partial(base_values, graph)))
        if partners_set is not None:
            partners_set[name] = list(supplied or [])
    return {name: set(o.initializers) for name, o in overrides.items()}


def base_values(graph: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers of `graph` as stored (names it lacks are left out).

    Args:
        graph: the model.onnx an engine was built from.
        names: initializer names.
    Returns:
        name -> value.
    """
    return {n: loc.read() for n, loc in initializer_locations(graph, names).items()}


def partner_values(
    names: list[str],
    current: dict[str, np.ndarray],
    base: Callable[[set[str]], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Current values of the weights TensorRT fused with the ones being refitted.

    Args:
        names: the partner weights the refitter misses.
        current: the values this refit sets (merged LoRA values, or base values going back).
        base: names -> base values (the graph the engine was built from) of those it has.
    Returns:
        name -> value for every name found; a name in neither is left out (the refit then
        fails naming it).
    """
    out = {n: current[n] for n in names if n in current}
    rest = {n for n in names if n not in out}
    if rest:
        out.update({n: v for n, v in base(rest).items() if n in rest})
    return out
