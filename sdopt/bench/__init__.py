"""Benchmark harness: torch (diffusers) vs torch.compile vs ONNX Runtime vs TensorRT, same job.

    config.py   BenchConfig, named configs (benchmarks/configs/*.json), validation
    stats.py    median/p90/min, PSNR, max abs diff, speedups (pure functions)
    machine.py  CPU/RAM/GPU/versions, fp32 matmul peak (child process)
    workers.py  per-backend child process: loads one backend, times runs (JSON lines)
    process.py  parent-side handle of a worker process
    runner.py   orchestration: checks, export cache, alternating runs, results dict
    report.py   rich table, results.json, results.md, stages.png
    command.py  `sdopt bench` (typer function)

Importing this package imports no torch; workers import it in their own processes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchConfig", "make_config", "run_benchmark", "bench_command"]


def __getattr__(name: str) -> Any:  # lazy: keep `import sdopt.bench` light
    if name in ("BenchConfig", "make_config"):
        from sdopt.bench import config

        return getattr(config, name)
    if name == "run_benchmark":
        from sdopt.bench.runner import run_benchmark

        return run_benchmark
    if name == "bench_command":
        from sdopt.bench.command import bench_command

        return bench_command
    raise AttributeError(f"module 'sdopt.bench' has no attribute {name!r}")
