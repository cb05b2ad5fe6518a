"""The runtime side of the harness: sdopt's numpy pipeline over ONNX Runtime (exact or fast mode) or TensorRT."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from sdopt.bench.records import Job
from sdopt.bench.worker_support import Timers, describe, initial_latents, stage_of


class RuntimeWorker:
    """sdopt's numpy pipeline over ONNX Runtime (CPU, or CUDA where onnxruntime-gpu has a GPU) or TensorRT."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def load(self, artifact: str, job: Job) -> dict[str, Any]:
        t0 = time.perf_counter()
        from sdopt.errors import SdoptError
        from sdopt.runtime.pipeline import Pipeline

        provider, options, engine = self._provider(job)
        options["controlnet"] = bool(job.controlnet)  # a plain job on a ControlNet artifact: the plain U-Net
        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # Hash verification (Pipeline.load's default, ~1 s/GB) is left out of the cold start.
        build_s = None
        try:
            self.pipe = Pipeline.load(artifact, provider=provider, verify_hashes=False, **options)
        except SdoptError as e:
            if not (provider == "tensorrt" and job.build_engines and _needs_engines(e)):
                raise
            build_s = _build_engines(artifact, job)  # the harness's own cached export: build once, like the export
            t0 = time.perf_counter()
            self.pipe = Pipeline.load(artifact, provider=provider, verify_hashes=False, **options)
        self.timers = Timers()
        for name, session in list(self.pipe.sessions.items()):
            self.pipe.sessions[name] = _TimedSession(session, self.timers.wrap(stage_of(name), session.run))
        self.latents = initial_latents(job)
        self.job = job
        self.control = _control_kwargs(job)
        self.provider = provider
        if provider == "tensorrt":
            try:
                import tensorrt

                engine = f"tensorrt {tensorrt.__version__}"
            except ImportError:  # pragma: no cover - the load above would have failed
                pass
        return {
            "import_s": import_s,
            "load_s": time.perf_counter() - t0,
            "device": "cpu" if provider == "cpu" else "cuda",
            "precision": self.pipe.manifest.precision,
            "provider": provider,
            "engine": engine,
            "device_name": None,
            "engine_build_s": build_s,
        }

    def _provider(self, job: Job) -> tuple[str, dict[str, Any], str]:
        if not self.backend.startswith("onnxruntime"):
            return "tensorrt", {}, "tensorrt"
        import onnxruntime as ort

        from sdopt.bench.machine import has_gpu

        provider = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() and has_gpu() else "cpu"
        return provider, {"threads": job.threads}, f"onnxruntime {ort.__version__}"

    def run(self) -> tuple[Any, dict[str, float], dict[str, int]]:
        """The job once, with the shared latents: (images NHWC on [0, 1], seconds per stage, calls per stage)."""
        job = self.job
        return self.generate(job.prompt, job.negative_prompt, self.latents)

    def generate(self, prompt: str, negative_prompt: str | None, latents: Any) -> tuple[Any, dict, dict]:
        """One call of the pipeline with these latents (their batch is the number of images)."""
        job = self.job
        self.timers.reset()
        out = self.pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            height=job.height,
            width=job.width,
            num_images_per_prompt=latents.shape[0],
            seed=job.seed,
            scheduler=job.scheduler,
            latents=latents,
            output_type="np",
            deepcache=job.deepcache if self.backend == "onnxruntime-fast" else 1,
            **self.control,
        )
        return out.images, dict(self.timers.seconds), dict(self.timers.calls)

    def device_peak_bytes(self) -> int | None:
        if self.provider == "cpu":
            return None
        from sdopt.bench.machine import gpu_process_memory

        return gpu_process_memory(os.getpid())

    def unet_flops(self) -> int | None:
        return None


def _control_kwargs(job: Job) -> dict[str, Any]:
    """The pipeline's ControlNet arguments for a ControlNet job (sdopt.bench.control), else none."""
    if not job.controlnet:
        return {}
    from sdopt.bench.control import control_images

    return {
        "control_image": control_images(job),
        "controlnet_conditioning_scale": job.control_scale,
        "controlnet": list(job.controlnet),
    }


class EngineBuildFailed(RuntimeError):
    """Building TensorRT engines failed: a failed row, not a skipped one."""


def _needs_engines(e: Exception) -> bool:
    """The artifact lacks engines for this GPU/TensorRT: `sdopt build` would fix it."""
    from sdopt.errors import EnginesMissingError

    return isinstance(e, EnginesMissingError)


def _build_engines(artifact: str, job: Job) -> float:
    """`sdopt build` for the benchmark's shape (dynamic profiles with opt = the job's batch and size)."""
    t0 = time.perf_counter()
    try:
        from sdopt.export.tensorrt_build import BuildOptions, build_engines
        from sdopt.manifest import load_manifest

        m, components = load_manifest(artifact), None
        if m.controlnet is not None and not job.controlnet:  # a plain job on a ControlNet artifact: plain U-Net
            components = m.controlnet.components_to_load(m.runtime_components(), controlnet=False)
        options = BuildOptions(batch=job.batch, height=job.height, width=job.width, components=components)
        build_engines(artifact, options)
    except Exception as e:  # noqa: BLE001
        raise EngineBuildFailed(f"building TensorRT engines failed: {describe(e)}") from e
    return time.perf_counter() - t0


class _TimedSession:
    def __init__(self, session: Any, run: Callable) -> None:
        self.session = session
        self.run = run
        self.input_names = session.input_names
        self.output_names = session.output_names
