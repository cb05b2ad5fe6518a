"""A generation request, validated against the artifact before any engine runs.

The mode is a type: `Txt2Img`, `Img2Img` or `Inpaint`, each carrying what it needs (the input
pixels, the mask, the strength). Everything later (prompt encoding, initial latents, the
denoising loop, the decode) reads a `GenerationRequest` and never re-checks user input.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.manifest import Manifest
from sdopt.runtime import images as imageops
from sdopt.runtime.schedulers import SCHEDULER_NAMES


@dataclass(frozen=True)
class Txt2Img:
    """Text to image: denoise from pure noise."""


@dataclass(frozen=True)
class Img2Img:
    """Image to image: noise the input image's latents to `strength`, then denoise.

    `pixels` is NCHW float32 in [-1, 1] at the request's size (the VAE encoder's input).
    """

    pixels: np.ndarray
    strength: float


@dataclass(frozen=True)
class Inpaint:
    """Repaint where `mask` is 1 (white), keep the rest of `pixels`.

    `pixels` is NCHW float32 in [-1, 1]; `mask` is N1HW float32 of 0/1, both at the request's size.
    """

    pixels: np.ndarray
    mask: np.ndarray
    strength: float


Mode = Txt2Img | Img2Img | Inpaint

DEFAULT_STRENGTH = {Txt2Img: 1.0, Img2Img: 0.8, Inpaint: 1.0}


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call generates from; built by `make_request`, which checks every field."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_images_per_prompt: int
    seed: int
    scheduler: str
    latents: np.ndarray | None
    mode: Mode
    deepcache: int = 1
    output_type: str = "pil"
    control: Any = None  # ControlNet hook: sdopt.runtime.controlnet.ControlRequest, set by its with_control

    @property
    def batch(self) -> int:
        """Images this request generates."""
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance: both halves go through the U-Net in one batched call."""
        return self.guidance_scale > 1.0


def make_request(
    manifest: Manifest,
    components: Collection[str],
    default_scheduler: str,
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
    deepcache: int = 1,
) -> GenerationRequest:
    """Check a call's arguments against the artifact and build its request.

    Args:
        manifest: The artifact's manifest (sizes, batch, families).
        components: Names of the components the pipeline loaded.
        default_scheduler: The scheduler used when `scheduler` is None.
        The rest: as `Pipeline.__call__`.

    Returns:
        The validated `GenerationRequest`; `seed` is drawn at random when None. Raises
        SdoptError for the first argument that cannot work, with its fix.
    """
    import secrets

    prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    _check_counts(prompts, num_inference_steps, num_images_per_prompt, deepcache, output_type, components)
    kind = Inpaint if mask_image is not None else Img2Img if image is not None else Txt2Img
    strength = _strength(kind, image, strength, components)
    init = imageops.load_image(image) if image is not None else None
    height, width = _size(manifest, init if kind is Img2Img else None, height, width)
    batch = len(prompts) * num_images_per_prompt
    manifest.image.check(height, width, batch)
    scheduler = _scheduler_name(scheduler or default_scheduler)
    _check_latents(manifest, latents, batch, height, width)
    return GenerationRequest(
        prompts=prompts,
        negative_prompts=_negatives(negative_prompt, len(prompts)),
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        height=height,
        width=width,
        num_images_per_prompt=num_images_per_prompt,
        seed=secrets.randbits(32) if seed is None else int(seed),
        scheduler=scheduler,
        latents=latents,
        mode=_mode(kind, init, mask_image, strength, height, width),
        deepcache=int(deepcache),
        output_type=output_type,
    )


def _size(manifest: Manifest, init: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """The call's size: as asked, else diffusers' img2img keeps the input's (rounded down to 8),
    else the artifact's default."""
    if init is not None and height is None and width is None:
        h, w = imageops.image_size(init)
        return h - h % manifest.vae.scale, w - w % manifest.vae.scale
    return height or manifest.image.default_height, width or manifest.image.default_width


def _strength(kind: type, image: Any, strength: float | None, components: Collection[str]) -> float:
    if kind is Inpaint and image is None:
        raise SdoptError("a mask needs an image to inpaint", "pass image= (--image) with mask_image=")
    strength = DEFAULT_STRENGTH[kind] if strength is None else strength
    if not 0.0 < strength <= 1.0:
        raise SdoptError(f"strength must be in (0, 1], got {strength}", "use e.g. 0.8")
    if kind is not Txt2Img and "vae_encoder" not in components:
        name = "inpaint" if kind is Inpaint else "img2img"
        raise SdoptError(f"{name} needs the VAE encoder, which this artifact lacks", "re-export with vae_encoder")
    return strength


def _scheduler_name(name: str) -> str:
    if name not in SCHEDULER_NAMES:
        raise SdoptError(f"unknown scheduler {name!r}", f"choose one of: {', '.join(SCHEDULER_NAMES)}")
    return name


def _check_latents(manifest: Manifest, latents: np.ndarray | None, batch: int, height: int, width: int) -> None:
    vae = manifest.vae
    shape = (batch, vae.latent_channels, height // vae.scale, width // vae.scale)
    if latents is not None and tuple(latents.shape) != shape:
        raise SdoptError(
            f"latents have shape {tuple(latents.shape)}, this call needs {shape}",
            "pass latents of the call's batch and size (height/8, width/8)",
        )


def _check_counts(
    prompts: tuple[str, ...],
    steps: int,
    per_prompt: int,
    deepcache: int,
    output_type: str,
    components: Collection[str],
) -> None:
    if not prompts:
        raise SdoptError("no prompt given", "pass at least one prompt")
    if steps < 1:
        raise SdoptError(f"steps must be at least 1, got {steps}", "use e.g. 30")
    if per_prompt < 1:
        raise SdoptError(f"images per prompt must be at least 1, got {per_prompt}", "use 1 or more")
    if int(deepcache) != deepcache or deepcache < 1:
        raise SdoptError(f"deepcache must be a whole number >= 1, got {deepcache}", "use 1 (exact) or e.g. 3 (fast)")
    if deepcache > 1 and "unet_shallow" not in components:
        raise SdoptError(
            "fast mode needs the unet_shallow graph, which this artifact lacks",
            "re-export with `sdopt export --force` (it exports unet_shallow by default)",
        )
    if output_type not in ("pil", "np"):
        raise SdoptError(f"unknown output_type {output_type!r}", "use 'pil' or 'np'")


def _mode(kind: type, init: Any, mask_image: Any, strength: float, height: int, width: int) -> Mode:
    if kind is Txt2Img:
        return Txt2Img()
    pixels = imageops.preprocess_image(init, height, width)
    if kind is Img2Img:
        return Img2Img(pixels, strength)
    mask = imageops.preprocess_mask(imageops.load_image(mask_image, "mask"), height, width)
    if mask.shape[0] not in (1, pixels.shape[0]):
        raise SdoptError(f"{mask.shape[0]} masks for {pixels.shape[0]} images", "pass one mask, or one mask per image")
    return Inpaint(pixels, mask, strength)


def _negatives(negative_prompt: str | list[str] | None, count: int) -> tuple[str, ...] | None:
    if negative_prompt is None:
        return None
    negatives = (negative_prompt,) * count if isinstance(negative_prompt, str) else tuple(negative_prompt)
    if len(negatives) != count:
        raise SdoptError(f"{len(negatives)} negative prompts for {count} prompts", "pass one per prompt, or one")
    return negatives
