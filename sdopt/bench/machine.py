"""The machine a benchmark ran on: CPU, RAM, GPU, OS, library versions, and its fp32 matmul peak.

The matmul peak is measured in a child process (`python -m sdopt.bench.machine THREADS`) so
that the BLAS thread count can be set before numpy loads, to the benchmark's own threads:
"U-Net GFLOP/s vs matmul peak" then compares like with like.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

LIBRARIES = (
    "sdopt",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "torch",
    "diffusers",
    "transformers",
    "tensorrt",
    "matplotlib",
    "psutil",
)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def physical_cores() -> int:
    from sdopt.hardware import physical_cores as cores

    return cores()


def cpu_model() -> str:
    from sdopt.hardware import cpuinfo_fields

    names = ("model name", "hardware", "cpu model")
    found = next((v for k, v in cpuinfo_fields() if k.lower() in names), None)
    return found or platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _nvidia_smi(*args: str, timeout: float = 20.0) -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs as nvidia-smi lists them (empty without a GPU or driver)."""
    lines = _nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits") or []
    found = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            try:
                memory = int(float(parts[1])) * 1024 * 1024
            except ValueError:
                memory = None
            found.append({"name": parts[0], "memory_bytes": memory, "driver": parts[2]})
    return found


def has_gpu() -> bool:
    return bool(gpus())


def gpu_process_memory(pid: int) -> int | None:
    """Device memory nvidia-smi attributes to process `pid` (bytes), None if unknown."""
    lines = _nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits", timeout=10.0)
    if lines is None:
        return None
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                return int(float(parts[1])) * 1024 * 1024
            except ValueError:
                return None
    return 0


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine_info(threads: int) -> dict[str, Any]:
    """Cheap facts (no child process, no heavy import)."""
    return {
        "cpu": {
            "model": cpu_model(),
            "physical_cores": physical_cores(),
            "logical_cores": os.cpu_count(),
            "arch": platform.machine(),
        },
        "threads": threads,
        "ram_bytes": ram_bytes(),
        "gpus": gpus(),
        "os": platform.platform(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "versions": versions(),
    }


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    return env


def measure_matmul_peak(threads: int, gpu: bool = False, timeout: float = 300.0) -> dict[str, Any]:
    """Best-of sgemm GFLOP/s with `threads` BLAS threads (and on the GPU when `gpu`), in a child
    process. Never raises: a failure comes back as {"error": ...}."""
    cmd = [sys.executable, "-m", "sdopt.bench.machine", str(threads)] + (["--gpu"] if gpu else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=thread_env(threads))
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"matmul peak measurement failed: {e}"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"matmul peak measurement failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def _time_best(fn, flops: float, min_seconds: float, max_calls: int = 50) -> float:
    fn()  # warm-up: thread pool start, page faults
    best = float("inf")
    start = time.perf_counter()
    calls = 0
    while calls < 3 or (time.perf_counter() - start < min_seconds and calls < max_calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return flops / best / 1e9


def _matmul_main(threads: int, gpu: bool) -> dict[str, Any]:
    import numpy as np

    n = 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    result: dict[str, Any] = {
        "cpu_fp32_gflops": _time_best(lambda: a @ b, 2.0 * n**3, 1.5),
        "cpu_method": f"numpy float32 {n}x{n} @ {n}x{n}, best of repeated calls, {threads} BLAS threads",
        "threads": threads,
    }
    if gpu:
        try:
            import torch

            if torch.cuda.is_available():
                torch.backends.cuda.matmul.allow_tf32 = False
                m = 8192
                for label, dtype in (("cuda_fp32_gflops", torch.float32), ("cuda_fp16_gflops", torch.float16)):
                    x = torch.randn(m, m, device="cuda", dtype=dtype)
                    y = torch.randn(m, m, device="cuda", dtype=dtype)

                    def call(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                        x @ y
                        torch.cuda.synchronize()

                    result[label] = _time_best(call, 2.0 * m**3, 1.0)
                result["cuda_method"] = f"torch {m}x{m} matmul on {torch.cuda.get_device_name()}, TF32 off for fp32"
        except Exception as e:  # noqa: BLE001 - the CPU figure is still worth reporting
            result["cuda_error"] = f"{type(e).__name__}: {e}"[:300]
    return result


if __name__ == "__main__":  # python -m sdopt.bench.machine THREADS [--gpu]
    print(json.dumps(_matmul_main(int(sys.argv[1]), "--gpu" in sys.argv[2:])))
