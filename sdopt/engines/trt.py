"""TensorRT helpers that the engine builder and the TensorRT backend share.

Written against the TensorRT 10.x/11.x Python bindings (pyCore.cpp) and documentation; the
functions that call TensorRT have not been executed in this repository (no GPU, no TensorRT on
its CI hosts). The version rule and the refit checks before TensorRT is called are CPU-tested.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from sdopt.engines.cuda import INSTALL_FIX
from sdopt.errors import SdoptError

# Version-compatible engines load across one documented major step only (support matrix,
# "Engine Portability"): TensorRT 8 engines in TensorRT 10, TensorRT 10 engines in TensorRT 11.
NEXT_MAJOR = {8: 10, 10: 11}


def import_tensorrt(lean_ok: bool = False) -> ModuleType:
    """`tensorrt`, else (when `lean_ok`) `tensorrt_lean`, which runs version-compatible engines only.

    Args:
        lean_ok: accept the lean runtime package when the full one is missing.
    Returns:
        The imported module.
    """
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        if lean_ok:
            try:
                import tensorrt_lean

                return tensorrt_lean
            except ImportError:
                pass
    raise SdoptError("tensorrt is not installed", INSTALL_FIX)


_LOGGERS: dict[str, Any] = {}


def trt_logger(trt: ModuleType) -> Any:
    """One logger per TensorRT module for the whole process: builder, runtime and refitter share it."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt.__name__]


def version_tuple(version: str) -> tuple[int, ...]:
    """ "10.7.0.23" -> (10, 7, 0)."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def version_compatible_loads(built: str, host: str) -> bool:
    """Whether a version-compatible engine built with TensorRT `built` loads in TensorRT `host`.

    Args:
        built: the TensorRT version that built the engine.
        host: the TensorRT version installed here.
    Returns:
        True for the same major at the same or a later version, or the documented next major.
    """
    b, h = version_tuple(built), version_tuple(host)
    if not b or not h:
        return False
    return (h[0] == b[0] and h >= b) or NEXT_MAJOR.get(b[0]) == h[0]


# Weights one partner round can bring in more partners (a fused GEMM's bias, then what that was fused with);
# a few rounds settle every combination TensorRT reports, and bound the loop where none settles.
PARTNER_ROUNDS = 4
PartnerSource = Callable[[list[str]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class PartnerPlan:
    """What to do about the weights `Refitter.get_missing_weights` still names after the new ones were set.

    TensorRT reports as missing every weight it combined at build time with a weight that was
    set (a GEMM's weights with its bias, a convolution's kernel with a scale folded into it);
    they must be set too, with their current values, before `refit_cuda_engine`.
    """

    supply: list[str]  # named refittable weights not given yet: read their current values and set them
    unnamed: int  # missing weights TensorRT names "" (they cannot be supplied by name)
    unknown: list[str]  # named, but not refittable (not in get_all_weights): nothing can set them


def partners_to_supply(missing: list[str], given: set[str], refittable: set[str]) -> PartnerPlan:
    """Sort the refitter's missing weights into those to supply and those that cannot be.

    Args:
        missing: `Refitter.get_missing_weights()` ("" for an unnamed weight).
        given: the names already set on this refitter.
        refittable: `Refitter.get_all_weights()`.
    Returns:
        The plan; `supply` in the refitter's order, without repeats or names already given.
    """
    supply: list[str] = []
    unknown: list[str] = []
    for name in missing:
        if not name or name in given or name in supply or name in unknown:
            continue
        (supply if name in refittable else unknown).append(name)
    return PartnerPlan(supply, sum(1 for n in missing if not n), unknown)


def refit_engine(
    trt: ModuleType, engine: Any, weights: dict[str, np.ndarray], partners: PartnerSource | None = None
) -> list[str]:
    """Replace named weights of a refittable engine in place (`trt.Refitter` + `set_named_weights`).

    The engine must have been built with `sdopt build --refittable` (BuilderFlag.REFIT). Names are
    the ONNX initializer names, which TensorRT's ONNX parser gives the weights. Each array must have
    the prototype's element count and type (fp16 engines take float16 arrays). Refit between
    inferences: no execution context of `engine` may be running. The arrays are kept alive by the
    refitter until `refit_cuda_engine` returns, and TensorRT copies them into the engine.
    Weights TensorRT fused with the given ones (`get_missing_weights`) are asked of `partners`
    (their current values) and set as well, for a few rounds, before the engine is refitted.

    Args:
        trt: the tensorrt module the engine came from.
        engine: the deserialized ICudaEngine.
        weights: ONNX initializer name -> new values.
        partners: names -> current values of those it knows (None: nothing beyond `weights` is set).
    Returns:
        The partner weights that were set besides `weights`.
    Raises:
        SdoptError: the engine is not refittable, a name or shape does not fit, fused partner
            weights that cannot be supplied, or TensorRT refuses.
    """
    if not getattr(engine, "refittable", False):
        raise SdoptError(
            "this TensorRT engine was not built refittable",
            "rebuild it with weights that can change: sdopt build ARTIFACT --force --refittable",
        )
    refitter = trt.Refitter(engine, trt_logger(trt))
    known = set(refitter.get_all_weights())
    unknown = sorted(set(weights) - known)
    if unknown:
        raise SdoptError(
            f"the engine has no refittable weights named {', '.join(unknown[:5])}",
            f"use ONNX initializer names; the engine has {len(known)} refittable weights",
        )
    keep = _set_named(refitter, weights)  # the arrays must outlive refit_cuda_engine
    supplied: list[str] = []
    missing = list(refitter.get_missing_weights())
    for _ in range(PARTNER_ROUNDS):
        plan = partners_to_supply(missing, set(weights) | set(supplied), known)
        if partners is None or not plan.supply:
            break
        found = {n: v for n, v in partners(plan.supply).items() if n in plan.supply}
        if not found:
            break
        keep += _set_named(refitter, found)
        supplied += list(found)
        missing = list(refitter.get_missing_weights())
    if missing:
        raise missing_partners_error(missing, supplied)
    if not refitter.refit_cuda_engine():
        raise SdoptError(
            "TensorRT could not refit the engine (see its log above)",
            "check that no inference is running on it, then retry",
        )
    del keep
    return supplied


def _set_named(refitter: Any, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
    arrays = []
    for name, array in weights.items():
        proto = refitter.get_weights_prototype(name)
        arrays.append(check_refit_array(name, array, int(proto.size), proto.dtype))
        if not refitter.set_named_weights(name, arrays[-1]):
            raise SdoptError(
                f"TensorRT rejected the new weights of {name} (see its log above)",
                "pass an array of the original weights' shape and type",
            )
    return arrays


def missing_partners_error(missing: list[str], supplied: list[str]) -> SdoptError:
    """The error for weights the refitter still misses after the partner rounds.

    Args:
        missing: `Refitter.get_missing_weights()` ("" for an unnamed weight).
        supplied: the partner weights that were set.
    Returns:
        One SdoptError naming them (up to 8, then a count) and the way out.
    """
    named = [n for n in dict.fromkeys(missing) if n]
    unnamed = sum(1 for n in missing if not n)
    parts = [", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")] if named else []
    if unnamed:
        parts.append(f"{unnamed} unnamed weight(s)")
    after = f", after {len(supplied)} fused partner weight(s) were supplied," if supplied else ""
    return SdoptError(
        f"refitting also needs the weights {' and '.join(parts)}{after} (TensorRT fused them with the ones "
        "given, and their current values are not known here)",
        "pass their current values too (refit_engine's `partners`); where they are no initializers of the "
        "graph the engine was built from, rebuild the engine (sdopt build ARTIFACT --force --refittable) "
        "or merge the LoRA at export instead: sdopt export --lora FILE",
    )


_REFIT_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "BF16": None,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
}


def check_refit_array(name: str, array: np.ndarray, count: int, trt_dtype: Any) -> np.ndarray:
    """The contiguous array to hand `set_named_weights`, or the error naming what does not fit.

    Args:
        name: the weights' name, for messages.
        array: the new values.
        count: the prototype's element count.
        trt_dtype: the prototype's TensorRT DataType (or its member name).
    Returns:
        `array`, C-contiguous, in the prototype's numpy dtype (a float array is cast, nothing else is).
    """
    kind = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    dtype = _REFIT_DTYPES.get(kind)
    if dtype is None:
        raise SdoptError(
            f"weights {name} are {kind} in the engine, which numpy cannot hold",
            "refit only float32/float16/int weights",
        )
    if array.size != count:
        raise SdoptError(
            f"weights {name} have {array.size} values, the engine's have {count}",
            "pass an array of the original weights' shape",
        )
    if array.dtype != dtype and not (np.issubdtype(array.dtype, np.floating) and np.issubdtype(dtype, np.floating)):
        raise SdoptError(
            f"weights {name} are {array.dtype}, the engine's are {np.dtype(dtype).name}",
            f"pass {np.dtype(dtype).name} values",
        )
    return np.ascontiguousarray(array, dtype=dtype)


__all__ = [
    "NEXT_MAJOR",
    "PARTNER_ROUNDS",
    "PartnerPlan",
    "PartnerSource",
    "check_refit_array",
    "import_tensorrt",
    "missing_partners_error",
    "partners_to_supply",
    "refit_engine",
    "trt_logger",
    "version_compatible_loads",
    "version_tuple",
]
