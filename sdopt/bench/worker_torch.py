"""The torch side of the harness: diffusers eager (the reference), or torch.compile on U-Net and VAE decoder."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sdopt.bench.records import Job
from sdopt.bench.worker_support import Timers, initial_latents


class TorchWorker:
    """diffusers, eager (the reference) or with torch.compile on the U-Net and VAE decoder."""

    def __init__(self, backend: str) -> None:
        self.compile = backend == "torch-compile"
        self.unet_args: tuple[tuple, dict] | None = None

    def load(self, artifact: str, job: Job) -> dict[str, Any]:
        t0 = time.perf_counter()
        import diffusers
        import torch

        from sdopt.export.sources import load_model
        from sdopt.manifest import load_manifest
        from sdopt.runtime.schedulers import DIFFUSERS_CLASS_NAMES, scheduler_overrides

        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.set_num_threads(job.threads)
        self.torch = torch
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        manifest = load_manifest(artifact)
        model = load_model(manifest.source["id"], seed=int(manifest.source.get("seed", 0)))
        pipe = model.pipe if not job.controlnet else _controlnet_pipeline(model.pipe, manifest.family, job)
        # fp16 artifacts are compared with fp16 torch on the GPU; the CPU has no fast fp16, so fp32 there.
        self.dtype = torch.float16 if cuda and manifest.precision == "fp16" else torch.float32
        pipe.to(self.device, self.dtype)
        pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASS_NAMES[job.scheduler]).from_config(
            pipe.scheduler.config, **scheduler_overrides(job.scheduler)
        )
        self.timers = Timers(torch.cuda.synchronize if cuda else None)
        self._instrument(pipe)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.latents = initial_latents(job)
        self.job = job
        if job.controlnet:
            from sdopt.bench.control import control_images

            self.control_image = control_images(job)
        return {
            "import_s": import_s,
            "load_s": time.perf_counter() - t0,
            "device": self.device,
            "precision": "fp16" if self.dtype == torch.float16 else "fp32",
            "provider": f"torch-{self.device}" + ("+inductor" if self.compile else ""),
            "engine": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
            "device_name": torch.cuda.get_device_name() if cuda else None,
        }

    def _instrument(self, pipe: Any) -> None:
        """Time every component call; torch.compile the U-Net and VAE decoder for torch-compile."""
        unet, decode = pipe.unet, pipe.vae.decode
        if self.compile:
            unet = self.torch.compile(unet)
            decode = self.torch.compile(decode)
        self.unet_module = pipe.unet  # the eager module (FLOP counting)
        # Proxies time each call; object.__setattr__ keeps diffusers from re-registering components.
        for attr in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, attr, None)
            if module is not None:
                object.__setattr__(pipe, attr, _TimedModule(module, self.timers.wrap("text_encoder", module)))
        object.__setattr__(pipe, "unet", _TimedModule(pipe.unet, self.timers.wrap("unet", self._record_unet(unet))))
        net = getattr(pipe, "controlnet", None)
        if net is not None:  # ControlNet job: its own stage. diffusers checks the ControlNet's class, so the
            net.forward = self.timers.wrap("controlnet", net.forward)  # module stays and its forward is timed
        pipe.vae.decode = self.timers.wrap("vae_decoder", decode)

    def _record_unet(self, unet: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.unet_args is None:
                self.unet_args = (args, kwargs)
            return unet(*args, **kwargs)

        return call

    def run(self) -> tuple[Any, dict[str, float], dict[str, int]]:
        """The job once, with the shared latents: (images NHWC on [0, 1], seconds per stage, calls per stage)."""
        job = self.job
        return self.generate(job.prompt, job.negative_prompt, self.latents)

    def generate(self, prompt: str, negative_prompt: str | None, latents: Any) -> tuple[Any, dict, dict]:
        """One call of the pipeline with these latents (their batch is the number of images)."""
        job = self.job
        self.timers.reset()
        tensor = self.torch.from_numpy(latents).to(self.device, self.dtype)
        control = {}
        if job.controlnet:
            control = {"image": self.control_image, "controlnet_conditioning_scale": job.control_scale}
        out = self.pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            height=job.height,
            width=job.width,
            num_images_per_prompt=latents.shape[0],
            latents=tensor,
            output_type="np",
            **control,
        )
        return out.images, dict(self.timers.seconds), dict(self.timers.calls)

    def device_peak_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        return int(self.torch.cuda.max_memory_allocated())

    def unet_flops(self) -> int | None:
        """FLOPs of one U-Net call as the pipeline made it (2 per multiply-add; attention
        counted through the math SDPA path). Eager torch only."""
        if self.compile or self.unet_args is None:
            return None
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        args, kwargs = self.unet_args
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            self.unet_module(*args, **kwargs)
        return int(counter.get_total_flops())


def _controlnet_pipeline(base: Any, family: str, job: Job) -> Any:
    """diffusers' StableDiffusion(XL)ControlNetPipeline over `base`'s components, with the job's ControlNets
    loaded by the export's own loader (`synthetic:SEED` rebuilds the exported seeded weights)."""
    import diffusers

    from sdopt.export.controlnet import load_controlnet, parse_sources

    nets = [load_controlnet(src, base, family, 0).model for src in parse_sources(job.control_sources)]
    net = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    xl = family == "sdxl"
    cls = diffusers.StableDiffusionXLControlNetPipeline if xl else diffusers.StableDiffusionControlNetPipeline
    skip = ("safety_checker", "feature_extractor", "image_encoder")
    parts = {k: v for k, v in base.components.items() if k not in skip}
    extra = (
        {"add_watermarker": False}
        if xl
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    return cls(**parts, controlnet=net, **extra)


class _TimedModule:
    """Stands in for a pipeline component: calls go through the timer, attributes to the module."""

    def __init__(self, module: Any, call: Callable) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
