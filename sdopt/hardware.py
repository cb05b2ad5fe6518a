"""Facts about this host's CPU and NVIDIA GPU, for the exporter, the runtime and the benchmark alike.

CPU facts come from /proc/cpuinfo (empty elsewhere); GPU facts from cuda-python, else nvidia-smi.
Importing this module imports no engine library; `gpu_facts` imports cuda-python when called.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

from sdopt.errors import NoGpuError, SdoptError


# -- CPU ---------------------------------------------------------------------------------------------
def cpuinfo_fields() -> list[tuple[str, str]]:
    """(key, value) lines of /proc/cpuinfo, every processor in turn; empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in f) if _]
    except OSError:
        return []


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's FMA units, so more threads do not pay)."""
    seen, phys = set(), None
    for key, value in cpuinfo_fields():
        if key == "physical id":
            phys = value
        elif key == "core id":
            seen.add((phys, value))
    return len(seen) or os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The first processor's feature flags (avx2, avx512f, ...); empty where /proc/cpuinfo has none."""
    return set(next((v.split() for k, v in cpuinfo_fields() if k == "flags"), []))


def cpu_model() -> str:
    """The CPU's model name (x86 "model name", Arm "Hardware"), else what `platform` knows."""
    names = ("model name", "hardware", "cpu model")
    found = next((v for k, v in cpuinfo_fields() if k.lower() in names), None)
    return found or platform.processor() or platform.machine()


# -- GPU ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuFacts:
    """What TensorRT engines are specific to: the GPU model and its compute capability ("8.9")."""

    name: str
    compute_capability: str


def nvidia_device_present() -> bool:
    """Whether the kernel exposes an NVIDIA GPU (/dev/nvidia<N> or /proc/driver/nvidia/gpus/*).

    This needs neither cuda-python nor a working driver stack, so it tells "no GPU here" apart
    from "a GPU that the installed software cannot use".
    """
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))


def parse_nvidia_smi(text: str) -> GpuFacts:
    """First line of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines or "," not in lines[0]:
        raise SdoptError(f"unexpected nvidia-smi output {text.strip()[:80]!r}", "update the NVIDIA driver")
    name, cc = (part.strip() for part in lines[0].rsplit(",", 1))
    return GpuFacts(name, cc)


def gpu_facts(device: int = 0) -> GpuFacts:
    """Name and compute capability of CUDA device `device`: cuda-python, else nvidia-smi.

    Args:
        device: CUDA device ordinal (after CUDA_VISIBLE_DEVICES).
    Returns:
        The device's GpuFacts.
    Raises:
        NoGpuError: no NVIDIA driver or device on this host.
        SdoptError: a driver too old for the installed CUDA wheels, or another CUDA failure.
    """
    from sdopt.engines.cuda import (
        check_driver,
        cuda_check,
        cuda_version_text,
        cuda_versions,
        error_name,
        import_cudart,
    )

    try:
        cudart = import_cudart()
    except SdoptError:
        return _gpu_facts_from_smi(device)
    driver, runtime = cuda_versions(cudart)
    check_driver(driver, runtime)
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err == cudart.cudaError_t.cudaErrorNoDevice or err == cudart.cudaError_t.cudaErrorInvalidDevice:
        raise NoGpuError(
            f"no NVIDIA GPU {device} on this host ({error_name(err)})",
            "run on a host with an NVIDIA GPU (check CUDA_VISIBLE_DEVICES and `nvidia-smi`)",
        )
    if err == cudart.cudaError_t.cudaErrorInsufficientDriver:  # same major, yet too old for this runtime
        raise SdoptError(
            f"the NVIDIA driver (CUDA {cuda_version_text(driver)}) is too old for the installed CUDA "
            f"{cuda_version_text(runtime)} wheels ({error_name(err)})",
            "update the NVIDIA driver, or install wheels for an older CUDA",
        )
    prop = cuda_check(cudart, (err, prop), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuFacts(name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}")


def _gpu_facts_from_smi(device: int) -> GpuFacts:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise NoGpuError(
            "no NVIDIA GPU found (no cuda-python and no nvidia-smi)", "run on a host with an NVIDIA GPU and driver"
        )
    # nvidia-smi ignores CUDA_VISIBLE_DEVICES, so ask for the physical GPU that CUDA calls `device`.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ident = visible[device] if device < len(visible) else str(device)
    proc = subprocess.run(
        [smi, "-i", ident, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise NoGpuError(
            f"nvidia-smi found no GPU {ident}: {proc.stderr.strip()[:200]}", "run on a host with an NVIDIA GPU"
        )
    return parse_nvidia_smi(proc.stdout)


__all__ = [
    "GpuFacts",
    "cpu_flags",
    "cpu_model",
    "cpuinfo_fields",
    "gpu_facts",
    "nvidia_device_present",
    "parse_nvidia_smi",
    "physical_cores",
]
