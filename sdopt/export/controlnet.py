"""ControlNets at export: where they come from, whether they fit the model, and their graphs.

A `--controlnet` SOURCE is a local diffusers `ControlNetModel` folder, a hub id, or
`synthetic[:SEED]`: `ControlNetModel.from_unet(unet)` with seeded random weights (for
benchmarks and tests; no weights can be downloaded here). `NAME=SOURCE` names it; otherwise
the name is the folder's (or hub repo's) last part, or `synthetic[-SEED]`.

Two graphs per artifact come from here: each ControlNet (`ControlNetGraph`), whose scaled
residuals are the extra inputs of one residual-taking U-Net (`UNetControlGraph`), written by
`sdopt.export.controlnet_export` next to unet/model.onnx and sharing its weights file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdopt.errors import SdoptError
from sdopt.export.components import ComponentPlan, _penultimate_layer, vae_scale
from sdopt.manifest import DimRange, ImageSpec, TensorSpec

SYNTHETIC = "synthetic"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MID = "mid_block_additional_residual"
# Config keys that must agree between a ControlNet and the U-Net it feeds (shapes of the residuals
# and of the conditioning it reads).
_MATCHING_KEYS = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "transformer_layers_per_block",
)


def down_name(i: int) -> str:
    return f"down_block_additional_residual_{i}"


@dataclass
class ControlNetSource:
    name: str
    source: str  # as given: a folder, a hub id, or synthetic[:SEED]


@dataclass
class LoadedControlNet:
    name: str
    model: Any  # diffusers ControlNetModel, fp32, eval
    source: dict[str, str]


def parse_sources(specs: list[str]) -> list[ControlNetSource]:
    """`--controlnet` values -> named sources; names are unique and file-system safe.

    Args:
        specs: each "SOURCE" or "NAME=SOURCE".
    Returns:
        The sources in the given order (which is the manifest's, and the runtime's default order).
    """
    out: list[ControlNetSource] = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            name, source = _default_name(spec), spec
        if not source:
            raise SdoptError(
                f"--controlnet {spec!r} names no source", "use NAME=SOURCE, e.g. canny=./sd-controlnet-canny"
            )
        if not NAME_PATTERN.match(name):
            raise SdoptError(
                f"ControlNet name {name!r} is not a simple name",
                "name it with NAME=SOURCE using letters, digits, - and _",
            )
        if any(s.name == name for s in out):
            raise SdoptError(f"two ControlNets are named {name!r}", "give each one its own NAME=SOURCE")
        out.append(ControlNetSource(name, source))
    return out


def _default_name(source: str) -> str:
    if source == SYNTHETIC or source.startswith(SYNTHETIC + ":"):
        return source.replace(":", "-")
    return Path(source.rstrip("/")).name or source


def load_controlnet(src: ControlNetSource, pipe: Any, family: str, seed: int) -> LoadedControlNet:
    """Load (or synthesise) one ControlNet in fp32 and check that it fits `pipe`'s U-Net.

    Args:
        src: a parsed source.
        pipe: the loaded diffusers pipeline being exported.
        family: its family (sd1, sd2, sdxl).
        seed: the export seed; a synthetic ControlNet without its own seed uses it.
    Returns:
        The loaded ControlNet and its manifest source record.
    """
    if src.source == SYNTHETIC or src.source.startswith(SYNTHETIC + ":"):
        own = src.source.partition(":")[2]
        if own and not own.isdigit():
            raise SdoptError(f"synthetic ControlNet seed {own!r} is not a number", "use e.g. synthetic:1")
        cn_seed = int(own) if own else seed
        model = synthetic_controlnet(pipe.unet, cn_seed)
        record = {"kind": "synthetic", "id": src.source, "seed": str(cn_seed)}
    else:
        model, kind = _load_pretrained(src.source)
        record = {"kind": kind, "id": src.source}
    check_fits(model, pipe.unet, family, src.name)
    model.to(torch.float32).eval().requires_grad_(False)
    return LoadedControlNet(src.name, model, record)


def synthetic_controlnet(unet: Any, seed: int) -> Any:
    """`ControlNetModel.from_unet` with seeded random weights everywhere.

    diffusers zero-initialises the conditioning embedding's last conv and the "zero convs"
    (so that a fresh ControlNet starts as a no-op); those are re-drawn with the default conv
    init here, or every residual would be exactly zero and parity tests would prove nothing.
    """
    from diffusers import ControlNetModel

    wide = unet.config.block_out_channels[0] >= 128
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        embedding = (16, 32, 96, 256) if wide else (8, 16, 16, 32)
        with torch.no_grad():
            cn = ControlNetModel.from_unet(
                unet, load_weights_from_unet=False, conditioning_embedding_out_channels=embedding
            )
            for conv in [cn.controlnet_cond_embedding.conv_out, *cn.controlnet_down_blocks, cn.controlnet_mid_block]:
                conv.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    return cn


def _load_pretrained(source: str) -> tuple[Any, str]:
    from diffusers import ControlNetModel

    path = Path(source).expanduser()
    local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
    if local and not (path / "config.json").is_file():
        raise SdoptError(
            f"ControlNet {source} is not a diffusers ControlNetModel folder (no config.json)",
            "pass a folder written by ControlNetModel.save_pretrained, a hub id, or synthetic",
        )
    try:
        if local:
            return ControlNetModel.from_pretrained(path, local_files_only=True), "folder"
        return ControlNetModel.from_pretrained(source), "hub"
    except Exception as e:  # noqa: BLE001 - library errors become one readable line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise SdoptError(
            f"could not load ControlNet {source}: {type(e).__name__}: {reason}",
            "hub downloads need network access; or pass a local ControlNetModel folder",
        ) from e


def _family_guess(config: Any) -> str:
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(config.get("cross_attention_dim"), "another")


def check_fits(controlnet: Any, unet: Any, family: str, name: str) -> None:
    """A ControlNet must have been made for this U-Net's architecture (family)."""
    cn_cfg, unet_cfg = controlnet.config, unet.config

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    def same(k: str) -> bool:
        a, b = norm(cn_cfg.get(k)), norm(unet_cfg.get(k))
        return a == b or (k == "transformer_layers_per_block" and a in (1, None) and b in (1, None))

    wrong = [k for k in _MATCHING_KEYS if not same(k)]
    if wrong:
        detail = ", ".join(f"{k} {cn_cfg.get(k)} vs {unet_cfg.get(k)}" for k in wrong[:3])
        raise SdoptError(
            f"ControlNet {name!r} was made for {_family_guess(cn_cfg)} models, not this {family} "
            f"model's U-Net ({detail})",
            f"use a ControlNet trained for this {family} model",
        )
    if cn_cfg.get("global_pool_conditions"):
        raise SdoptError(
            f"ControlNet {name!r} pools its conditions globally (shuffle-type); sdopt does not export it",
            "use a spatial ControlNet (canny, depth, pose, ...)",
        )


# -- graphs ------------------------------------------------------------------------------------
class ControlNetGraph(torch.nn.Module):
    """ControlNet -> its residuals, each times `conditioning_scale[:, i]` (per batch item and residual:
    one graph serves any scale, guess mode's ramp, and requests of different scales stacked)."""

    def __init__(self, controlnet: Any, sdxl: bool, input_names: list[str]) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sdxl = sdxl
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor):
        return self.residuals(**dict(zip(self.input_names, inputs, strict=True)))

    def residuals(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        conditioning_scale,
        text_embeds=None,
        time_ids=None,
    ):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            added_cond_kwargs=added,
            return_dict=False,
        )
        scale = conditioning_scale[:, :, None, None, None]  # (batch, residual, 1, 1, 1)
        return (*[d * scale[:, i] for i, d in enumerate(down)], mid * scale[:, len(down)])


class UNetControlGraph(torch.nn.Module):
    """The U-Net with ControlNet residuals added (diffusers' down_block_additional_residuals /
    mid_block_additional_residual); outputs as `UNetGraph` (noise prediction, deep feature)."""

    def __init__(self, unet: Any, sdxl: bool, input_names: list[str], n_down: int) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.input_names = input_names
        self.n_down = n_down

    def forward(self, *inputs: torch.Tensor):
        feeds = dict(zip(self.input_names, inputs, strict=True))
        added = {"text_embeds": feeds.get("text_embeds"), "time_ids": feeds.get("time_ids")} if self.sdxl else None
        captured: list[torch.Tensor] = []
        handle = _penultimate_layer(self.unet).register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            down = tuple(feeds[down_name(i)] for i in range(self.n_down))
            out = self.unet(
                feeds["sample"],
                feeds["timestep"],
                feeds["encoder_hidden_states"],
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=feeds[MID],
                return_dict=False,
            )[0]
        finally:
            handle.remove()
        return out, captured[-1]


class ControlPlan(ComponentPlan):
    """A ComponentPlan whose dims include derived ones ("latent_height/4": the residuals' sizes)
    and whose example inputs have realistic ranges for the control image and the scales."""

    def example_inputs(self, values: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        values = dict(values)
        for name in self.dims:
            base, _, factor = name.partition("/")
            if factor:
                values[name] = values[base] // int(factor)
        out = super().example_inputs(values, seed)
        rng = np.random.default_rng(seed + 7)
        for spec in self.inputs:
            if spec.name == "controlnet_cond":
                out[spec.name] = rng.uniform(0, 1, size=out[spec.name].shape).astype(np.float32)
            elif spec.name == "conditioning_scale":
                out[spec.name] = rng.uniform(0.5, 1.5, size=out[spec.name].shape).astype(np.float32)
        return out


def residual_specs(controlnet: Any, unet_plan: ComponentPlan, image: ImageSpec, scale: int) -> list[TensorSpec]:
    """Names and shapes of the residuals (from one small forward pass), "latent_height/k" dims."""
    values = {"batch": 1, "latent_height": image.min_size // scale, "latent_width": image.min_size // scale}
    feeds = unet_plan.example_inputs(values, 0)
    cond = torch.zeros(1, controlnet.config.conditioning_channels, image.min_size, image.min_size)
    added = (
        {"text_embeds": torch.from_numpy(feeds["text_embeds"]), "time_ids": torch.from_numpy(feeds["time_ids"])}
        if "text_embeds" in feeds
        else None
    )
    with torch.no_grad():
        down, mid = controlnet(
            torch.from_numpy(feeds["sample"]),
            torch.from_numpy(feeds["timestep"]),
            torch.from_numpy(feeds["encoder_hidden_states"]),
            cond,
            added_cond_kwargs=added,
            return_dict=False,
        )
    specs = []
    for name, t in [*((down_name(i), d) for i, d in enumerate(down)), (MID, mid)]:
        k = values["latent_height"] // t.shape[-1]
        dims = ["latent_height", "latent_width"] if k == 1 else [f"latent_height/{k}", f"latent_width/{k}"]
        specs.append(TensorSpec(name, "float32", ["batch", int(t.shape[1]), *dims]))
    return specs


def _derived_dims(base: dict[str, DimRange], residuals: list[TensorSpec]) -> dict[str, DimRange]:
    dims = dict(base)
    for spec in residuals:
        for d in spec.shape:
            if isinstance(d, str) and "/" in d:
                r, k = base[d.partition("/")[0]], int(d.partition("/")[2])
                dims[d] = DimRange(r.min // k, r.opt // k, r.max // k)
    return dims


def control_plans(
    pipe: Any, family: str, unet_plan: ComponentPlan, nets: list[LoadedControlNet], image: ImageSpec
) -> tuple[ControlPlan, list[ControlPlan], list[TensorSpec]]:
    """Export plans of the residual U-Net and of each ControlNet.

    Args:
        pipe: the diffusers pipeline; family: its family.
        unet_plan: the plain U-Net's plan (same inputs, outputs and dims as the residual U-Net's base).
        nets: the loaded ControlNets.
        image: the artifact's image spec.
    Returns:
        (residual U-Net plan, one plan per ControlNet, the residual tensor specs).
    """
    scale = vae_scale(pipe)
    residuals = residual_specs(nets[0].model, unet_plan, image, scale)
    dims = _derived_dims(unet_plan.dims, residuals)
    unet_inputs = [*unet_plan.inputs, *residuals]
    unet = ControlPlan(
        "unet_control",
        UNetControlGraph(pipe.unet, family == "sdxl", [t.name for t in unet_inputs], len(residuals) - 1),
        inputs=unet_inputs,
        outputs=unet_plan.outputs,
        dims=dims,
        size_multiple=unet_plan.size_multiple,
    )
    plans = []
    for net in nets:
        channels = net.model.config.conditioning_channels
        cond = [
            TensorSpec("controlnet_cond", "float32", ["batch", channels, "height", "width"]),
            TensorSpec("conditioning_scale", "float32", ["batch", len(residuals)]),
        ]
        inputs = [*unet_plan.inputs[:3], *cond, *unet_plan.inputs[3:]]
        latent = {k: v for k, v in dims.items() if k.startswith("latent_height") or k.startswith("latent_width")}
        pixel = {
            "height": DimRange(image.min_size, image.default_height, image.max_size),
            "width": DimRange(image.min_size, image.default_width, image.max_size),
        }
        graph = ControlNetGraph(net.model, family == "sdxl", [t.name for t in inputs])
        plans.append(
            ControlPlan(
                f"controlnet.{net.name}",
                graph,
                inputs=inputs,
                outputs=residuals,
                dims={"batch": dims["batch"], **latent, **pixel},
                size_multiple=unet_plan.size_multiple,
            )
        )
    return unet, plans, residuals
