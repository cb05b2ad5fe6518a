"""Synthetic models: real diffusers architectures from the configs in `models/`, seeded weights.

Speed and memory do not depend on weight values, and no weights can be downloaded here, so
benchmarks use full-size architectures (SD 1.5, SD 2.1, SDXL) with random weights and tests
use tiny ones. Same preset + seed -> bit-identical weights.
"""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError
from sdopt.export.tokenizer_files import write_clip_tokenizer

PREFIX = "synthetic:"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("sdopt.models").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("sdopt.models") / f"{name}.json"
    if not path.is_file():
        raise SdoptError(
            f"unknown synthetic preset {name!r}", f"choose one of: {', '.join(PREFIX + n for n in preset_names())}"
        )
    return json.loads(path.read_text())


def build_pipeline(name: str, seed: int = 0):
    """A diffusers pipeline of preset `name` with weights drawn from `seed` (fp32, CPU, eval)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: F401  (registers classes)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    preset = load_preset(name)
    scheduler_cfg = dict(preset["scheduler"])
    scheduler = getattr(diffusers, scheduler_cfg.pop("_class_name")).from_config(scheduler_cfg)

    def tokenizer(spec: dict[str, Any]) -> CLIPTokenizer:
        folder = Path(tempfile.mkdtemp(prefix="sdopt-tok-"))
        write_clip_tokenizer(folder, spec["pad_token"], spec["model_max_length"])
        return CLIPTokenizer.from_pretrained(folder)

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            unet = UNet2DConditionModel(**preset["unet"])
            vae = AutoencoderKL(**preset["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**preset["text_encoder"]))
            parts: dict[str, Any] = dict(
                unet=unet,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer(preset["tokenizer"]),
                scheduler=scheduler,
            )
            if preset["family"] == "sdxl":
                parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**preset["text_encoder_2"]))
                parts["tokenizer_2"] = tokenizer(preset["tokenizer_2"])
    finally:
        torch.random.set_rng_state(generator_state)

    if preset["family"] == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **parts, force_zeros_for_empty_prompt=preset.get("force_zeros_for_empty_prompt", True)
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
