"""The manifest and the support files of an artifact (tokenizers, configs, Optimum's model_index.json),
written by `sdopt.export.artifact.export_artifact` once every graph is exported."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sdopt import __version__
from sdopt.export.components import vae_scale
from sdopt.export.sources import LoadedModel
from sdopt.export.tokenizer_files import save_tokenizer
from sdopt.manifest import Component, ImageSpec, Manifest, VaeSpec

if TYPE_CHECKING:
    from sdopt.export.artifact import ExportOptions


def build_manifest(
    model: LoadedModel, image: ImageSpec, opts: ExportOptions, components: dict[str, Component]
) -> Manifest:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    pipe = model.pipe
    vae_cfg = pipe.vae.config
    return Manifest(
        family=model.family,
        source=model.source,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        precision=opts.precision,
        opset=opts.opset,
        exporter=opts.exporter,
        image=image,
        vae=VaeSpec(
            scaling_factor=float(vae_cfg.scaling_factor),
            shift_factor=None if vae_cfg.get("shift_factor") is None else float(vae_cfg.shift_factor),
            scale=vae_scale(pipe),
            latent_channels=vae_cfg.latent_channels,
            force_upcast=bool(vae_cfg.get("force_upcast", False)),
        ),
        components=components,
        text_max_length=pipe.tokenizer.model_max_length,
        unet_in_channels=pipe.unet.config.in_channels,
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(pipe.config.get("requires_aesthetics_score", False)),
        tokenizers=["tokenizer", "tokenizer_2"] if model.family == "sdxl" else ["tokenizer"],
        versions={
            "sdopt": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def write_support_files(model: LoadedModel, root: Path, names: list[str]) -> None:
    """Tokenizers, scheduler config, model configs and an Optimum-style model_index.json."""
    pipe = model.pipe
    for tok in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, tok, None) is not None:
            save_tokenizer(getattr(pipe, tok), root / tok)
    _write_scheduler_config(pipe.scheduler, root / "scheduler")
    configs = {
        "unet": pipe.unet,
        "unet_deep": pipe.unet,
        "unet_shallow": pipe.unet,
        "vae_decoder": pipe.vae,
        "vae_encoder": pipe.vae,
    }
    for name in names:
        if name == "unet_deep":  # lives in unet/, beside the plain graph and its config
            continue
        if name in configs:
            configs[name].save_config(root / name)
        else:
            getattr(pipe, name).config.to_json_file(root / name / "config.json")
    cls = "ORTStableDiffusionXLPipeline" if model.family == "sdxl" else "ORTStableDiffusionPipeline"
    index = {
        "_class_name": cls,
        "_diffusers_version": pipe.config.get("_diffusers_version", ""),
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
    }
    for tok in ("tokenizer", "tokenizer_2"):
        if (root / tok).is_dir():
            index[tok] = ["transformers", "CLIPTokenizer"]
    for name in names:
        if name != "unet_deep":  # a second graph in unet/, not a pipeline component of its own
            index[name] = ["onnxruntime", "InferenceSession"]
    if model.family == "sdxl":
        index["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_scheduler_config(scheduler, folder: Path) -> None:
    """Only the keys the model set: diffusers' save_config also writes the class defaults
    (dropping `_use_default_values`), which another scheduler class built from the file would
    then inherit (SD 2.x's DDIM "leading" spacing would override Euler's own "linspace")."""
    config = dict(scheduler.config)
    defaults = set(config.pop("_use_default_values", []))
    kept = {k: v for k, v in config.items() if k not in defaults and not k.startswith("_")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler_config.json").write_text(
        json.dumps({"_class_name": type(scheduler).__name__, **kept}, indent=2) + "\n"
    )
