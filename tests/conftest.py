"""Session-wide fixtures: each tiny preset is exported once per test session, on demand."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import pytest

FAMILY_PRESETS = {"sd1": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}

_artifacts: dict[tuple[str, str], Path] = {}
_references: dict[str, object] = {}


@pytest.fixture(autouse=True, scope="session")
def _quiet_diffusers():
    """diffusers logs every ignored config key; tests share configs across classes on purpose."""
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Callable[..., Path]:
    """tiny_artifact(preset="tiny", precision="fp32") -> folder of its verified export."""
    from sdopt.export.artifact import ExportOptions, export_artifact

    def get(preset: str = "tiny", precision: str = "fp32") -> Path:
        key = (preset, precision)
        if key not in _artifacts:
            out = tmp_path_factory.mktemp("artifacts") / f"{preset}-{precision}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _artifacts[key] = export_artifact(f"synthetic:{preset}", out, ExportOptions(precision=precision)).out
        return _artifacts[key]

    return get


@pytest.fixture(scope="session")
def reference_pipeline() -> Callable[[str], object]:
    """reference_pipeline(preset) -> the diffusers pipeline the artifact was exported from
    (same seeded weights). Shared: tests that swap its scheduler must restore it."""
    from sdopt.export.synthetic import build_pipeline

    def get(preset: str = "tiny"):
        if preset not in _references:
            _references[preset] = build_pipeline(preset)
        return _references[preset]

    return get
