"""ONNX Runtime backend: CPU execution provider, or CUDA (onnxruntime-gpu) with IO binding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sdopt.errors import SdoptError
from sdopt.manifest import Manifest


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


# CPU features MLAS picks kernels and NCHWc block sizes by; an optimised graph saved on one
# of these feature sets may not run (or not run well) on another.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_target() -> str:
    """onnxruntime version + this CPU's instruction-set flags: where a saved optimised graph fits."""
    import onnxruntime as ort

    flags = set(next((v.split() for k, v in cpuinfo_fields() if k == "flags"), []))
    return f"onnxruntime-{ort.__version__}:" + ",".join(f for f in _ISA_FLAGS if f in flags)


def save_optimized(src: Path, dst: Path) -> None:
    """Run ONNX Runtime's full CPU graph optimisation once and save the result (weights in
    `<dst>.data`); creating a session from it skips the optimisation (~10-25 s on sd15)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeSession:
    """One InferenceSession. ORT's `run` is thread-safe, so this one is too."""

    def __init__(self, session, device: str) -> None:
        self.session = session
        self.device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cpu":
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        # CUDA: bind inputs and outputs on the device so ORT makes no extra host copies.
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


class OnnxRuntimeBackend:
    def __init__(self, root: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SdoptError("onnxruntime is not installed", "pip install onnxruntime (or sdopt[gpu] for CUDA)") from None
        self.ort = ort
        self.root = Path(root)
        self.manifest = manifest
        self.device = device
        self.name = f"onnxruntime-{device}"
        self.threads = threads or physical_cores()
        self.cpu_target = cpu_target()
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SdoptError("provider 'cuda' needs onnxruntime-gpu and an NVIDIA GPU, which this install lacks",
                             "pip install 'sdopt[gpu]' on a CUDA host, or use --provider cpu")

    def load(self, component: str) -> OnnxRuntimeSession:
        ort = self.ort
        spec = self.manifest.components.get(component)
        if spec is None:
            raise SdoptError(f"the artifact has no {component}", "re-export with that component included")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        path = spec.path
        if self.device == "cpu" and spec.ort_cpu_path and spec.ort_cpu_target == self.cpu_target:
            path = spec.ort_cpu_path
        try:
            session = ort.InferenceSession(str(self.root / path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - corrupt or foreign graph: one readable line
            raise SdoptError(f"ONNX Runtime could not load {spec.path}: {str(e).splitlines()[0][:300]}",
                             "re-export the artifact with `sdopt export --force`") from None
        return OnnxRuntimeSession(session, self.device)
