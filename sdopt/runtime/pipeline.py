"""The sampling loop over exported engines: txt2img, img2img and inpainting for SD 1.x, 2.x, XL.

Mirrors diffusers' StableDiffusion(XL)(Img2Img|Inpaint)Pipeline step for step, with numpy
in place of torch, so the same inputs give the same images.

Randomness (documented, reproducible): one `np.random.default_rng(seed)` per call, drawn
with `standard_normal(shape, dtype=float32)` in diffusers' order: [img2img, and inpaint
unless it is a 9-channel U-Net at strength 1: the VAE latent sample of the input image(s)],
the initial noise (B*n, C, H/8, W/8), [inpaint: the latent sample of the masked image(s)],
then each stochastic scheduler step's noise. Input images, masks and their latents are
tiled to the batch as diffusers does (images [A, B] for 4 outputs -> [A, B, A, B]).
txt2img latents are `noise * scheduler.init_noise_sigma`; `latents=` replaces that noise
(in every mode: diffusers' own meaning of `latents` differs between its pipelines).

Threads: a Pipeline may be called from several threads at once. Engine sessions are created
once in `load` and are thread-safe; each call builds its own scheduler and RNG.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdopt.errors import SdoptError, check_image_size
from sdopt.manifest import Manifest, load_manifest, verify_files
from sdopt.runtime import images as imageops
from sdopt.runtime.backends import open_backend
from sdopt.runtime.io_adapter import adapt
from sdopt.runtime.schedulers import DIFFUSERS_CLASS_NAMES, SCHEDULER_NAMES, Scheduler, make_scheduler
from sdopt.runtime.tokenizer import ClipTokenizer

StepCallback = Callable[[int, int], None]  # (step done, total steps)


@dataclass
class GenerationResult:
    images: Any  # list of PIL images, or NHWC float32 array in [0, 1] for output_type="np"
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, and "total"


class Pipeline:
    """Load once with `Pipeline.load(dir)`, then call like a diffusers pipeline."""

    def __init__(self, root: Path, manifest: Manifest, backend: Any, sessions: dict[str, Any],
                 tokenizers: list[ClipTokenizer], scheduler_config: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.sessions = sessions
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", verify_hashes: bool = True, **backend_options: Any) -> Pipeline:
        """Open an artifact folder. `provider`: cpu | cuda | tensorrt. Backend options go to the
        backend (e.g. threads= for ONNX Runtime, use_cuda_graph= for TensorRT)."""
        root = Path(path).expanduser()
        manifest = load_manifest(root)
        names = manifest.runtime_components()  # one U-Net graph: unet_deep where there is one
        if verify_hashes:
            verify_files(root, manifest, names)
        backend = open_backend(provider, root, manifest, **backend_options)
        sessions = {name: adapt(backend.load(name), manifest.components[name]) for name in names}
        tokenizers = [ClipTokenizer(root / t, manifest.text_max_length) for t in manifest.tokenizers]
        scheduler_config = json.loads((root / manifest.scheduler_config).read_text())
        return cls(root, manifest, backend, sessions, tokenizers, scheduler_config)

    # -- public call -------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
        image: imageops.ImageInput | None = None,
        mask_image: imageops.ImageInput | None = None,
        strength: float | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        deepcache: int = 1,
    ) -> GenerationResult:
        """`deepcache=N` (> 1) is the fast mode: a full U-Net pass every N steps and, between
        them, only its last layer over the cached deep feature (DeepCache, Ma et al. 2023).
        Roughly N-fold fewer U-Net FLOPs at some loss of fidelity; 1 (default) is exact."""
        t_start = time.perf_counter()
        m = self.manifest
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise SdoptError("no prompt given", "pass at least one prompt")
        if num_inference_steps < 1:
            raise SdoptError(f"steps must be at least 1, got {num_inference_steps}", "use e.g. 30")
        if num_images_per_prompt < 1:
            raise SdoptError(f"images per prompt must be at least 1, got {num_images_per_prompt}", "use 1 or more")
        if int(deepcache) != deepcache or deepcache < 1:
            raise SdoptError(f"deepcache must be a whole number >= 1, got {deepcache}", "use 1 (exact) or e.g. 3 (fast)")
        if deepcache > 1 and not ("unet_shallow" in self.sessions and any(
                o.name == "deep_feature" for o in m.components[m.full_unet()].outputs)):
            raise SdoptError("fast mode needs the unet_shallow graph, which this artifact lacks",
                             "re-export with `sdopt export --force` (it exports unet_shallow by default)")
        if output_type not in ("pil", "np"):
            raise SdoptError(f"unknown output_type {output_type!r}", "use 'pil' or 'np'")
        if mask_image is not None and image is None:
            raise SdoptError("a mask needs an image to inpaint", "pass image= (--image) with mask_image=")
        mode = "inpaint" if mask_image is not None else "img2img" if image is not None else "txt2img"
        if strength is None:
            strength = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0}[mode]
        if not 0.0 < strength <= 1.0:
            raise SdoptError(f"strength must be in (0, 1], got {strength}", "use e.g. 0.8")
        if mode != "txt2img" and "vae_encoder" not in self.sessions:
            raise SdoptError(f"{mode} needs the VAE encoder, which this artifact lacks", "re-export with vae_encoder")

        image = imageops.load_image(image) if image is not None else None
        mask_image = imageops.load_image(mask_image, "mask") if mask_image is not None else None
        if mode == "img2img" and height is None and width is None:
            h, w = imageops.image_size(image)  # diffusers' img2img keeps the input size (rounded down to 8)
            height, width = h - h % m.vae.scale, w - w % m.vae.scale
        height = height or m.image.default_height
        width = width or m.image.default_width
        self._check_size(height, width)
        batch = len(prompts) * num_images_per_prompt
        if m.image.max_batch is not None and batch > m.image.max_batch:
            raise SdoptError(f"{batch} images per call exceed the exported maximum batch {m.image.max_batch}",
                             f"generate fewer at once, or re-export with --max-batch {batch}")
        negatives = self._negatives(negative_prompt, len(prompts))
        do_cfg = guidance_scale > 1.0
        sched = self._scheduler(scheduler)
        seed = secrets.randbits(32) if seed is None else int(seed)
        rng = np.random.default_rng(seed)
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        cond = self._encode_prompts(prompts, negatives, num_images_per_prompt, do_cfg, height, width)
        timings["text_encoder"] = time.perf_counter() - t0

        sched.set_timesteps(num_inference_steps)
        timesteps = sched.timesteps
        if mode != "txt2img":
            timesteps = self._strength_timesteps(sched, num_inference_steps, strength)
        latent_shape = (batch, m.vae.latent_channels, height // m.vae.scale, width // m.vae.scale)
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise SdoptError(f"latents have shape {tuple(latents.shape)}, this call needs {latent_shape}",
                             "pass latents of the call's batch and size (height/8, width/8)")

        t0 = time.perf_counter()
        mask = image_latents = masked_latents = noise = None
        if mode == "txt2img":
            noise = latents if latents is not None else rng.standard_normal(latent_shape, dtype=np.float32)
            x = noise.astype(np.float32) * np.float32(sched.init_noise_sigma)
        else:
            pixels = imageops.preprocess_image(image, height, width)
            # diffusers encodes the image (one VAE sample draw) only where its latents are used.
            if mode == "img2img" or m.unet_in_channels == 4 or strength < 1.0:
                image_latents = self._encode_image(pixels, rng, batch)
            noise = latents if latents is not None else rng.standard_normal(latent_shape, dtype=np.float32)
            if mode == "inpaint" and strength == 1.0:
                x = noise.astype(np.float32) * np.float32(sched.init_noise_sigma)
            else:
                x = sched.add_noise(image_latents, noise, timesteps[0])
            if mode == "inpaint":
                mask_px = imageops.preprocess_mask(mask_image, height, width)
                if mask_px.shape[0] not in (1, pixels.shape[0]):
                    raise SdoptError(f"{mask_px.shape[0]} masks for {pixels.shape[0]} images",
                                     "pass one mask, or one mask per image")
                masked_latents = self._encode_image(pixels * (mask_px < 0.5), rng, batch)
                mask = _tile_batch(mask_px[:, :, :: m.vae.scale, :: m.vae.scale], batch)  # nearest, as diffusers
        timings["vae_encoder"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        x = self._denoise(x, sched, timesteps, cond, do_cfg, guidance_scale, rng, mode, deepcache, mask, image_latents,
                          masked_latents, noise, callback)
        timings["unet"] = time.perf_counter() - t0
        timings["unet_per_step"] = timings["unet"] / max(len(timesteps), 1)

        t0 = time.perf_counter()
        decoded = self._decode(x)
        timings["vae_decoder"] = time.perf_counter() - t0
        out = imageops.postprocess(decoded)
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(out if output_type == "np" else imageops.to_pil(out), seed, timings)

    # -- stages ------------------------------------------------------------------------------
    def _run(self, component: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run one engine with feeds cast to the manifest's dtypes; outputs come back fp32."""
        spec = self.manifest.components[component]
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in spec.inputs}
        return {k: v.astype(np.float32, copy=False) for k, v in self.sessions[component].run(typed).items()}

    def _encode_prompts(self, prompts: list[str], negatives: list[str] | None, n: int, do_cfg: bool,
                        height: int, width: int) -> dict[str, np.ndarray]:
        """U-Net conditioning, [uncond; cond] when guiding, each prompt repeated n times."""
        m = self.manifest
        sdxl = m.family == "sdxl"
        encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
        zero_negative = sdxl and negatives is None and m.force_zeros_for_empty_prompt

        def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
            states, pooled = [], None
            for tokenizer, encoder in zip(self.tokenizers, encoders):
                out = self._run(encoder, input_ids=tokenizer(texts))
                states.append(out["penultimate_hidden_state"] if sdxl else out["last_hidden_state"])
                pooled = out["pooled"]
            return np.concatenate(states, axis=-1), pooled

        embeds, pooled = encode(prompts)
        if do_cfg:
            if zero_negative:
                neg_embeds, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
            else:
                neg_embeds, neg_pooled = encode(negatives or [""] * len(prompts))
            embeds = np.concatenate([np.repeat(neg_embeds, n, axis=0), np.repeat(embeds, n, axis=0)])
            pooled = np.concatenate([np.repeat(neg_pooled, n, axis=0), np.repeat(pooled, n, axis=0)])
        else:
            embeds, pooled = np.repeat(embeds, n, axis=0), np.repeat(pooled, n, axis=0)
        cond = {"encoder_hidden_states": embeds}
        if sdxl:
            # diffusers' _get_add_time_ids: original size + crop top-left + target size, or for
            # refiners (requires_aesthetics_score) + aesthetic score 6.0 (2.5 for the negative).
            def time_ids(aesthetic: float) -> np.ndarray:
                tail = [aesthetic] if m.requires_aesthetics_score else [height, width]
                return np.tile(np.array([height, width, 0, 0, *tail], dtype=np.float32), (len(prompts) * n, 1))

            cond["text_embeds"] = pooled
            cond["time_ids"] = np.concatenate([time_ids(2.5), time_ids(6.0)]) if do_cfg else time_ids(6.0)
        return cond

    def _encode_image(self, pixels: np.ndarray, rng: np.random.Generator, batch: int) -> np.ndarray:
        """VAE latent sample (mean + std * noise) * scaling factor, tiled up to the batch."""
        if batch % pixels.shape[0]:
            raise SdoptError(f"{pixels.shape[0]} input images cannot fill a batch of {batch}",
                             "pass one image, or one per generated image")
        out = self._run("vae_encoder", sample=pixels)
        sample = out["latent_mean"] + out["latent_std"] * rng.standard_normal(out["latent_mean"].shape, dtype=np.float32)
        vae = self.manifest.vae
        latents = (sample - (vae.shift_factor or 0.0)) * np.float32(vae.scaling_factor)
        return _tile_batch(latents.astype(np.float32), batch)

    def _denoise(self, x, sched: Scheduler, timesteps, cond, do_cfg, guidance, rng, mode, deepcache, mask,
                 image_latents, masked_latents, noise, callback) -> np.ndarray:
        nine_channel = self.manifest.unet_in_channels == 9
        if mode == "inpaint" and nine_channel:
            mask_in = np.concatenate([mask, mask]) if do_cfg else mask
            masked_in = np.concatenate([masked_latents, masked_latents]) if do_cfg else masked_latents
        for i, t in enumerate(timesteps):
            model_in = np.concatenate([x, x]) if do_cfg else x
            model_in = sched.scale_model_input(model_in, t)
            if mode == "inpaint" and nine_channel:
                model_in = np.concatenate([model_in, mask_in, masked_in], axis=1)
            timestep = np.full((model_in.shape[0],), t, dtype=np.float32)
            if i % deepcache == 0:
                out = self._run(self.manifest.full_unet(), sample=model_in, timestep=timestep, **cond)
                pred, deep_feature = out["out_sample"], out.get("deep_feature")
            else:
                pred = self._run("unet_shallow", sample=model_in, timestep=timestep, deep_feature=deep_feature,
                                 **cond)["out_sample"]
            if do_cfg:
                uncond, text = np.split(pred, 2)
                pred = uncond + np.float32(guidance) * (text - uncond)
            step_noise = rng.standard_normal(x.shape, dtype=np.float32) if sched.needs_noise else None
            x = sched.step(pred, t, x, noise=step_noise)
            if mode == "inpaint" and not nine_channel:
                # 4-channel U-Net: keep the unmasked region on the noised original's trajectory.
                proper = image_latents
                if i < len(timesteps) - 1:
                    proper = sched.add_noise(image_latents, noise, timesteps[i + 1])
                x = (1 - mask) * proper + mask * x
            if callback:
                callback(i + 1, len(timesteps))
        return x

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        vae = self.manifest.vae
        z = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor or 0.0)
        return self._run("vae_decoder", latent_sample=z)["sample"]

    # -- helpers -----------------------------------------------------------------------------
    def _check_size(self, height: int, width: int) -> None:
        spec = self.manifest.image
        check_image_size(height, width, 8)
        check_image_size(height, width, spec.multiple)
        for name, v in (("height", height), ("width", width)):
            if spec.min_size is not None and spec.max_size is not None and not spec.min_size <= v <= spec.max_size:
                raise SdoptError(f"{name} {v} is outside the exported range {spec.min_size}..{spec.max_size}",
                                 f"use a size in range, or re-export with --min-size/--max-size covering {v}")

    def _negatives(self, negative_prompt: str | list[str] | None, count: int) -> list[str] | None:
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != count:
            raise SdoptError(f"{len(negatives)} negative prompts for {count} prompts", "pass one per prompt, or one")
        return negatives

    def _scheduler(self, name: str | None) -> Scheduler:
        name = name or default_scheduler_name(self.scheduler_config)
        if name not in SCHEDULER_NAMES:
            raise SdoptError(f"unknown scheduler {name!r}", f"choose one of: {', '.join(SCHEDULER_NAMES)}")
        try:
            return make_scheduler(name, self.scheduler_config)
        except (ValueError, NotImplementedError) as e:
            raise SdoptError(f"scheduler {name} cannot use this model's scheduler config: {e}",
                             "choose another --scheduler") from None

    @staticmethod
    def _strength_timesteps(sched: Scheduler, steps: int, strength: float) -> np.ndarray:
        """diffusers' get_timesteps: skip the first (1 - strength) of the schedule."""
        init = min(int(steps * strength), steps)
        if init < 1:  # as diffusers' inpaint check (its img2img would run a stray last step)
            raise SdoptError(f"strength {strength} with {steps} steps leaves no denoising step",
                             "raise --strength or --steps")
        t_start = steps - init
        sched.set_begin_index(t_start * sched.order)
        return sched.timesteps[t_start * sched.order:]


def _tile_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """[A, B] -> [A, B, A, B] for a batch of 4: diffusers' `tensor.repeat(batch // len, 1, 1, 1)`."""
    return np.concatenate([x] * (batch // x.shape[0])) if x.shape[0] != batch else x


def default_scheduler_name(config: dict[str, Any]) -> str:
    """The scheduler name of the artifact's own scheduler class (e.g. SD 1.5's PNDM -> pndm)."""
    cls = config.get("_class_name", "")
    names = [n for n, c in DIFFUSERS_CLASS_NAMES.items() if c == cls]
    if not names:
        return "euler"
    if cls == "DPMSolverMultistepScheduler":
        return "dpm++2m-karras" if config.get("use_karras_sigmas") else "dpm++2m"
    return names[0]
