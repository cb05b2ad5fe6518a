"""One exception type for every user-facing failure: a problem and the fix, on one line."""

from __future__ import annotations


class SdoptError(Exception):
    """A failure the user can act on. The CLI prints `error: <problem> (<fix>)` and exits 2."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


def check_image_size(height: int, width: int, multiple: int = 8) -> None:
    """Sizes must be multiples of the VAE/U-Net downsampling; odd sizes fail deep inside ORT."""
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise SdoptError(
                f"{name} {value} is not a positive multiple of {multiple}",
                f"use e.g. {max(multiple, round(value / multiple) * multiple)}",
            )


class EnginesMissingError(SdoptError):
    """The artifact has no TensorRT engine this host can load (none built, or only for another GPU or
    TensorRT version): `sdopt build` would fix it. Callers that build on demand catch this type."""


class NoGpuError(SdoptError):
    """This host has no usable NVIDIA GPU: no device, or no NVIDIA driver loaded at all. A driver that is
    present but too old for the CUDA of the installed wheels is a plain `SdoptError`, not this."""
