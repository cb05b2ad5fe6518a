"""What the TensorRT backend checks before TensorRT sees an engine: pure functions, CPU-tested.

`select_engine`, `check_engine_compatible`, `check_host_code` and `check_shapes` work on a
manifest `EngineEntry` and the detected (TensorRT version, GPU), so a mismatch is one readable
`SdoptError` naming the rebuild command instead of a deserialization failure deep in TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdopt.engines.cuda import INSTALL_FIX
from sdopt.engines.trt import NEXT_MAJOR, version_compatible_loads
from sdopt.errors import EnginesMissingError, SdoptError
from sdopt.manifest import EngineEntry, Manifest, ShapeRange

# The backend runs every engine with the execution context's default profile; the builder writes one.
ACTIVE_PROFILE = 0

# TensorRT DataType member name -> numpy dtype (types numpy lacks, BF16/FP8/INT4/FP4, are unsupported).
NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


def rebuild_fix(artifact: str | Path) -> str:
    return f"rebuild the engines on this machine: sdopt build {artifact} --force"


def check_engine_compatible(
    entry: EngineEntry,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    artifact: str | Path = "ARTIFACT",
    lean: bool = False,
) -> None:
    """Raise unless this GPU and TensorRT can deserialize the engine of `entry`.

    Engines are specific to the compute capability and tuned per GPU model, and by default load
    only in the exact TensorRT version that built them. Version-compatible engines load in the
    same major at a later version, or in the documented next major (8 -> 10, 10 -> 11). Engines
    built without their lean runtime need `IRuntime.load_runtime` of the building version's lean
    library, which sdopt does not do: they are refused with the rebuild command.

    Args:
        entry: the manifest's record of the engine.
        trt_version: TensorRT installed here.
        gpu_name: this GPU's model name.
        compute_capability: this GPU's, e.g. "8.9".
        artifact: the artifact folder, for the rebuild command.
        lean: only `tensorrt_lean` is installed (it runs version-compatible engines only).
    """
    what, fix = f"the {entry.component} engine", rebuild_fix(artifact)
    _check_gpu(entry, gpu_name, compute_capability, what, fix)
    _check_version(entry, trt_version, lean, what, fix)


def _check_gpu(entry: EngineEntry, gpu_name: str, compute_capability: str, what: str, fix: str) -> None:
    """Engines are compiled for one compute capability and tuned for one GPU model."""
    if entry.compute_capability != compute_capability:
        raise SdoptError(
            f"{what} was built for compute capability {entry.compute_capability} ({entry.gpu}), "
            f"this GPU ({gpu_name}) is {compute_capability}",
            fix,
        )
    if entry.gpu != gpu_name:
        raise SdoptError(
            f"{what} was built on a {entry.gpu}, this GPU is a {gpu_name} (TensorRT tunes engines per GPU model)", fix
        )


def _check_version(entry: EngineEntry, trt_version: str, lean: bool, what: str, fix: str) -> None:
    """The TensorRT version rules: exact version, or the version-compatible steps."""
    flags = entry.flags
    if flags.exclude_lean_runtime:
        raise SdoptError(
            f"{what} was built with --exclude-lean-runtime: it needs TensorRT {entry.tensorrt}'s lean "
            "runtime library loaded separately, which sdopt does not do",
            f"{fix} (without that option)",
        )
    if lean and not flags.version_compatible:
        raise SdoptError(
            f"{what} is not version-compatible, and only tensorrt_lean (which runs version-compatible "
            "engines only) is installed",
            f"install the full runtime ({INSTALL_FIX}), or {fix} --version-compatible",
        )
    if flags.version_compatible:
        if not version_compatible_loads(entry.tensorrt, trt_version):
            steps = ", ".join(f"{a} -> {b}" for a, b in NEXT_MAJOR.items())
            raise SdoptError(
                f"{what} was built with TensorRT {entry.tensorrt}; version-compatible engines load in "
                f"that or a later version of the same major, or across the documented major steps "
                f"({steps}), and this host has {trt_version}",
                fix,
            )
    elif entry.tensorrt != trt_version:
        raise SdoptError(
            f"{what} was built with TensorRT {entry.tensorrt}, this host has TensorRT {trt_version} "
            "(engines load only in the TensorRT version that built them)",
            fix,
        )


def embeds_host_code(entry: EngineEntry) -> bool:
    """Version-compatible engines embed TensorRT's lean runtime (host code) unless built without it."""
    return entry.flags.version_compatible and not entry.flags.exclude_lean_runtime


def check_host_code(entry: EngineEntry, allow_host_code: bool, artifact: str | Path = "ARTIFACT") -> None:
    """Loading an engine that embeds host code runs code from the artifact: that takes a trust switch."""
    if embeds_host_code(entry) and not allow_host_code:
        raise SdoptError(
            f"the {entry.component} engine is version-compatible: loading it executes host code embedded in "
            f"{entry.path}, which sdopt does not do by default",
            "if you trust this artifact, load it with allow_host_code=True (CLI: --allow-host-code); "
            f"otherwise {rebuild_fix(artifact)} (without --version-compatible)",
        )


def select_engine(
    manifest: Manifest,
    component: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    artifact: str | Path = "ARTIFACT",
    lean: bool = False,
) -> EngineEntry:
    """The newest engine of `component` this GPU + TensorRT can load.

    Returns:
        The manifest entry to load.
    Raises:
        EnginesMissingError: no engine of `component` fits this host (none built, or the closest one's reason).
    """
    entries = [e for e in manifest.engines if e.component == component]
    if not entries:
        raise EnginesMissingError(
            f"{artifact} has no TensorRT engine for {component}", f"build them: sdopt build {artifact} --force"
        )
    errors: list[tuple[tuple[bool, bool], SdoptError]] = []
    for entry in reversed(entries):
        try:
            check_engine_compatible(entry, trt_version, gpu_name, compute_capability, artifact, lean)
            return entry
        except SdoptError as e:
            errors.append(((entry.compute_capability == compute_capability, entry.gpu == gpu_name), e))
    best = max(errors, key=lambda t: t[0])[1]  # prefer the error of an engine for this very GPU
    if len(entries) > 1:
        raise EnginesMissingError(
            f"none of the {len(entries)} {component} engines fits this host; closest: {best.problem}", best.fix
        )
    raise EnginesMissingError(best.problem, best.fix)


def check_shapes(entry: EngineEntry, shapes: dict[str, tuple[int, ...]], artifact: str | Path = "ARTIFACT") -> None:
    """Raise unless every input shape lies inside the profile the backend runs with (profile 0)."""
    problem = _outside(entry.profiles[ACTIVE_PROFILE], shapes) if entry.profiles else "the engine has no profile"
    if not problem:
        return
    how = (
        (
            "the engine is static: generate at its batch and size, or rebuild for this one: "
            f"sdopt build {artifact} --force --static --batch B --height H --width W"
        )
        if entry.flags.static
        else (
            f"rebuild with this shape in range: sdopt build {artifact} --force (re-export with --min-size/--max-size/"
            "--max-batch first if it is outside the artifact's range)"
        )
    )
    raise SdoptError(f"the {entry.component} engine cannot run this call: {problem}", how)


def _outside(profile: dict[str, ShapeRange], shapes: dict[str, tuple[int, ...]]) -> str:
    for name, r in profile.items():
        if name not in shapes:
            return f"input {name} is missing"
        if not r.contains(tuple(shapes[name])):
            return f"input {name} has shape {list(shapes[name])}, outside the engine's profile {r.min}..{r.max}"
    return ""


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT DataType (by member name, which tensorrt and tensorrt_lean share)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in NUMPY_DTYPES:
        raise SdoptError(
            f"engine tensor type {name} has no numpy equivalent", "re-export with fp32 or fp16 graph inputs"
        )
    return np.dtype(NUMPY_DTYPES[name])


__all__ = [
    "ACTIVE_PROFILE",
    "check_engine_compatible",
    "check_host_code",
    "check_shapes",
    "embeds_host_code",
    "numpy_dtype",
    "rebuild_fix",
    "select_engine",
]
