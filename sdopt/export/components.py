"""What each exported graph is: the torch module wrapped for export, its named inputs/outputs,
and the ranges of its dynamic dimensions.

Wrappers return plain tensors (no diffusers output classes) and keep every model constant
out of the graph that the runtime must know: the VAE scaling factor is recorded in the
manifest and applied by the runtime, never baked into a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdopt.manifest import DimRange, ImageSpec, TensorSpec


class TextEncoderGraph(torch.nn.Module):
    """CLIP text encoder with Optimum's outputs, in Optimum's order (diffusers reads some by position):
    CLIPTextModel -> last_hidden_state, pooler_output; CLIPTextModelWithProjection -> text_embeds,
    last_hidden_state; with `hidden_states` (SDXL) also hidden_states.0 .. hidden_states.N, of
    which SDXL conditions on the penultimate. The manifest's `aliases` name the roles the runtime
    reads (pooled, penultimate_hidden_state).
    """

    def __init__(self, text_encoder: torch.nn.Module, hidden_states: bool) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_states = hidden_states
        self.projection = hasattr(text_encoder, "text_projection")

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids, output_hidden_states=self.hidden_states)
        if self.projection:
            first = (out.text_embeds, out.last_hidden_state)
        else:
            first = (out.last_hidden_state, out.pooler_output)
        return (*first, *out.hidden_states) if self.hidden_states else first


class UNetGraph(torch.nn.Module):
    """U-Net noise prediction; SDXL's added conditions (pooled text embeds, time ids) as inputs.

    With `deep=True` a second output `deep_feature`: the input of the U-Net's very last layer
    (DeepCache, Ma et al. 2023). It is an intermediate the graph computes anyway; the runtime's
    fast mode keeps it and, on the steps between full passes, runs only `UNetShallowGraph`.
    The export traces this deep graph once and writes the plain one (Optimum's interface: one
    output, `out_sample`) as the same graph without that output, over the same weights file.
    """

    def __init__(self, unet: torch.nn.Module, sdxl: bool, deep: bool = True) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.deep = deep

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        captured: list[torch.Tensor] = []
        handle = _penultimate_layer(self.unet).register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            out = self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        finally:
            handle.remove()
        return (out, captured[-1]) if self.deep else out


class UNetShallowGraph(torch.nn.Module):
    """DeepCache's cheap step: conv_in, the last up-block layer fed the cached deep feature and
    conv_in's output (its skip connection), and the output head. Same result as the full U-Net
    when deep_feature comes from the same inputs."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool, input_names: list[str]) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.input_names = input_names  # SDXL's last layer has no cross-attention: no text states

    def forward(self, *inputs: torch.Tensor):
        return self.shallow(**dict(zip(self.input_names, inputs, strict=True)))

    def shallow(self, sample, timestep, deep_feature, encoder_hidden_states=None, text_embeds=None, time_ids=None):
        unet = self.unet
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        block = unet.up_blocks[-1]
        h = block.resnets[-1](torch.cat([deep_feature, unet.conv_in(sample)], dim=1), emb)
        if getattr(block, "attentions", None):
            h = block.attentions[-1](h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


def _penultimate_layer(unet: torch.nn.Module) -> torch.nn.Module:
    """The module whose output enters the U-Net's last layer (the last up block's last resnet)."""
    block = unet.up_blocks[-1]
    return block.attentions[-2] if getattr(block, "attentions", None) else block.resnets[-2]


class VaeDecoderGraph(torch.nn.Module):
    """Unscaled latents -> image in [-1, 1] (the runtime divides by the scaling factor)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """Image in [-1, 1] -> `latent_parameters`, Optimum's output: the latent distribution's mean
    and log-variance stacked on the channel axis (diffusers' DiagonalGaussianDistribution
    parameters). The runtime derives mean and std as diffusers does and draws the sample."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


@dataclass
class ComponentPlan:
    name: str
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimRange]
    keep_fp32: bool = False  # the whole graph stays fp32 in --precision fp16 (VAE overflows in fp16)
    fp32_ops: list[str] = field(default_factory=list)  # op types kept fp32 in fp16 mode
    vocab_size: int = 0  # text encoders: range of seeded input ids
    aliases: dict[str, str] = field(default_factory=dict)  # runtime role -> graph output name
    size_multiple: int = 1  # latent/pixel dims must be multiples (U-Net downsampling)

    def example_inputs(self, values: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        """Seeded inputs of the given dim values; realistic ranges where values matter."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = tuple(d if isinstance(d, int) else values[d] for d in spec.shape)
            if spec.name == "input_ids":
                out[spec.name] = rng.integers(0, self.vocab_size, size=shape, dtype=np.int64)
            elif spec.name == "timestep":
                out[spec.name] = rng.uniform(1, 999, size=shape).round().astype(np.float32)
            elif spec.name == "time_ids":
                h, w = values["latent_height"] * 8, values["latent_width"] * 8  # plausible pixel sizes
                out[spec.name] = np.tile(np.array([h, w, 0, 0, h, w], np.float32), (shape[0], 1))
            elif spec.name == "sample" and self.name == "vae_encoder":
                out[spec.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
            else:
                out[spec.name] = rng.standard_normal(shape).astype(np.float32)
        return out


def _dims(image: ImageSpec, vae_scale: int, batch_factor: int, pixels: bool) -> dict[str, DimRange]:
    s = 1 if pixels else vae_scale
    h, w = ("height", "width") if pixels else ("latent_height", "latent_width")
    return {
        "batch": DimRange(1, batch_factor, image.max_batch * batch_factor),
        h: DimRange(image.min_size // s, image.default_height // s, image.max_size // s),
        w: DimRange(image.min_size // s, image.default_width // s, image.max_size // s),
    }


def vae_scale(pipe: Any) -> int:
    """Pixels per latent: the VAE halves the size once per block after the first."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _text_encoder_plan(pipe: Any, name: str, family: str, image: ImageSpec) -> ComponentPlan:
    te = getattr(pipe, name)
    hidden, f32 = te.config.hidden_size, "float32"
    L = pipe.tokenizer.model_max_length
    sdxl = family == "sdxl"  # as optimum-cli: every hidden state only where the pipeline reads one
    states = (
        [TensorSpec(f"hidden_states.{i}", f32, ["batch", L, hidden]) for i in range(te.config.num_hidden_layers + 1)]
        if sdxl
        else []
    )
    last = TensorSpec("last_hidden_state", f32, ["batch", L, hidden])
    if hasattr(te, "text_projection"):
        outputs, pooled = [TensorSpec("text_embeds", f32, ["batch", te.config.projection_dim]), last], "text_embeds"
    else:
        outputs, pooled = [last, TensorSpec("pooler_output", f32, ["batch", hidden])], "pooler_output"
    aliases = {"pooled": pooled}
    if sdxl:
        aliases["penultimate_hidden_state"] = states[-2].name
    return ComponentPlan(
        name,
        TextEncoderGraph(te, hidden_states=sdxl),
        inputs=[TensorSpec("input_ids", "int64", ["batch", L])],
        outputs=outputs + states,
        dims={"batch": DimRange(1, 2, 2 * image.max_batch)},
        fp32_ops=["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax"],
        vocab_size=min(te.config.vocab_size, len(pipe.tokenizer)),
        aliases=aliases,
    )


def probe_dims(image: ImageSpec, scale: int) -> tuple[dict[str, int], dict[str, int]]:
    """The dim values a graph is traced and verified at: (smallest size at batch 2, default size at batch 1)."""
    small = {
        "batch": 2,
        "height": image.min_size,
        "width": image.min_size,
        "latent_height": image.min_size // scale,
        "latent_width": image.min_size // scale,
    }
    opt = {
        "batch": 1,
        "height": image.default_height,
        "width": image.default_width,
        "latent_height": image.default_height // scale,
        "latent_width": image.default_width // scale,
    }
    return small, opt


def _unet_plan(pipe: Any, name: str, family: str, image: ImageSpec) -> ComponentPlan:
    """`unet` (one output, `out_sample`) or `unet_deep` (also `deep_feature`, for fast mode)."""
    unet_cfg = pipe.unet.config
    f32 = "float32"
    L = pipe.tokenizer.model_max_length
    inputs = [
        TensorSpec("sample", f32, ["batch", unet_cfg.in_channels, "latent_height", "latent_width"]),
        TensorSpec("timestep", f32, ["batch"]),
        TensorSpec("encoder_hidden_states", f32, ["batch", L, unet_cfg.cross_attention_dim]),
    ]
    if family == "sdxl":
        inputs += [
            TensorSpec("text_embeds", f32, ["batch", pipe.text_encoder_2.config.projection_dim]),
            TensorSpec("time_ids", f32, ["batch", 6]),
        ]
    deep = TensorSpec("deep_feature", f32, ["batch", unet_cfg.block_out_channels[0], "latent_height", "latent_width"])
    out = TensorSpec("out_sample", f32, ["batch", unet_cfg.out_channels, "latent_height", "latent_width"])
    is_deep = name == "unet_deep"
    return ComponentPlan(
        name,
        UNetGraph(pipe.unet, family == "sdxl", deep=is_deep),
        inputs=inputs,
        outputs=[out, deep] if is_deep else [out],
        dims=_dims(image, vae_scale(pipe), 2, pixels=False),
        size_multiple=2 ** (len(unet_cfg.block_out_channels) - 1),
    )


def _unet_shallow_plan(pipe: Any, name: str, family: str, image: ImageSpec) -> ComponentPlan:
    """Fast mode's cheap step: the deep U-Net's inputs plus its `deep_feature`, its `out_sample`."""
    unet_plan = _unet_plan(pipe, "unet_deep", family, image)
    inputs = [*unet_plan.inputs[:3], unet_plan.outputs[1], *unet_plan.inputs[3:]]
    if not getattr(pipe.unet.up_blocks[-1], "attentions", None):  # SDXL: no cross-attention there
        inputs = [t for t in inputs if t.name != "encoder_hidden_states"]
    shallow = UNetShallowGraph(pipe.unet, family == "sdxl", [t.name for t in inputs])
    return ComponentPlan(
        name,
        shallow,
        inputs=inputs,
        outputs=unet_plan.outputs[:1],
        dims=unet_plan.dims,
        size_multiple=unet_plan.size_multiple,
    )


def _vae_decoder_plan(pipe: Any, name: str, family: str, image: ImageSpec) -> ComponentPlan:
    scale, latent_c, f32 = vae_scale(pipe), pipe.vae.config.latent_channels, "float32"
    return ComponentPlan(
        name,
        VaeDecoderGraph(pipe.vae),
        inputs=[TensorSpec("latent_sample", f32, ["batch", latent_c, "latent_height", "latent_width"])],
        outputs=[TensorSpec("sample", f32, ["batch", 3, "height", "width"])],
        dims={
            **_dims(image, scale, 1, pixels=False),
            **{k: v for k, v in _dims(image, scale, 1, pixels=True).items() if k != "batch"},
        },
        keep_fp32=True,
    )


def _vae_encoder_plan(pipe: Any, name: str, family: str, image: ImageSpec) -> ComponentPlan:
    scale, latent_c, f32 = vae_scale(pipe), pipe.vae.config.latent_channels, "float32"
    return ComponentPlan(
        name,
        VaeEncoderGraph(pipe.vae),
        inputs=[TensorSpec("sample", f32, ["batch", 3, "height", "width"])],
        outputs=[
            TensorSpec(
                "latent_parameters",
                f32,  # mean and log-variance: 2x the latent channels
                ["batch", 2 * latent_c, "latent_height", "latent_width"],
            )
        ],
        dims={
            **_dims(image, scale, 1, pixels=True),
            **{k: v for k, v in _dims(image, scale, 1, pixels=False).items() if k != "batch"},
        },
        keep_fp32=True,
    )


_PLANNERS = {
    "text_encoder": _text_encoder_plan,
    "text_encoder_2": _text_encoder_plan,
    "unet": _unet_plan,
    "unet_deep": _unet_plan,
    "unet_shallow": _unet_shallow_plan,
    "vae_decoder": _vae_decoder_plan,
    "vae_encoder": _vae_encoder_plan,
}


def plan_components(pipe: Any, family: str, image: ImageSpec, names: list[str]) -> list[ComponentPlan]:
    """The export plan of the requested components of a loaded diffusers pipeline."""
    plans: list[ComponentPlan] = []
    for name in names:
        planner = _PLANNERS.get(name)
        if planner is None:
            raise ValueError(name)
        plans.append(planner(pipe, name, family, image))
    return plans
