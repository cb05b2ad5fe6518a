"""Before any heavy work: what to run, where the artifact comes from, and every check that needs no model.

`plan` validates the config, finds which backends this machine has and checks the image size
against the preset or the artifact's manifest; `ensure_artifact` then reuses the cached export or
exports once into the cache.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sdopt import __version__
from sdopt.bench.config import DEFAULT_MODEL, BenchConfig, benchmarks_dir, validate
from sdopt.bench.machine import has_gpu, physical_cores
from sdopt.errors import SdoptError
from sdopt.manifest import MANIFEST_NAME, ImageSpec, load_manifest
from sdopt.optimum_layout import is_optimum_folder

Log = Callable[[str], None]


# -- where the artifact comes from ---------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "sdopt" / "artifacts"


def is_artifact(path: str) -> bool:
    """An sdopt artifact, or a folder written by `optimum-cli export onnx` (read as one)."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / MANIFEST_NAME).is_file() or is_optimum_folder(p))


def export_settings(model: str, config: BenchConfig) -> dict[str, Any]:
    """What the cached export depends on: the model, the export options, the sdopt version."""
    if not model.startswith("synthetic:") and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    options: dict[str, Any] = {"precision": config.precision, "max_batch": max(4, config.batch)}
    if config.controlnet:  # only when given: exports without a ControlNet keep their cache keys
        options["controlnets"] = list(config.controlnet)
    return {"model": model, "options": options, "sdopt": __version__}


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def preset_image_limits(model: str) -> ImageSpec | None:
    """Size limits of a synthetic preset, known without building it (None for other models)."""
    if not model.startswith("synthetic:"):
        return None
    from sdopt.export.synthetic import load_preset

    preset = load_preset(model[len("synthetic:") :])
    lo, hi = preset["size_range"]
    vae_levels, unet_levels = len(preset["vae"]["block_out_channels"]), len(preset["unet"]["block_out_channels"])
    multiple = 2 ** (vae_levels - 1) * 2 ** (unet_levels - 1)
    default = preset["default_size"]
    return ImageSpec(lo, hi, multiple, default, default, max_batch=None)


def check_image(config: BenchConfig, spec: ImageSpec, where: str) -> None:
    """The job's size and batch against what a model or artifact accepts: `ImageSpec.check`, the one
    size rule (a size the job leaves to the model is its default, which always passes)."""
    height, width = config.height or spec.default_height, config.width or spec.default_width
    spec.check(height, width, config.batch, flag="--", where=where)


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run here (None if it may). Cheap: no heavy import."""

    def missing(*modules: str) -> list[str]:
        return [m for m in modules if importlib.util.find_spec(m) is None]

    if backend in ("torch", "torch-compile"):
        gone = missing("torch", "diffusers", "transformers")
        return f"{', '.join(gone)} not installed (pip install 'sdopt[bench]')" if gone else None
    if backend in ("onnxruntime", "onnxruntime-fast"):
        return None if not missing("onnxruntime") else "onnxruntime not installed (pip install onnxruntime)"
    if backend == "tensorrt":
        if missing("tensorrt"):
            return (
                "tensorrt not installed (pip install 'sdopt[tensorrt-cu12]' or 'sdopt[tensorrt-cu13]' "
                "on a host with an NVIDIA GPU)"
            )
        if not has_gpu():
            return "no NVIDIA GPU found (nvidia-smi lists none)"
        return None
    return f"unknown backend {backend!r}"


@dataclass
class Plan:
    config: BenchConfig
    backends: list[str]
    skipped: dict[str, str]
    artifact: Path | None  # given artifact folder, or None: export/cache `model`
    model: str
    cache_dir: Path
    threads: int


def plan(config: BenchConfig, cache_dir: Path | None = None) -> Plan:
    """Every check that needs no model loaded and no export. Raises SdoptError."""
    validate(config)
    wanted = config.backend_list()
    skipped = {b: r for b in wanted if (r := unavailable_reason(b)) is not None}
    runnable = [b for b in wanted if b not in skipped]
    if not runnable:
        raise SdoptError(
            "no requested backend can run here: " + "; ".join(f"{b}: {r}" for b, r in skipped.items()),
            "install what is missing, or choose other --backends (e.g. torch,onnxruntime)",
        )
    model = config.model or DEFAULT_MODEL
    artifact = None
    if is_artifact(model):
        artifact = Path(model).expanduser().resolve()
        _check_artifact(config, artifact, runnable, skipped)
    else:
        if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "model_index.json").is_file():
            raise SdoptError(
                f"{model} is neither an sdopt artifact (no {MANIFEST_NAME}) nor a diffusers model folder",
                "pass a folder written by `sdopt export`, a model id, or e.g. synthetic:tiny",
            )
        limits = preset_image_limits(model)
        if limits:
            check_image(config, limits, f"{model}'s")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return Plan(config, runnable, skipped, artifact, model, cache, config.threads or physical_cores())


def _check_artifact(config: BenchConfig, artifact: Path, runnable: list[str], skipped: dict[str, str]) -> None:
    """Size, batch and precision against the artifact's manifest; an Optimum export skips the torch backends."""
    m = load_manifest(artifact)
    check_image(config, m.image, f"the artifact {artifact.name}'s")
    if m.source.get("kind") == "optimum":  # no PyTorch weights to run the torch backends on
        for b in [b for b in runnable if b.startswith("torch")]:
            skipped[b] = "an Optimum ONNX export has no PyTorch weights (benchmark the diffusers model for torch)"
            runnable.remove(b)
        if not runnable:
            raise SdoptError(
                "no requested backend can run an Optimum ONNX export", "use --backends onnxruntime (or tensorrt)"
            )
    if config.controlnet:  # before any worker starts: the artifact must hold the ControlNets asked for
        from sdopt.bench.control import artifact_controlnets

        artifact_controlnets(config.controlnet, m, f"the artifact {artifact}")
    if config.precision != "fp32" and config.precision != m.precision:
        raise SdoptError(
            f"--precision {config.precision} but the artifact is {m.precision}",
            "leave --precision out when benchmarking an artifact folder",
        )


def ensure_artifact(p: Plan, log: Log) -> tuple[Path, dict[str, Any]]:
    """The artifact folder to benchmark: the given one, the cached export, or a fresh export."""
    if p.artifact is not None:
        return p.artifact, {"path": str(p.artifact), "given": True, "cached": None, "cache_key": None}
    settings = export_settings(p.model, p.config)
    key = cache_key(settings)
    out = p.cache_dir / key
    info = {"path": str(out), "given": False, "cache_key": key, "export_settings": settings}
    if (out / MANIFEST_NAME).is_file():
        try:
            load_manifest(out)
            log(f"using cached export of {p.model}: {out}")
            return out, {**info, "cached": True, "export_seconds": None}
        except SdoptError as e:
            log(f"cached export {out} is unusable ({e.problem}); exporting again")
    with_cn = f" with ControlNet {', '.join(p.config.controlnet)}" if p.config.controlnet else ""
    log(f"exporting {p.model} ({p.config.precision}){with_cn} to the cache {out} (once; later runs reuse it)")
    from sdopt.export.artifact import ExportOptions, export_artifact

    options = ExportOptions(
        precision=p.config.precision,
        max_batch=max(4, p.config.batch),
        force=True,
        controlnets=list(p.config.controlnet),
    )
    result = export_artifact(p.model, out, options)
    seconds = result.seconds
    del result
    gc.collect()
    log(f"exported in {seconds:.1f} s")
    return out, {**info, "cached": False, "export_seconds": seconds}


def default_out_dir(config: BenchConfig) -> Path:
    label = config.name or Path(config.model or DEFAULT_MODEL).name or "bench"
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "bench"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return benchmarks_dir() / "results" / f"{label}-{stamp}"
