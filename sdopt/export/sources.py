"""Where a model comes from: a synthetic preset, a local diffusers folder, a single-file
checkpoint, or a hub id. Every way of failing ends in one SdoptError naming the fix."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError
from sdopt.export import synthetic

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Image sizes each family's exports accept by default: (min, max, default).
FAMILY_SIZES = {"sd1": (256, 768, 512), "sd2": (256, 1024, 768), "sdxl": (512, 1024, 1024)}


@dataclass
class LoadedModel:
    pipe: Any  # a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, fp32, eval
    family: str
    source: dict[str, str]
    size_range: tuple[int, int, int]  # min, max, default


def family_of(pipe: Any) -> str:
    """sdxl has two text encoders; SD 2.x conditions on 1024-wide OpenCLIP ViT-H states."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"


def load_model(model: str, seed: int = 0) -> LoadedModel:
    """Resolve MODEL as given on the command line and load it in fp32 on the CPU."""
    _quiet_libraries()
    if model.startswith(synthetic.PREFIX):
        name = model[len(synthetic.PREFIX) :]
        preset = synthetic.load_preset(name)
        pipe = synthetic.build_pipeline(name, seed=seed)
        lo, hi = preset["size_range"]
        return LoadedModel(
            pipe,
            preset["family"],
            {"kind": "synthetic", "id": model, "seed": str(seed)},
            (lo, hi, preset["default_size"]),
        )
    path = Path(model).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        pipe = _load_single_file(path)
        kind = "single_file"
    elif path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        pipe = _load_folder(path)
        kind = "folder"
    elif model.count("/") == 1:
        pipe = _load_hub(model)
        kind = "hub"
    else:
        raise SdoptError(
            f"unknown model {model!r}",
            f"pass a diffusers folder, a .safetensors file, a hub id (org/name) or one of "
            f"{', '.join(synthetic.PREFIX + n for n in synthetic.preset_names())}",
        )
    family = family_of(pipe)
    return LoadedModel(pipe, family, {"kind": kind, "id": str(model)}, FAMILY_SIZES[family])


def _load_folder(path: Path) -> Any:
    if not path.is_dir():
        raise SdoptError(f"model folder {path} does not exist", "check the path, or use synthetic:tiny to try sdopt")
    index = path / "model_index.json"
    if not index.is_file():
        raise SdoptError(
            f"{path} has no model_index.json, so it is not a diffusers model folder",
            "pass the folder that contains model_index.json (a diffusers save_pretrained output)",
        )
    try:
        json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise SdoptError(f"{index} is not valid JSON ({e})", "restore the file from the original model") from e
    from diffusers import DiffusionPipeline

    return _finish(_guarded(lambda: DiffusionPipeline.from_pretrained(path, local_files_only=True), path))


def _load_single_file(path: Path) -> Any:
    if not path.is_file():
        raise SdoptError(f"checkpoint {path} does not exist", "check the path")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    def load():
        try:
            return StableDiffusionXLPipeline.from_single_file(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - not an SDXL checkpoint: try SD 1.x/2.x
            return StableDiffusionPipeline.from_single_file(path, local_files_only=True)

    return _finish(
        _guarded(
            load,
            path,
            hint="diffusers needs the model's config cached locally to read single files "
            "offline; convert it to a diffusers folder and pass that instead",
        )
    )


def _load_hub(repo_id: str) -> Any:
    from diffusers import DiffusionPipeline

    return _finish(
        _guarded(
            lambda: DiffusionPipeline.from_pretrained(repo_id),
            repo_id,
            hint="hub downloads need network access and the weights; or pass a local diffusers folder",
        )
    )


def _guarded(load, what: Any, hint: str = "check that the folder is a complete, uncorrupted diffusers model") -> Any:
    try:
        return load()
    except SdoptError:
        raise
    except Exception as e:  # noqa: BLE001 - library errors become one readable line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SdoptError(f"could not load model {what}: {type(e).__name__}: {reason[:300]}", hint) from e


def _finish(pipe: Any) -> Any:
    import torch

    for name in ("unet", "vae", "text_encoder"):
        if getattr(pipe, name, None) is None:
            raise SdoptError(f"model has no {name}", "sdopt exports Stable Diffusion pipelines (SD 1.x, 2.x, XL)")
    pipe.to(torch.float32)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def _quiet_libraries() -> None:
    for name in ("diffusers", "transformers", "torch.onnx", "torch._dynamo", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
