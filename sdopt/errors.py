"""One exception type for every user-facing failure: a problem and the fix, on one line."""

from __future__ import annotations


class SdoptError(Exception):
    """A failure the user can act on. The CLI prints `error: <problem> (<fix>)` and exits 2."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class EnginesMissingError(SdoptError):
    """The artifact has no TensorRT engine this host can load (none built, or only for another GPU or
    TensorRT version): `sdopt build` would fix it. Callers that build on demand catch this type."""


class NoGpuError(SdoptError):
    """This host has no usable NVIDIA GPU: no device, or no NVIDIA driver loaded at all. A driver that is
    present but too old for the CUDA of the installed wheels is a plain `SdoptError`, not this."""
