"""Image <-> array conversions, the same arithmetic as diffusers' VaeImageProcessor.

Pixels enter the VAE in [-1, 1] NCHW float32 and leave it the same way; users see PIL
images or float arrays in [0, 1] NHWC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

ImageInput = Union[Image.Image, np.ndarray, str, Path]


def load_image(image: ImageInput, what: str = "image") -> Image.Image | np.ndarray:
    if isinstance(image, (str, Path)):
        from sdopt.errors import SdoptError

        try:
            return Image.open(image)
        except (OSError, ValueError) as e:
            raise SdoptError(f"cannot read {what} {image}: {e}", "pass a PNG or JPEG file") from e
    return image


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(height, width) of a PIL image or an HWC/NHWC array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return image.shape[-3], image.shape[-2]


def to_unit_array(image: Image.Image | np.ndarray, height: int, width: int, grayscale: bool = False) -> np.ndarray:
    """NCHW float32 in [0, 1] at height x width, resized as diffusers' VaeImageProcessor does:
    PIL images with Lanczos in their own mode, then converted; arrays (HW, HWC or NHWC, in
    [0, 1]) with torch's default nearest interpolation."""
    if isinstance(image, Image.Image):
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
        image = image.convert("L" if grayscale else "RGB")
        array = np.asarray(image).astype(np.float32) / 255.0
        array = array[None, :, :, None] if grayscale else array[None]
    else:
        array = np.asarray(image, dtype=np.float32)
        array = array[None, :, :, None] if array.ndim == 2 else array[None] if array.ndim == 3 else array
        rows = _nearest_index(array.shape[1], height)
        cols = _nearest_index(array.shape[2], width)
        array = array[:, rows][:, :, cols]
        if grayscale and array.shape[-1] != 1:
            array = array[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
            array = array[..., None]
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def _nearest_index(size: int, out: int) -> np.ndarray:
    """Source indices of torch.nn.functional.interpolate(mode="nearest"): floor(i * size / out)."""
    scale = np.float32(size) / np.float32(out)
    return np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int64), size - 1)


def preprocess_image(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """The VAE encoder's input: NCHW float32 in [-1, 1]."""
    return 2.0 * to_unit_array(image, height, width) - 1.0


def preprocess_mask(mask: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """N1HW float32 of 0/1: white (>= 0.5) marks pixels to repaint."""
    m = to_unit_array(mask, height, width, grayscale=True)
    return (m >= 0.5).astype(np.float32)


def postprocess(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1] NCHW -> NHWC float32 in [0, 1]."""
    return np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
