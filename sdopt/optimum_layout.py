"""Read a folder written by `optimum-cli export onnx` (no sdopt.json) as an sdopt manifest.

Hugging Face Optimum's Stable Diffusion exports hold `model_index.json`, one folder per
component (`text_encoder[_2]`, `unet`, `vae_encoder`, `vae_decoder`: `model.onnx` +
`config.json`), the tokenizers and the scheduler config. The manifest is built from those
files and from the graphs' signatures (read from the protobuf, no weights loaded). Figures that
only sdopt's export records are absent (None / empty), never invented: verification errors,
file hashes, the verified image-size range, the maximum batch, dimension ranges, versions.

Optimum's graphs differ from the runtime's names in ways the manifest describes
(`Component.aliases`; see sdopt/runtime/io_adapter.py for the scalar timestep and the VAE's
`latent_parameters`). Pure python: the runtime and the CLI import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError
from sdopt.manifest import Component, ImageSpec, Manifest, TensorSpec, VaeSpec
from sdopt.onnx_signature import read_signature

OPTIMUM_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
ONNX_FILE = "model.onnx"


def is_optimum_folder(root: str | Path) -> bool:
    """An Optimum ONNX export: model_index.json and unet/model.onnx (and no sdopt.json)."""
    root = Path(root)
    return (root / "model_index.json").is_file() and (root / "unet" / ONNX_FILE).is_file()


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SdoptError(f"{path} is unreadable ({e})", "re-export the folder with `optimum-cli export onnx`") from e


def optimum_manifest(root: str | Path) -> Manifest:
    """The manifest of an Optimum Stable Diffusion (1.x, 2.x, XL) ONNX export.

    Args:
        root: the folder `optimum-cli export onnx --model MODEL root` wrote.

    Returns:
        A Manifest whose sdopt-only figures (verification, hashes, size range, batch) are absent.
    """
    root = Path(root)
    index = _json(root / "model_index.json")
    unet_cfg = _json(root / "unet" / "config.json")
    vae_cfg = _json(root / "vae_decoder" / "config.json")
    scheduler = _json(root / "scheduler" / "scheduler_config.json")
    sdxl = "XL" in index.get("_class_name", "") or (root / "text_encoder_2" / ONNX_FILE).is_file()
    family = "sdxl" if sdxl else "sd2" if unet_cfg.get("cross_attention_dim") == 1024 else "sd1"
    components = {name: _component(root, name) for name in OPTIMUM_COMPONENTS if (root / name / ONNX_FILE).is_file()}
    if "text_encoder" not in components or "vae_decoder" not in components:
        raise SdoptError(
            f"{root} lacks text_encoder/model.onnx or vae_decoder/model.onnx",
            "pass a complete `optimum-cli export onnx` folder of a Stable Diffusion model",
        )
    scale = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    multiple = scale * 2 ** (len(unet_cfg.get("block_out_channels", [0] * 4)) - 1)
    default = int(unet_cfg.get("sample_size", 64)) * scale
    tokenizers = [t for t in ("tokenizer", "tokenizer_2") if (root / t).is_dir()]
    max_length = _json(root / "tokenizer" / "tokenizer_config.json").get("model_max_length", 77)
    unet = components["unet"]
    return Manifest(
        family=family,
        source={"kind": "optimum", "id": str(root)},
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        precision="fp16" if unet.input("sample").dtype == "float16" else "fp32",
        opset=read_signature(root / unet.path).opset,
        exporter="optimum",
        image=ImageSpec(
            min_size=None,
            max_size=None,
            multiple=multiple,
            default_height=default,
            default_width=default,
            max_batch=None,
        ),
        vae=VaeSpec(
            scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
            shift_factor=None if vae_cfg.get("shift_factor") is None else float(vae_cfg["shift_factor"]),
            scale=scale,
            latent_channels=int(vae_cfg.get("latent_channels", 4)),
            force_upcast=bool(vae_cfg.get("force_upcast", False)),
        ),
        components=components,
        text_max_length=int(max_length) if int(max_length) < 10**6 else 77,
        unet_in_channels=int(unet_cfg.get("in_channels", 4)),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)) and sdxl,
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
        tokenizers=tokenizers,
    )


def _component(root: Path, name: str) -> Component:
    path = f"{name}/{ONNX_FILE}"
    sig = read_signature(root / path)
    inputs = [TensorSpec(v.name, v.dtype, list(v.shape)) for v in sig.inputs]
    outputs = [TensorSpec(v.name, v.dtype, list(v.shape)) for v in sig.outputs]
    names = [o.name for o in outputs]
    aliases: dict[str, str] = {}
    if name.startswith("text_encoder"):
        aliases["pooled"] = "text_embeds" if "text_embeds" in names else "pooler_output"
        hidden = sorted((n for n in names if n.startswith("hidden_states.")), key=lambda n: int(n.split(".")[1]))
        if len(hidden) >= 2:  # hidden_states.0 (embeddings) .. hidden_states.N: SDXL reads N - 1
            aliases["penultimate_hidden_state"] = hidden[-2]
    precision = "fp16" if any(t.dtype == "float16" for t in inputs + outputs) else "fp32"
    return Component(
        name=name,
        path=path,
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        dims={},
        files={},
        verification=None,
        aliases=aliases,
    )
