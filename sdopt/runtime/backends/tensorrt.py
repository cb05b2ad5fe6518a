"""TensorRT backend: serialized engines (`sdopt build`) run through one execution context each.

Written against the documented Python APIs of TensorRT 10.x/11.x and cuda-python 12/13; it has
not been executed on a GPU in this repository's CI. The module is split by concern:

- `tensorrt_checks`: the pure checks run before TensorRT sees an engine (manifest `EngineEntry`
  vs this host's TensorRT and GPU, the input shapes vs the engine's profile);
- `tensorrt_session`: one engine at run time (execution context, stream, pinned buffers, CUDA graphs);
- this module: the backend that selects, verifies and deserializes each component's engine.

Shared TensorRT/CUDA helpers live in `sdopt.engines` and GPU facts in `sdopt.hardware`; the
names below are re-exported for callers that imported them from here.
"""

from __future__ import annotations

from pathlib import Path

from sdopt.engines.cuda import INSTALL_FIX, cuda_check, import_cudart
from sdopt.engines.trt import import_tensorrt, refit_engine, trt_logger, version_tuple
from sdopt.errors import SdoptError
from sdopt.hardware import GpuFacts, gpu_facts, parse_nvidia_smi
from sdopt.manifest import EngineEntry, Manifest, sha256_file
from sdopt.runtime.backends.tensorrt_checks import (
    ACTIVE_PROFILE,
    check_engine_compatible,
    check_host_code,
    check_shapes,
    embeds_host_code,
    numpy_dtype,
    rebuild_fix,
    select_engine,
)
from sdopt.runtime.backends.tensorrt_session import CudaGraphWarning, TensorRTSession


class TensorRTBackend:
    """Loads each component's engine for this GPU; `use_cuda_graph` replays captured enqueues.

    Args:
        root: the artifact folder.
        manifest: its manifest.
        use_cuda_graph: capture each component's enqueue per input shape and replay it.
        allow_host_code: trust engines that embed host code (version-compatible builds).
        device: CUDA device ordinal.
    """

    name = "tensorrt"

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        use_cuda_graph: bool = False,
        allow_host_code: bool = False,
        device: int = 0,
    ) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.use_cuda_graph = use_cuda_graph
        self.allow_host_code = allow_host_code
        self.device = device
        self.trt = import_tensorrt(lean_ok=True)
        self.lean = self.trt.__name__ == "tensorrt_lean"
        self.cudart = import_cudart()
        self.gpu = gpu_facts(device)  # names a missing GPU or an old driver before any other CUDA call
        cuda_check(self.cudart, self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self.trt_version = self.trt.__version__
        self.runtime = self.trt.Runtime(trt_logger(self.trt))
        self.entries: dict[str, EngineEntry] = {}

    def check_shapes(self, component: str, feeds_shapes: dict[str, tuple[int, ...]]) -> None:
        check_shapes(self.entries[component], feeds_shapes, self.root)

    def load(self, component: str) -> TensorRTSession:
        """The session of `component`'s engine for this GPU and TensorRT (raises SdoptError on mismatch)."""
        if component not in self.manifest.components:
            raise SdoptError(f"the artifact has no {component}", "re-export with that component included")
        entry = select_engine(
            self.manifest,
            component,
            self.trt_version,
            self.gpu.name,
            self.gpu.compute_capability,
            self.root,
            self.lean,
        )
        check_host_code(entry, self.allow_host_code, self.root)
        path = self.root / entry.path
        if not path.is_file() or sha256_file(path) != entry.sha256:
            raise SdoptError(f"{path} is missing or does not match its sha256 in the manifest", rebuild_fix(self.root))
        if embeds_host_code(entry):
            self.runtime.engine_host_code_allowed = True  # trusted by the caller (check_host_code)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise SdoptError(
                f"TensorRT {self.trt_version} could not deserialize {path} (see its log above)", rebuild_fix(self.root)
            )
        self.entries[component] = entry
        return TensorRTSession(self, component, engine)


__all__ = [
    "ACTIVE_PROFILE",
    "CudaGraphWarning",
    "GpuFacts",
    "INSTALL_FIX",
    "TensorRTBackend",
    "TensorRTSession",
    "check_engine_compatible",
    "check_host_code",
    "check_shapes",
    "cuda_check",
    "gpu_facts",
    "import_cudart",
    "import_tensorrt",
    "numpy_dtype",
    "parse_nvidia_smi",
    "refit_engine",
    "rebuild_fix",
    "select_engine",
    "trt_logger",
    "version_tuple",
]
