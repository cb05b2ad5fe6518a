"""ONNX Runtime backend: CPU execution provider, or CUDA (onnxruntime-gpu) with IO binding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdopt.engines.ort import cpu_target, save_optimized, session_options
from sdopt.errors import SdoptError
from sdopt.hardware import cpuinfo_fields, physical_cores
from sdopt.manifest import Manifest

# Re-exported for callers that still import them from here (their home is sdopt.hardware / sdopt.engines.ort).
__all__ = [
    "OnnxRuntimeBackend",
    "OnnxRuntimeSession",
    "cpu_target",
    "cpuinfo_fields",
    "physical_cores",
    "save_optimized",
]


class OnnxRuntimeSession:
    """One InferenceSession. ORT's `run` is thread-safe, so this one is too."""

    def __init__(self, session: Any, device: str) -> None:
        self.session = session
        self.device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.keep_alive: list[Any] = []  # LoRA: initializer buffers the session uses in place

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cpu":
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        # CUDA: bind inputs and outputs on the device so ORT makes no extra host copies.
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))


class OnnxRuntimeBackend:
    def __init__(self, root: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SdoptError(
                "onnxruntime is not installed", "pip install onnxruntime (or sdopt[gpu] for CUDA)"
            ) from None
        self.ort = ort
        self.root = Path(root)
        self.manifest = manifest
        self.device = device
        self.name = f"onnxruntime-{device}"
        self.threads = threads or physical_cores()
        self.cpu_target = cpu_target()
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SdoptError(
                "provider 'cuda' needs onnxruntime-gpu and an NVIDIA GPU, which this install lacks",
                "pip install 'sdopt[gpu]' on a CUDA host, or use --provider cpu",
            )

    def load(self, component: str) -> OnnxRuntimeSession:
        return self.load_with_initializers(component)

    def optimised_graph(self, component: str) -> bool:
        """Whether `load` starts `component` from the saved ORT-optimised CPU graph."""
        spec = self.manifest.components[component]
        return bool(self.device == "cpu" and spec.ort_cpu_path and spec.ort_cpu_target == self.cpu_target)

    def load_with_initializers(
        self, component: str, initializers: dict[str, np.ndarray] | None = None, optimised: bool = False
    ) -> OnnxRuntimeSession:
        """A session whose named initializers are replaced (LoRA-merged weights, see
        sdopt/runtime/lora_swap.py), given in the names and layouts of the saved optimised
        graph (`optimised`, only where `optimised_graph` is true) or of model.onnx."""
        ort = self.ort
        spec = self.manifest.components.get(component)
        if spec is None:
            raise SdoptError(f"the artifact has no {component}", "re-export with that component included")
        options = session_options(self.threads)
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        path = spec.path
        if self.optimised_graph(component) and (optimised or not initializers):
            path = str(spec.ort_cpu_path)
        model: str | bytes = str(self.root / path)
        keep: list = []  # LoRA: buffers ORT uses in place, alive as long as the session
        if initializers:
            from sdopt.runtime.lora_swap import ort_model_with

            model, keep = ort_model_with(ort, options, self.root / path, initializers, path == spec.ort_cpu_path)
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception as e:  # noqa: BLE001 - corrupt or foreign graph: one readable line
            raise SdoptError(
                f"ONNX Runtime could not load {spec.path}: {str(e).splitlines()[0][:300]}",
                "re-export the artifact with `sdopt export --force`",
            ) from e
        wrapped = OnnxRuntimeSession(session, self.device)
        wrapped.keep_alive = keep
        return wrapped
