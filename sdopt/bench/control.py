"""The ControlNet job of `sdopt bench` (issue 15): which ControlNets, the control image, its checks and its stage.

`--controlnet SRC[,SRC]` (config key "controlnet": a list) takes what `sdopt export --controlnet` takes
(`synthetic[:SEED]`, a ControlNet folder or hub id, `NAME=SRC`):

- a model id is exported with those ControlNets (the export cache key includes them: `plan.export_settings`);
- an artifact folder must hold them: each is matched by name (NAME=, or the name the export derives
  from SRC), else by the source it was exported from.

The parent writes the control image to `<out>/control.png` at the job's size (a seeded edge map, or
`--control-image PATH` resized with Lanczos), and both workers read that file: the two pipelines get the
same pixels. torch runs diffusers' StableDiffusion(XL)ControlNetPipeline with the ControlNets rebuilt from
the manifest's source records by the export's own loader (`sdopt.export.controlnet.load_controlnet`: the
same seeded weights); the runtime runs `Pipeline(control_image=...)`. The ControlNet calls are their own
stage ("controlnet") on both sides; the U-Net stage is the U-Net calls only.

Light: no torch at import time (the export's loader is imported inside the torch worker only).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdopt.bench.records import STAGE_NAMES
from sdopt.errors import SdoptError

if TYPE_CHECKING:
    import numpy as np

    from sdopt.bench.config import BenchConfig
    from sdopt.bench.records import Job
    from sdopt.manifest import Manifest

CONTROL_STAGE = "controlnet"
CONTROL_IMAGE = "control.png"  # in the results folder
# backend -> why it cannot run a ControlNet job
NO_CONTROL = {"onnxruntime-fast": "the runtime's fast mode (DeepCache) does not combine with ControlNet"}
REEXPORT = "export it with `sdopt export MODEL --controlnet SRC`, or pass the model id and let the harness export it"


def validate_control(config: BenchConfig) -> None:
    """The ControlNet options, without a model: sources given, scale, image file, backends. Raises SdoptError."""
    if not config.controlnet:
        if config.control_image is not None or config.control_scale != 1.0:
            raise SdoptError("--control-image / --control-scale only apply with --controlnet", "add --controlnet SRC")
        return
    if not isinstance(config.controlnet, list) or not all(isinstance(s, str) and s.strip() for s in config.controlnet):
        raise SdoptError(f"controlnet {config.controlnet!r} is not a list of sources", 'use e.g. ["synthetic"]')
    scale = config.control_scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale < 0:
        raise SdoptError(f"--control-scale must be a number >= 0, got {scale!r}", "use e.g. --control-scale 1.0")
    if config.control_image is not None and not Path(config.control_image).expanduser().is_file():
        raise SdoptError(f"--control-image {config.control_image}: no such file", "pass an existing image file")
    if config.quality:
        raise SdoptError("--quality does not combine with --controlnet", "benchmark ControlNet without --quality")
    for backend in config.backend_list():
        if backend in NO_CONTROL:
            flag = "--no-fast" if backend == "onnxruntime-fast" else f"--backends without {backend}"
            raise SdoptError(f"{backend} cannot run a ControlNet job: {NO_CONTROL[backend]}", f"use {flag}")


def artifact_controlnets(specs: list[str], manifest: Manifest, where: str) -> list[str]:
    """The names, in `manifest`, of the ControlNets `specs` ask for. Raises SdoptError when one is missing.

    Args:
        specs: the --controlnet values (SRC or NAME=SRC).
        manifest: the artifact's manifest.
        where: the artifact, as the error names it.
    Returns:
        The artifact's ControlNet names, in the order given.
    """
    section = manifest.controlnet
    if section is None:
        raise SdoptError(f"--controlnet given but {where} was exported without a ControlNet", REEXPORT)
    names = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        candidates = [name] if sep else [spec, spec.replace(":", "-"), Path(spec.rstrip("/")).name]
        match = next((c.name for c in section.controlnets if c.name in candidates), None)
        if match is None and not sep:
            match = next((c.name for c in section.controlnets if c.source.get("id") == spec), None)
        if match is None:
            have = ", ".join(c.name for c in section.controlnets)
            problem = f"{where} has no ControlNet {spec!r} (it has: {have})"
            raise SdoptError(problem, f"pick one of those, or {REEXPORT}")
        names.append(match)
    return names


def prepare_job(job: Job, config: BenchConfig, manifest: Manifest, out: Path, where: str) -> None:
    """Fill in `job`'s ControlNet part (its control image: `out`/control.png, written by `write_control_image`).

    Args:
        job: the job (changed in place).
        config: the benchmark config (its controlnet, control_image, control_scale).
        manifest: the artifact's manifest.
        out: the results folder (need not exist yet).
        where: the artifact, as errors name it.
    Raises:
        SdoptError: a ControlNet the artifact lacks, or a --control-image that is not a readable image.
    """
    job.controlnet = artifact_controlnets(config.controlnet, manifest, where)
    job.control_sources = torch_sources(manifest, job.controlnet)
    job.control_scale = float(config.control_scale)
    render_control_image(config, job.height, job.width)  # an unreadable --control-image fails before any work
    job.control_image = str(Path(out) / CONTROL_IMAGE)
    given = config.control_image
    job.control_image_source = f"{given}, resized (Lanczos)" if given else f"seeded edge map, seed {config.seed}"


def torch_sources(manifest: Manifest, names: list[str]) -> list[str]:
    """`NAME=SRC` per ControlNet for the torch worker: what rebuilds the exported weights.

    Args:
        manifest: the artifact's manifest (its ControlNet section records each source).
        names: the ControlNets of the job.
    Returns:
        One `NAME=SRC` each; a synthetic ControlNet carries its seed (`synthetic:SEED`).
    """
    assert manifest.controlnet is not None
    out = []
    for name in names:
        spec = manifest.controlnet.get(name)
        assert spec is not None
        src = spec.source
        source = f"synthetic:{src['seed']}" if src.get("kind") == "synthetic" else src["id"]
        out.append(f"{name}={source}")
    return out


def edge_map(height: int, width: int, seed: int) -> np.ndarray:
    """A seeded synthetic edge map (white lines and a circle on black, RGB uint8), like a Canny ControlNet's input."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = (int(v) for v in rng.integers(24, 64, size=2))
    cy, cx = (float(v) for v in rng.uniform(0.3, 0.7, size=2))
    y, x = np.mgrid[0:height, 0:width]
    radius = min(height, width) / 3
    ring = np.abs(np.hypot(x - cx * width, y - cy * height) - radius) < 1.5
    edges = ((x + y) % a < 2) | ((x - y) % b < 2) | ring
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2)


def render_control_image(config: BenchConfig, height: int, width: int) -> Any:
    """The job's control image at its output size (PIL RGB): --control-image resized (Lanczos), else `edge_map`."""
    from PIL import Image

    if config.control_image is None:
        return Image.fromarray(edge_map(height, width, config.seed))
    try:
        with Image.open(Path(config.control_image).expanduser()) as src:
            return src.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    except OSError as e:
        problem = f"--control-image {config.control_image} is not a readable image ({e})"
        raise SdoptError(problem, "pass a PNG or JPEG file") from e


def write_control_image(config: BenchConfig, job: Job, out: Path) -> None:
    """A ControlNet job's control image as `out`/control.png, the file both workers read (nothing for a plain job)."""
    if job.controlnet:
        render_control_image(config, job.height, job.width).save(Path(out) / CONTROL_IMAGE)


def control_images(job: Job) -> Any:
    """What both workers pass as the control image: the job's control.png as an RGB PIL image, one per ControlNet
    when there are several (diffusers' MultiControlNet and the runtime both take a list then)."""
    from PIL import Image

    with Image.open(str(job.control_image)) as f:
        image = f.convert("RGB")
    return image if len(job.controlnet) == 1 else [image] * len(job.controlnet)


def stage_names(job: Job | dict[str, Any]) -> tuple[str, ...]:
    """The timed stages of a job, in pipeline order: the ControlNet stage only for a ControlNet job."""
    control = job.get("controlnet") if isinstance(job, dict) else job.controlnet
    return ("text_encoder", CONTROL_STAGE, "unet", "vae_decoder") if control else STAGE_NAMES


def terminal_note(results: dict[str, Any]) -> str | None:
    """One line under the terminal table for a ControlNet job: the ControlNet stage per backend (median)."""
    if not results["job"].get("controlnet"):
        return None
    ok = [b for b in results["backends"] if b["status"] == "ok"]
    cells = [f"{b['name']} {((b['stages_s'] or {}).get(CONTROL_STAGE) or {}).get('median', 0.0):.3f} s" for b in ok]
    return f"ControlNet {', '.join(results['job']['controlnet'])}: ControlNet stage (median) " + ", ".join(cells)


def markdown(results: dict[str, Any]) -> list[str]:
    """results.md's ControlNet part: the ControlNets, and seconds per stage per backend (medians)."""
    job = results["job"]
    if not job.get("controlnet"):
        return []
    stages = stage_names(job)
    ok = [b for b in results["backends"] if b["status"] == "ok"]
    lines = [
        f"ControlNet job: {', '.join(job['control_sources'])} (conditioning scale {job['control_scale']:g}), "
        f"control image `{CONTROL_IMAGE}` ({job['control_image_source']}).",
        "",
        "| seconds per image batch (median) | " + " | ".join(b["name"] for b in ok) + " |",
        "|---|" + "---:|" * len(ok),
    ]
    for stage in (*stages, "other"):
        cells = [(b["stages_s"] or {}).get(stage) for b in ok]
        lines.append(f"| {stage} | " + " | ".join("—" if not c else f"{c['median']:.3f}" for c in cells) + " |")
    lines.append("| end to end | " + " | ".join(f"{b['e2e_s']['median']:.3f}" for b in ok) + " |")
    return [*lines, ""]
