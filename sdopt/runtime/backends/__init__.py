"""Engine backends: one small protocol, implemented by ONNX Runtime and TensorRT.

The pipeline asks `open_backend(provider, ...)` for a backend once, then `backend.load(name)`
for each component's session, and calls `session.run(feeds)` with numpy arrays keyed by the
manifest's input names. Nothing else about an engine leaks into the pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError
from sdopt.manifest import Manifest
from sdopt.runtime.backends.base import Backend, EngineSession

PROVIDERS = ("cpu", "cuda", "tensorrt")


def open_backend(provider: str, root: Path, manifest: Manifest, **options: Any) -> Backend:
    """The backend for `provider`; imports its engine library only now."""
    if provider in ("cpu", "cuda"):
        from sdopt.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(root, manifest, device=provider, **options)
    if provider == "tensorrt":
        from sdopt.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(root, manifest, **options)
    raise SdoptError(f"unknown provider {provider!r}", f"choose one of: {', '.join(PROVIDERS)}")


__all__ = ["Backend", "EngineSession", "PROVIDERS", "open_backend"]
