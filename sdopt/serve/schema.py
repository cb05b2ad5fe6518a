"""The HTTP API's request and response bodies (OpenAI Images shape plus sdopt's extras).

`ImagesRequest` follows `POST /v1/images/generations` of OpenAI's Images API (`prompt`, `n`,
`size` "WxH", `response_format` "b64_json", `model` and `user` accepted and ignored), so
existing clients work. sdopt's own fields are optional. Images travel as base64 PNG.

A request for n images becomes n single-image requests with seeds seed, seed+1, ...: each
image is reproducible on its own (`sdopt generate --seed S` gives image i for S = its seed).
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdopt.errors import SdoptError
from sdopt.serve.config import ServeLimits


class ImagesRequest(BaseModel):
    """Body of POST /v1/images/generations."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, description="What to draw.")
    n: int = Field(1, ge=1, description="Images to generate (each with its own seed: seed, seed+1, ...).")
    size: str | None = Field(
        None,
        description="'WIDTHxHEIGHT', e.g. '512x512'. Default: the artifact's size "
        "(img2img/inpaint: the input image's).",
    )
    response_format: Literal["b64_json"] = Field("b64_json", description="Only b64_json: the server keeps no files.")
    model: str | None = Field(
        None, description="Accepted for OpenAI clients and ignored: the model is fixed at start."
    )
    user: str | None = Field(None, description="Accepted for OpenAI clients and ignored.")
    negative_prompt: str | None = Field(None, description="What not to draw.")
    num_inference_steps: int = Field(30, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, description="Classifier-free guidance scale (<= 1 turns guidance off).")
    seed: int | None = Field(None, ge=0, lt=2**32, description="Seed of the first image (random when absent).")
    scheduler: str | None = Field(
        None, description="ddim, euler, euler-a, dpm++2m, dpm++2m-karras, lcm, pndm, unipc. Default: the model's own."
    )
    image: str | None = Field(None, description="Base64 PNG/JPEG: the init image (img2img), or the image to inpaint.")
    mask: str | None = Field(None, description="Base64 PNG: inpainting mask, white = repaint (needs image).")
    strength: float | None = Field(None, gt=0, le=1, description="img2img/inpaint strength in (0, 1].")
    lora: str | list[str] | None = Field(
        None,
        description="A LoRA the server was started with (`sdopt serve --lora NAME=PATH`), by NAME, or a list "
        "of names to stack (each at its configured scale). Absent or []: the base weights. GET /ready lists them.",
    )


class ImageData(BaseModel):
    """One generated image."""

    b64_json: str = Field(..., description="The PNG, base64-encoded.")
    seed: int = Field(..., description="The seed that reproduces this image alone.")


class ImagesResponse(BaseModel):
    """Body of a 200 from POST /v1/images/generations."""

    created: int = Field(..., description="Unix time of the response.")
    data: list[ImageData]
    timings: dict[str, float] = Field(..., description="Seconds per stage (the slowest image's), and 'total'.")


class ErrorBody(BaseModel):
    """OpenAI's error shape, plus sdopt's `fix`."""

    error: dict[str, Any]


def error_body(status: int, message: str, fix: str | None = None, kind: str = "invalid_request_error") -> dict:
    """The JSON of every non-200 answer."""
    return {"error": {"message": message, "fix": fix, "type": kind, "code": status}}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width); None -> (None, None)."""
    if size is None:
        return None, None
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SdoptError(f"size {size!r} is not 'WIDTHxHEIGHT'", "use e.g. '512x512'")
    width, height = (int(p) for p in parts)
    return height, width


def decode_image(data: str, what: str, max_side: int) -> Image.Image:
    """Base64 PNG/JPEG -> PIL image, refusing anything larger than max_side before decoding pixels."""
    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError, OSError) as e:
        raise SdoptError(f"{what} is not a base64 PNG or JPEG ({e})", f"send {what} as base64 of a PNG file") from e
    if max(image.size) > max_side:
        raise SdoptError(
            f"{what} is {image.size[0]}x{image.size[1]}, over the server's limit of {max_side} per side",
            f"resize {what} to at most {max_side} pixels per side",
        )
    image.load()
    return image


def encode_png(image: np.ndarray) -> str:
    """HWC float32 in [0, 1] -> base64 PNG (rounded as the runtime's to_pil)."""
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pipeline_calls(body: ImagesRequest, limits: ServeLimits) -> list[dict[str, Any]]:
    """The request as `Pipeline` keyword arguments, one single-image call per image.

    Args:
        body: The parsed request.
        limits: The server's per-request limits.

    Returns:
        n dicts of `Pipeline.make_request` keyword arguments (output_type "np"), seeds seed..seed+n-1.

    Raises:
        SdoptError: for a value over the server's limits or one that cannot work.
    """
    if body.n > limits.max_images:
        raise SdoptError(
            f"n={body.n} is over the server's limit of {limits.max_images} images per request",
            f"ask for at most {limits.max_images} images, or send several requests",
        )
    if body.num_inference_steps > limits.max_steps:
        raise SdoptError(
            f"num_inference_steps={body.num_inference_steps} is over the server's limit of {limits.max_steps}",
            f"use at most {limits.max_steps} steps",
        )
    height, width = parse_size(body.size)
    for name, value in (("height", height), ("width", width)):
        if value is not None and value > limits.max_size:
            raise SdoptError(
                f"{name} {value} is over the server's limit of {limits.max_size}",
                f"use at most {limits.max_size} pixels per side",
            )
    if body.mask is not None and body.image is None:
        raise SdoptError("a mask needs an image to inpaint", "send image with mask")
    image = decode_image(body.image, "image", limits.max_size * 2) if body.image else None
    mask = decode_image(body.mask, "mask", limits.max_size * 2) if body.mask else None
    seed = secrets.randbits(32) if body.seed is None else body.seed
    common = dict(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        height=height,
        width=width,
        num_images_per_prompt=1,
        scheduler=body.scheduler,
        image=image,
        mask_image=mask,
        strength=body.strength,
        output_type="np",
    )
    return [{**common, "seed": (seed + i) % 2**32} for i in range(body.n)]
