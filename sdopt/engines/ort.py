"""ONNX Runtime set-up shared by export (verification, the saved optimised graph), runtime and benchmarks.

`session_options` is the one place sessions are configured; `save_optimized` and `cpu_target`
write and match ONNX Runtime's optimised CPU graph, which the exporter saves and the runtime loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdopt.hardware import cpu_flags

# CPU features MLAS picks kernels and NCHWc block sizes by; an optimised graph saved on one
# of these feature sets may not run (or not run well) on another.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def session_options(
    threads: int | None = None, level: Any = None, parallel: bool = False, mem_arena: bool = True
) -> Any:
    """`onnxruntime.SessionOptions` as sdopt uses them: quiet, one graph at a time, full optimisation.

    Args:
        threads: intra-op threads; None leaves ONNX Runtime's default (one per core).
        level: a `GraphOptimizationLevel`; None: ORT_ENABLE_ALL.
        parallel: run independent nodes concurrently (2 inter-op threads) instead of in sequence.
        mem_arena: keep ONNX Runtime's CPU memory arena (its default).
    Returns:
        A fresh SessionOptions.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level is None else level
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 2 if parallel else 1
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = mem_arena
    return options


def cpu_target() -> str:
    """onnxruntime version + this CPU's instruction-set flags: where a saved optimised graph fits.

    Returns:
        e.g. "onnxruntime-1.20.1:avx2,fma,avx512f".
    """
    import onnxruntime as ort

    flags = cpu_flags()
    return f"onnxruntime-{ort.__version__}:" + ",".join(f for f in ISA_FLAGS if f in flags)


def save_optimized(src: Path, dst: Path) -> None:
    """Run ONNX Runtime's full CPU graph optimisation once and save the result (weights in
    `<dst>.data`); creating a session from it skips the optimisation (~10-25 s on sd15).

    Args:
        src: the verified ONNX graph.
        dst: where the optimised graph goes (its weights next to it, `<dst name>.data`).
    """
    import onnxruntime as ort

    options = session_options()
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


__all__ = ["ISA_FLAGS", "cpu_target", "save_optimized", "session_options"]
