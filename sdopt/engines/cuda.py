"""cuda-python's runtime bindings: the import, the (error, *values) convention, driver checks.

cuda-python 12.x and 13.x both import on a host without an NVIDIA driver (the CUDA runtime is
linked into `cuda.bindings`); every call there answers `cudaErrorInsufficientDriver` and
`cudaDriverGetVersion` answers 0. `check_driver` turns the two versions into the right message.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from sdopt.errors import NoGpuError, SdoptError

# The extras in pyproject.toml, one per CUDA major: the wheels must match the driver's CUDA.
EXTRA_FOR_CUDA = {12: "tensorrt-cu12", 13: "tensorrt-cu13"}
# Oldest Linux driver per CUDA major (CUDA release notes, minor-version compatibility table).
MIN_DRIVER = {12: "525.60.13", 13: "580"}
INSTALL_FIX = (
    "pip install 'sdopt[tensorrt-cu12]' (NVIDIA driver 525 or newer) or 'sdopt[tensorrt-cu13]' "
    "(driver 580 or newer) on a host with an NVIDIA GPU; the TensorRT and cuda-python wheels are on PyPI"
)


def import_cudart() -> ModuleType:
    """cuda-python's runtime bindings: `cuda.bindings.runtime` (12.6 and later), else `cuda.cudart`.

    Returns:
        The module with `cudaMalloc`, `cudaGetDeviceProperties`, ... (each returns (error, *values)).
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise SdoptError("cuda-python is not installed", INSTALL_FIX) from None
    return cudart


def error_name(err: Any) -> str:
    """`cudaErrorInsufficientDriver` for an error enum (its repr for anything else)."""
    return str(getattr(err, "name", err))


def cuda_check(cudart: ModuleType, result: Any, what: str) -> Any:
    """Raise on a CUDA error, else return the call's value(s).

    Args:
        cudart: the module from `import_cudart`.
        result: what a cuda-python call returned: (error, *values) or a bare error.
        what: the call, for the message.
    Returns:
        None, the single value, or a tuple of values.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise SdoptError(
            f"CUDA {what} failed: {error_name(err)}", "check the GPU with `nvidia-smi` (driver, memory in use)"
        )
    return values[0] if len(values) == 1 else tuple(values) or None


def cuda_version_text(version: int) -> str:
    """12090 -> "12.9" (CUDA's 1000 * major + 10 * minor encoding)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def check_driver(driver_version: int, runtime_version: int) -> None:
    """Raise unless the driver can run the CUDA runtime that cuda-python (and TensorRT) were built for.

    Args:
        driver_version: `cudaDriverGetVersion()`: the newest CUDA the driver supports, 0 without a driver.
        runtime_version: `cudaRuntimeGetVersion()` of the installed cuda-python.
    Raises:
        NoGpuError: no NVIDIA driver is loaded (driver version 0).
        SdoptError: the driver is older than the wheels' CUDA major (minor versions are compatible).
    """
    if driver_version <= 0:
        raise NoGpuError(
            "no NVIDIA GPU usable: no NVIDIA driver is loaded on this host",
            "run on a host with an NVIDIA GPU and its driver (check with `nvidia-smi`)",
        )
    have, need = driver_version // 1000, runtime_version // 1000
    if have < need:
        extra = EXTRA_FOR_CUDA.get(have)
        other = (
            f"or install the CUDA {have} wheels instead: pip install 'sdopt[{extra}]'"
            if extra
            else ("TensorRT 10 and 11 need CUDA 12 or newer")
        )
        raise SdoptError(
            f"the NVIDIA driver is too old for the installed CUDA {cuda_version_text(runtime_version)} "
            f"wheels: it supports CUDA {cuda_version_text(driver_version)}",
            f"update the driver to {MIN_DRIVER.get(need, 'a CUDA ' + str(need) + ' driver')} or newer, {other}",
        )


def cuda_versions(cudart: ModuleType) -> tuple[int, int]:
    """(driver, runtime) CUDA versions, e.g. (12040, 12090); the driver's is 0 where none is loaded."""
    driver = cuda_check(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    runtime = cuda_check(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    return int(driver), int(runtime)


__all__ = [
    "EXTRA_FOR_CUDA",
    "INSTALL_FIX",
    "MIN_DRIVER",
    "check_driver",
    "cuda_check",
    "cuda_version_text",
    "cuda_versions",
    "error_name",
    "import_cudart",
]
