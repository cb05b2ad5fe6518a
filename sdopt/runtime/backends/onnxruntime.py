"""ONNX Runtime backend: CPU execution provider, or CUDA (onnxruntime-gpu) with IO binding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sdopt.errors import SdoptError
from sdopt.manifest import Manifest


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's FMA units, so more threads do not pay)."""
    try:
        seen = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    seen.add((phys, core))
        if seen:
            return len(seen)
    except OSError:
        pass
    return os.cpu_count() or 1


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
        try:
            session = ort.InferenceSession(str(self.root / spec.path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - corrupt or foreign graph: one readable line
            raise SdoptError(f"ONNX Runtime could not load {spec.path}: {str(e).splitlines()[0][:300]}",
                             "re-export the artifact with `sdopt export --force`") from None
        return OnnxRuntimeSession(session, self.device)
