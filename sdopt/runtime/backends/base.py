"""The backend protocol the pipeline is written against."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class EngineSession(Protocol):
    """One loaded component (text encoder, U-Net, VAE ...), created once per pipeline.

    `run` takes numpy arrays keyed by input name (already in the manifest's dtypes) and
    returns numpy arrays keyed by output name, on the host. A session must be safe to call
    from several threads at once, or serialise calls itself.
    """

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str  # "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"

    def load(self, component: str) -> EngineSession:
        """Create the session of one manifest component (raises SdoptError on mismatch)."""
        ...
