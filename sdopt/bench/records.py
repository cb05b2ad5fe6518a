"""The harness's records: the job every backend runs, one backend's raw measurements, its summary row.

Job           what each worker runs (sent to workers as JSON; recorded under "job" in results.json)
BackendRun    one backend's raw measurements, filled in while the benchmark runs (parent side)
BackendStats  one backend's row of results.json (see benchmarks/README.md for the schema)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdopt.bench.config import BenchConfig
    from sdopt.bench.process import WorkerProcess
    from sdopt.manifest import Manifest

STAGE_NAMES = ("text_encoder", "unet", "vae_decoder")


@dataclass
class Job:
    """One image batch's settings, the same for every backend (torch gets the same initial latents)."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    height: int
    width: int
    batch: int
    seed: int
    scheduler: str
    threads: int
    latent_shape: list[int]
    deepcache: int = 3
    # ControlNet job (sdopt.bench.control): the artifact's ControlNet names, NAME=SRC each for torch,
    # the conditioning scale, and the control image file both workers read
    controlnet: list[str] = field(default_factory=list)
    control_sources: list[str] = field(default_factory=list)
    control_scale: float = 1.0
    control_image: str | None = None
    control_image_source: str | None = None  # what it was made from: the seeded edge map, or --control-image
    build_engines: bool = False  # TensorRT: build missing engines (only into the harness's own cached export)
    fault: str | None = None  # tests only: "load" | "run" | "crash", see workers.FaultInjected
    fault_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The wire format for workers (every field)."""
        return dataclasses.asdict(self)

    def record(self) -> dict[str, Any]:
        """What results.json keeps: every field but the test-only fault injection; the control image by file name
        (it sits in the results folder)."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("fault", "fault_after")}
        if self.control_image:
            out["control_image"] = Path(self.control_image).name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def make_job(config: BenchConfig, manifest: Manifest, artifact: Path, threads: int) -> Job:
    """The job for `config` on this artifact: its default size and scheduler where the config leaves them open.

    Args:
        config: the validated benchmark config.
        manifest: the artifact's manifest.
        artifact: the artifact folder (its scheduler config is read).
        threads: CPU threads per backend.

    Returns:
        The Job every backend runs.
    """
    from sdopt.runtime.pipeline import default_scheduler_name

    height = config.height or manifest.image.default_height
    width = config.width or manifest.image.default_width
    scheduler_config = json.loads((artifact / manifest.scheduler_config).read_text())
    scheduler = config.scheduler or default_scheduler_name(scheduler_config)
    scale = manifest.vae.scale
    return Job(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        steps=config.steps,
        guidance=float(config.guidance),
        height=height,
        width=width,
        batch=config.batch,
        seed=config.seed,
        scheduler=scheduler,
        threads=threads,
        deepcache=config.deepcache,
        latent_shape=[config.batch, manifest.vae.latent_channels, height // scale, width // scale],
    )


@dataclass
class BackendRun:
    """One backend's raw measurements, filled in as the benchmark goes."""

    name: str
    status: str = "pending"  # ok | failed | skipped
    error: str | None = None
    failed_at: str | None = None  # load | warmup N | run N | finish | quality
    info: dict[str, Any] = field(default_factory=dict)
    spawn_to_ready_s: float | None = None
    first_image_s: float | None = None
    warmup: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    rss_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    image_path: str | None = None
    unet_flops_per_call: int | None = None
    log: str | None = None
    worker: WorkerProcess | None = None
    quality_dir: str | None = None  # --quality: the folder of this backend's N images
    quality_seconds: list[float] = field(default_factory=list)  # --quality: seconds per generated image

    def fail(self, where: str, error: str) -> None:
        self.status, self.failed_at, self.error = "failed", where, error

    def absorb_memory(self, reply: dict[str, Any]) -> None:
        for key in ("rss_peak_bytes", "device_peak_bytes"):
            if reply.get(key) is not None:
                setattr(self, key, max(getattr(self, key) or 0, int(reply[key])))


def run_entry(reply: dict[str, Any], stage_names: tuple[str, ...] = STAGE_NAMES) -> dict[str, Any]:
    """One measured run as recorded under "runs": end to end, per stage, U-Net calls, the rest.

    Args:
        reply: the worker's answer to "run".
        stage_names: the job's stages (`sdopt.bench.control.stage_names`: ControlNet jobs add "controlnet").
    Returns:
        The run's entry.
    """
    stages = {s: float(reply["stages"].get(s, 0.0)) for s in stage_names}
    calls = int(reply.get("calls", {}).get("unet", 0))
    return {
        "e2e_s": float(reply["e2e_s"]),
        "stages_s": stages,
        "unet_calls": calls,
        "unet_per_step_s": stages["unet"] / calls if calls else None,
        "other_s": max(0.0, float(reply["e2e_s"]) - sum(stages.values())),
    }


@dataclass
class BackendStats:
    """One backend's row of results.json; `to_dict` is the JSON form (key order is the schema's)."""

    name: str
    status: str
    error: str | None = None
    failed_at: str | None = None
    provider: str | None = None
    device: str | None = None
    device_name: str | None = None
    precision: str | None = None
    engine: str | None = None
    e2e_s: dict[str, Any] | None = None
    stages_s: dict[str, Any] | None = None
    images_per_s: float | None = None
    cold_start: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    unet_throughput: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    warmup_runs: list[dict[str, Any]] = field(default_factory=list)
    log: str | None = None
    speedup_vs_torch: dict[str, float | None] | None = None
    quality: dict[str, Any] | None = None  # --quality only (sdopt.bench.quality)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["quality"] is None:
            del out["quality"]
        return out
