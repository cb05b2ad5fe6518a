"""TensorRT helpers that the engine builder and the TensorRT backend share.

Written against the TensorRT 10.x/11.x Python bindings (pyCore.cpp) and documentation; the
functions that call TensorRT have not been executed in this repository (no GPU, no TensorRT on
its CI hosts). The version rule and the refit checks before TensorRT is called are CPU-tested.
"""

from __future__ import annotations

import re
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


def refit_engine(trt: ModuleType, engine: Any, weights: dict[str, np.ndarray]) -> None:
    """Replace named weights of a refittable engine in place (`trt.Refitter` + `set_named_weights`).

    The engine must have been built with `sdopt build --refittable` (BuilderFlag.REFIT). Names are
    the ONNX initializer names, which TensorRT's ONNX parser gives the weights. Each array must have
    the prototype's element count and type (fp16 engines take float16 arrays). Refit between
    inferences: no execution context of `engine` may be running. The arrays are kept alive by the
    refitter until `refit_cuda_engine` returns, and TensorRT copies them into the engine.

    Args:
        trt: the tensorrt module the engine came from.
        engine: the deserialized ICudaEngine.
        weights: ONNX initializer name -> new values.
    Raises:
        SdoptError: the engine is not refittable, a name or shape does not fit, or TensorRT refuses.
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
    for name, array in weights.items():
        proto = refitter.get_weights_prototype(name)
        want = check_refit_array(name, array, int(proto.size), proto.dtype)
        if not refitter.set_named_weights(name, want):
            raise SdoptError(
                f"TensorRT rejected the new weights of {name} (see its log above)",
                "pass an array of the original weights' shape and type",
            )
    missing = list(refitter.get_missing_weights())
    if missing:
        raise SdoptError(
            f"refitting also needs the weights {', '.join(missing[:5])} (TensorRT fused them with the ones given)",
            "pass those weights too, with their current or new values",
        )
    if not refitter.refit_cuda_engine():
        raise SdoptError(
            "TensorRT could not refit the engine (see its log above)",
            "check that no inference is running on it, then retry",
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
    "check_refit_array",
    "import_tensorrt",
    "refit_engine",
    "trt_logger",
    "version_compatible_loads",
    "version_tuple",
]
