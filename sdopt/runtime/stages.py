"""The stages of one generation: prompt encoding, initial latents, the denoising loop, decode.

Each stage is a function of the request and an engine runner; the denoising loop is a
`DenoiseState` advanced one step at a time, so that callers (the pipeline's generator, a
server that stacks several requests into one U-Net call) drive it. Mirrors diffusers'
StableDiffusion(XL)(Img2Img|Inpaint)Pipeline step for step, with numpy in place of torch.

Randomness: one `np.random.default_rng(seed)` per request, drawn with
`standard_normal(shape, dtype=float32)` in diffusers' order: [img2img, and inpaint unless it is
a 9-channel U-Net at strength 1: the VAE latent sample of the input image(s)], the initial
noise, [inpaint: the latent sample of the masked image(s)], then each stochastic scheduler
step's noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.manifest import Manifest
from sdopt.runtime.request import GenerationRequest, Img2Img, Inpaint, Txt2Img
from sdopt.runtime.schedulers import Scheduler
from sdopt.runtime.tokenizer import ClipTokenizer

Feeds = dict[str, np.ndarray]
#: Runs one component: `run(name, **feeds)` -> outputs as float32 (Pipeline.run).
RunComponent = Callable[..., Feeds]


def encode_prompt(
    run: RunComponent, manifest: Manifest, tokenizers: list[ClipTokenizer], request: GenerationRequest
) -> Feeds:
    """The U-Net's conditioning feeds: [uncond; cond] when guiding, each prompt repeated n times.

    Args:
        run: The component runner.
        manifest: The artifact's manifest (family, SDXL settings).
        tokenizers: One tokenizer per text encoder.
        request: The validated request.

    Returns:
        `encoder_hidden_states`, plus SDXL's `text_embeds` and `time_ids`.
    """
    sdxl = manifest.family == "sdxl"
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    n, count = request.num_images_per_prompt, len(request.prompts)

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=False):
            out = run(encoder, input_ids=tokenizer(texts))
            states.append(out["penultimate_hidden_state"] if sdxl else out["last_hidden_state"])
            pooled = out["pooled"]
        assert pooled is not None
        return np.concatenate(states, axis=-1), pooled

    embeds, pooled = encode(list(request.prompts))
    if request.do_cfg:
        if sdxl and request.negative_prompts is None and manifest.force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = encode(list(request.negative_prompts or [""] * count))
        embeds = np.concatenate([np.repeat(neg_embeds, n, axis=0), np.repeat(embeds, n, axis=0)])
        pooled = np.concatenate([np.repeat(neg_pooled, n, axis=0), np.repeat(pooled, n, axis=0)])
    else:
        embeds, pooled = np.repeat(embeds, n, axis=0), np.repeat(pooled, n, axis=0)
    cond = {"encoder_hidden_states": embeds}
    if sdxl:
        cond["text_embeds"] = pooled
        cond["time_ids"] = _sdxl_time_ids(manifest, request)
    return cond


def _sdxl_time_ids(manifest: Manifest, request: GenerationRequest) -> np.ndarray:
    """diffusers' _get_add_time_ids: original size + crop top-left + target size, or for
    refiners (requires_aesthetics_score) + aesthetic score 6.0 (2.5 for the negative)."""
    h, w = request.height, request.width

    def time_ids(aesthetic: float) -> np.ndarray:
        tail = [aesthetic] if manifest.requires_aesthetics_score else [h, w]
        return np.tile(np.array([h, w, 0, 0, *tail], dtype=np.float32), (request.batch, 1))

    return np.concatenate([time_ids(2.5), time_ids(6.0)]) if request.do_cfg else time_ids(6.0)


@dataclass
class InpaintLatents:
    """What inpainting adds to the loop: the mask at latent resolution and the image latents.

    A 9-channel (inpainting) U-Net takes the mask and the masked image's latents as extra
    input channels; a 4-channel U-Net instead keeps the unmasked region on the noised
    original's trajectory after every step.
    """

    mask: np.ndarray
    image_latents: np.ndarray | None
    masked_latents: np.ndarray | None
    noise: np.ndarray
    nine_channel: bool

    def extra_channels(self, do_cfg: bool) -> np.ndarray | None:
        """The 9-channel U-Net's mask + masked-image channels (None for 4 channels)."""
        if not self.nine_channel:
            return None
        assert self.masked_latents is not None
        extra = np.concatenate([self.mask, self.masked_latents], axis=1)
        return np.concatenate([extra, extra]) if do_cfg else extra

    def blend(self, x: np.ndarray, scheduler: Scheduler, next_timestep: float | None) -> np.ndarray:
        """4-channel U-Net: the unmasked region follows the original, noised to the next step."""
        if self.nine_channel:
            return x
        assert self.image_latents is not None
        proper = self.image_latents
        if next_timestep is not None:
            proper = scheduler.add_noise(self.image_latents, self.noise, next_timestep)
        return (1 - self.mask) * proper + self.mask * x


@dataclass
class DenoiseState:
    """One request's denoising loop, advanced one step at a time (the unit serving batches).

    `unet_inputs()` gives the feeds of this step's U-Net call, `advance(pred, deep)` applies
    its output: guidance, the scheduler step and, for inpainting, the blend.
    """

    latents: np.ndarray
    scheduler: Scheduler
    timesteps: np.ndarray
    cond: Feeds
    rng: np.random.Generator
    guidance_scale: float
    deepcache: int = 1
    inpaint: InpaintLatents | None = None
    step: int = 0
    deep_feature: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    control: Any = None  # ControlNet hook: sdopt.runtime.controlnet.ControlState (residual feeds), or None

    @property
    def total(self) -> int:
        """Denoising steps in all."""
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def unet_inputs(self) -> tuple[str, Feeds]:
        """This step's U-Net call.

        Returns:
            (component, feeds): "unet" on full passes, "unet_shallow" between them in fast
            mode (DeepCache); feeds are sample, timestep (one per batch item) and the
            conditioning, with twice the batch when guiding ([uncond; cond]).
        """
        t = self.timesteps[self.step]
        sample = np.concatenate([self.latents, self.latents]) if self.do_cfg else self.latents
        sample = self.scheduler.scale_model_input(sample, t)
        extra = self.inpaint.extra_channels(self.do_cfg) if self.inpaint else None
        if extra is not None:
            sample = np.concatenate([sample, extra], axis=1)
        feeds = {"sample": sample, "timestep": np.full((sample.shape[0],), t, dtype=np.float32), **self.cond}
        if self.step % self.deepcache == 0:
            if self.control is not None:  # ControlNet hook: "unet_control" with this step's residuals
                return self.control.unet_inputs(self, "unet", feeds)
            return "unet", feeds
        assert self.deep_feature is not None
        return "unet_shallow", {**feeds, "deep_feature": self.deep_feature}

    def advance(self, noise_pred: np.ndarray, deep_feature: np.ndarray | None = None) -> None:
        """Apply this step's U-Net output and move to the next step.

        Args:
            noise_pred: The U-Net's `out_sample` for this state's feeds (2x batch when guiding).
            deep_feature: Its `deep_feature` output on full passes (kept for fast mode).
        """
        if deep_feature is not None:
            self.deep_feature = deep_feature
        if self.do_cfg:
            uncond, text = np.split(noise_pred, 2)
            noise_pred = uncond + np.float32(self.guidance_scale) * (text - uncond)
        t = self.timesteps[self.step]
        noise = self.rng.standard_normal(self.latents.shape, dtype=np.float32) if self.scheduler.needs_noise else None
        x = self.scheduler.step(noise_pred, t, self.latents, noise=noise)
        if self.inpaint is not None:
            x = self.inpaint.blend(
                x, self.scheduler, self.timesteps[self.step + 1] if self.step + 1 < self.total else None
            )
        self.latents = x
        self.step += 1


def initial_state(
    run: RunComponent, manifest: Manifest, request: GenerationRequest, scheduler: Scheduler, cond: Feeds
) -> DenoiseState:
    """The loop's starting point: initial latents (noised input image for img2img/inpaint),
    the timesteps left after `strength`, and inpainting's mask and latents."""
    rng = np.random.default_rng(request.seed)
    scheduler.set_timesteps(request.num_inference_steps)
    vae = manifest.vae
    shape = (request.batch, vae.latent_channels, request.height // vae.scale, request.width // vae.scale)
    mode = request.mode

    def draw_noise() -> np.ndarray:
        return request.latents if request.latents is not None else rng.standard_normal(shape, dtype=np.float32)

    state = DenoiseState(
        np.empty(0, np.float32), scheduler, scheduler.timesteps, cond, rng, request.guidance_scale, request.deepcache
    )
    if isinstance(mode, Txt2Img):
        state.latents = draw_noise().astype(np.float32) * np.float32(scheduler.init_noise_sigma)
        return state
    state.timesteps = strength_timesteps(scheduler, request.num_inference_steps, mode.strength)
    image_latents = None
    # diffusers encodes the image (one VAE sample draw) only where its latents are used.
    if isinstance(mode, Img2Img) or manifest.unet_in_channels == 4 or mode.strength < 1.0:
        image_latents = encode_image(run, manifest, mode.pixels, rng, request.batch)
    noise = draw_noise()
    if isinstance(mode, Inpaint) and mode.strength == 1.0:
        state.latents = noise.astype(np.float32) * np.float32(scheduler.init_noise_sigma)
    else:
        assert image_latents is not None
        state.latents = scheduler.add_noise(image_latents, noise, state.timesteps[0])
    if isinstance(mode, Inpaint):
        masked = encode_image(run, manifest, mode.pixels * (mode.mask < 0.5), rng, request.batch)
        mask = _tile_batch(mode.mask[:, :, :: vae.scale, :: vae.scale], request.batch)  # nearest, as diffusers
        nine = manifest.unet_in_channels == 9
        state.inpaint = InpaintLatents(mask, image_latents, masked, noise, nine)
    return state


def encode_image(
    run: RunComponent, manifest: Manifest, pixels: np.ndarray, rng: np.random.Generator, batch: int
) -> np.ndarray:
    """VAE latent sample (mean + std * noise) * scaling factor, tiled up to the batch."""
    if batch % pixels.shape[0]:
        raise SdoptError(
            f"{pixels.shape[0]} input images cannot fill a batch of {batch}",
            "pass one image, or one per generated image",
        )
    out = run("vae_encoder", sample=pixels)
    sample = out["latent_mean"] + out["latent_std"] * rng.standard_normal(out["latent_mean"].shape, dtype=np.float32)
    vae = manifest.vae
    latents = (sample - (vae.shift_factor or 0.0)) * np.float32(vae.scaling_factor)
    return _tile_batch(latents.astype(np.float32), batch)


def strength_timesteps(scheduler: Scheduler, steps: int, strength: float) -> np.ndarray:
    """diffusers' get_timesteps: skip the first (1 - strength) of the schedule."""
    init = min(int(steps * strength), steps)
    if init < 1:  # as diffusers' inpaint check (its img2img would run a stray last step)
        raise SdoptError(
            f"strength {strength} with {steps} steps leaves no denoising step", "raise --strength or --steps"
        )
    t_start = steps - init
    scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order :]


def decode(run: RunComponent, manifest: Manifest, latents: np.ndarray) -> np.ndarray:
    """VAE decode of final latents -> pixels NCHW in [-1, 1] (unscaled by the VAE factors)."""
    vae = manifest.vae
    z = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor or 0.0)
    return run("vae_decoder", latent_sample=z)["sample"]


def _tile_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """[A, B] -> [A, B, A, B] for a batch of 4: diffusers' `tensor.repeat(batch // len, 1, 1, 1)`."""
    return np.concatenate([x] * (batch // x.shape[0])) if x.shape[0] != batch else x
