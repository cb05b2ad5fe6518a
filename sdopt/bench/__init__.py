"""Benchmark harness: torch (diffusers) vs torch.compile vs ONNX Runtime vs TensorRT, same job.

    config.py          BenchConfig, named configs (benchmarks/configs/*.json), validation
    options.py         the CLI options (type, flag, help), one home each
    command.py         `sdopt bench` (typer function)
    plan.py            checks before heavy work, backend availability, the export cache
    records.py         Job, BackendRun, BackendStats: the harness's dataclasses
    runner.py          orchestration: workers, alternating runs
    results.py         raw measurements -> the results dict (schema in benchmarks/README.md)
    stats.py           median/p90/min, PSNR, max abs diff, speedups (pure functions)
    machine.py         CPU/RAM/GPU/versions, fp32 matmul peak (child process)
    process.py         parent-side handle of a worker process
    workers.py         per-backend child process: the JSON-lines request loop
    worker_torch.py    diffusers (eager / torch.compile) backend
    worker_runtime.py  sdopt runtime backend (ONNX Runtime exact/fast, TensorRT)
    worker_support.py  timers, peak RSS, shared latents, error text
    report.py          rich table, results.json, results.md, stages.png
    quality.py         --quality metrics: FID, KID, IS, CLIP score, PSNR, SSIM
    quality_inputs.py  prompts, image folders, reference stats, Inception/CLIP weights
    quality_run.py     --quality flow: generate sets, score, gate, protocol window
    quality_report.py  image grids, quality table (terminal, Markdown)
    protocol.py        --protocol mlperf-sdxl: settings, window, Offline/Server scenarios

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
