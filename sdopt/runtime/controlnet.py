"""The ControlNet stage: control images in, residual feeds for each step's U-Net call out.

Mirrors diffusers' StableDiffusion(XL)ControlNet(Img2Img)Pipeline and MultiControlNetModel:

- control images are resized to the output size as diffusers' `prepare_image` does (PIL: Lanczos
  in the image's own mode, then RGB; arrays in [0, 1]: nearest), repeated for the batch
  (one image: for every output; one per prompt: `repeat_interleave` by images per prompt) and
  doubled for guidance ([uncond; cond]) unless in guess mode;
- at step i of n, ControlNet k is on when not (i / n < start_k or (i + 1) / n > end_k); its
  residuals are scaled by `conditioning_scale_k` (guess mode: times logspace(-1, 0) over the
  residuals, and the ControlNet sees the conditional half only, zeros going to the other);
- the residuals of several ControlNets are summed in order, as MultiControlNetModel does.

A ControlNet that is off for a step is not run (its residuals would be exactly zero). When the
artifact has ControlNets, the pipeline loads only the residual U-Net (unet/control.onnx, same
weights as unet/model.onnx) and every call goes through it: calls without control feed zero
residuals, which leaves the U-Net's result bit for bit unchanged.

Batching: `ControlState.calls(state)` lists this step's ControlNet calls (per-item scales, so
calls of different requests stack along the batch axis); a server runs them stacked and hands
each state its outputs with `supply`. `DenoiseState.unet_inputs()` runs any calls not supplied.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.manifest import FULL_UNETS, ControlNetSection, Manifest
from sdopt.runtime import images as imageops
from sdopt.runtime.request import GenerationRequest
from sdopt.runtime.stages import DenoiseState, Feeds, RunComponent

ControlImages = imageops.ImageInput | Sequence[Any]
REEXPORT = "re-export with `sdopt export MODEL --controlnet SOURCE` (SOURCE: a ControlNet folder, hub id or synthetic)"


@dataclass(frozen=True)
class ControlRequest:
    """The validated ControlNet part of a request (`GenerationRequest.control`)."""

    names: tuple[str, ...]  # ControlNets, in the order their residuals are summed
    images: tuple[np.ndarray, ...]  # per ControlNet: NCHW float32 in [0, 1] at the output size, 1 or one per prompt
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool = False


def components_to_load(manifest: Manifest, controlnet: bool = True, base: Collection[str] | None = None) -> list[str]:
    """The components a pipeline loads: one U-Net graph either way.

    Args:
        manifest: the artifact's manifest.
        controlnet: with ControlNets (the residual U-Net in place of any full U-Net graph, and the
            ControlNets) or without (the plain U-Net graph only).
        base: what the pipeline would load without ControlNets (default: every component).
    Returns:
        Component names.
    """
    names = list(manifest.components if base is None else base)
    section = manifest.controlnet
    return names if section is None else section.components_to_load(names, controlnet)


def with_control(
    manifest: Manifest,
    components: Collection[str],
    request: GenerationRequest,
    control_image: ControlImages | None = None,
    controlnet_conditioning_scale: float | Sequence[float] = 1.0,
    control_guidance_start: float | Sequence[float] = 0.0,
    control_guidance_end: float | Sequence[float] = 1.0,
    guess_mode: bool = False,
    controlnet: str | Sequence[str] | None = None,
) -> GenerationRequest:
    """Check a call's ControlNet arguments and attach them to its request.

    Args:
        manifest: the artifact's manifest; components: the loaded components.
        request: the validated request without ControlNet.
        control_image: one image per selected ControlNet (a list with one ControlNet: its batch).
        controlnet_conditioning_scale: one scale, or one per ControlNet.
        control_guidance_start: fraction of the steps before which a ControlNet is off (or one per ControlNet).
        control_guidance_end: fraction of the steps after which it is off again (or one per ControlNet).
        guess_mode: diffusers' guess mode (ControlNets see the conditional half only, ramped scales).
        controlnet: a name or names of the artifact's ControlNets; default all, in manifest order.
    Returns:
        The request, with `control` set when a control image was given.
    Raises:
        SdoptError: for the first argument that cannot work.
    """
    if control_image is None and controlnet is None:
        return request
    section = _section(manifest, components)
    names = _select(section, controlnet)
    if control_image is None:
        raise SdoptError(
            f"ControlNet {', '.join(names)} selected but no control image given",
            "pass control_image= (--control-image PATH)",
        )
    if request.deepcache > 1:
        raise SdoptError(
            "fast mode (deepcache) does not combine with ControlNet", "use deepcache=1 with control images"
        )
    per_net = _split_images(control_image, names)
    images = tuple(_prepare(imgs, name, request) for imgs, name in zip(per_net, names, strict=True))
    scales = _per_net(controlnet_conditioning_scale, names, "controlnet_conditioning_scale")
    starts = _per_net(control_guidance_start, names, "control_guidance_start")
    ends = _per_net(control_guidance_end, names, "control_guidance_end")
    for s, e in zip(starts, ends, strict=True):
        if not 0.0 <= s < e <= 1.0:
            raise SdoptError(
                f"control guidance window {s}..{e} is not within 0 <= start < end <= 1",
                "use e.g. control_guidance_start=0.0, control_guidance_end=0.5",
            )
    control = ControlRequest(tuple(names), images, scales, starts, ends, bool(guess_mode))
    return dataclasses.replace(request, control=control)


def _section(manifest: Manifest, components: Collection[str]) -> ControlNetSection:
    section = manifest.controlnet
    if section is None:
        raise SdoptError("this artifact was exported without a ControlNet", REEXPORT)
    if section.unet not in components:
        raise SdoptError(
            "the pipeline was loaded without its ControlNets",
            "load it with Pipeline.load(path, controlnet=True) (the default)",
        )
    return section


def _select(section: ControlNetSection, controlnet: str | Sequence[str] | None) -> list[str]:
    available = [c.name for c in section.controlnets]
    names = available if controlnet is None else [controlnet] if isinstance(controlnet, str) else list(controlnet)
    if not names:
        raise SdoptError("no ControlNet selected", f"name one or more of: {', '.join(available)}")
    for name in names:
        if section.get(name) is None:
            raise SdoptError(f"this artifact has no ControlNet {name!r}", f"choose from: {', '.join(available)}")
    if len(set(names)) != len(names):
        raise SdoptError(f"ControlNet selected twice: {', '.join(names)}", "name each ControlNet once")
    return names


def _is_image(x: Any) -> bool:
    return not isinstance(x, (list, tuple)) and not (isinstance(x, np.ndarray) and x.dtype == object)


def _split_images(control_image: ControlImages, names: list[str]) -> list[list[Any]]:
    """diffusers' convention: one ControlNet takes an image or a batch list; several take one
    entry (image or batch list) per ControlNet."""
    entries: list[Any] = [control_image] if _is_image(control_image) else list(control_image)  # type: ignore[arg-type]
    if len(names) == 1:
        return [entries]
    if len(entries) != len(names):
        raise SdoptError(
            f"{len(entries)} control images for {len(names)} ControlNets ({', '.join(names)})",
            "pass one control image per ControlNet, in the order of controlnet=",
        )
    return [[e] if _is_image(e) else list(e) for e in entries]


def _prepare(images: list[Any], name: str, request: GenerationRequest) -> np.ndarray:
    count = len(request.prompts)
    if len(images) not in (1, count):
        raise SdoptError(
            f"{len(images)} control images for ControlNet {name!r} and {count} prompts",
            "pass one control image, or one per prompt",
        )
    arrays = [
        imageops.to_unit_array(imageops.load_image(im, "control image"), request.height, request.width)
        for im in images
    ]
    return np.concatenate(arrays).astype(np.float32)


def _per_net(value: float | Sequence[float], names: list[str], what: str) -> tuple[float, ...]:
    values = [float(value)] * len(names) if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != len(names):
        raise SdoptError(
            f"{len(values)} values of {what} for {len(names)} ControlNets ({', '.join(names)})",
            "pass one value for all, or one per ControlNet",
        )
    return tuple(values)


# -- the stage ---------------------------------------------------------------------------------
@dataclass
class _Net:
    component: str
    image: np.ndarray  # batch-tiled (and doubled for guidance unless guess mode)
    scale: float
    start: float
    end: float


@dataclass
class ControlState:
    """One request's ControlNet stage; `DenoiseState.control` (see the module docstring)."""

    run: RunComponent
    unet: str
    residual_specs: dict[str, list[int | str]]  # residual name -> shape spec of the residual U-Net input
    nets: list[_Net]
    guess_mode: bool = False
    supplied: tuple[int, Feeds] | None = None  # (step, summed residual feeds)
    _zeros: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)

    def active(self, step: int, total: int) -> list[tuple[_Net, float]]:
        """(ControlNet, its scale this step) for every ControlNet that is on and non-zero."""
        out = []
        for net in self.nets:
            keep = 1.0 - float(step / total < net.start or (step + 1) / total > net.end)
            if net.scale * keep != 0.0:
                out.append((net, net.scale * keep))
        return out

    def calls(self, state: DenoiseState) -> list[tuple[str, Feeds]]:
        """This step's ControlNet calls: (component, feeds), feeds of the state's own batch."""
        guess = self.guess_mode and state.do_cfg
        t = state.timesteps[state.step]
        sample = state.latents if guess else np.concatenate([state.latents] * (2 if state.do_cfg else 1))
        sample = state.scheduler.scale_model_input(sample, t)
        cond = {k: np.split(v, 2)[1] if guess else v for k, v in state.cond.items()}
        n_res = len(self.residual_specs)
        ramp = np.logspace(-1, 0, n_res, dtype=np.float32) if self.guess_mode else np.ones(n_res, np.float32)
        calls = []
        for net, scale in self.active(state.step, state.total):
            scales = np.tile(ramp * np.float32(scale), (sample.shape[0], 1))
            feeds = {
                "sample": sample,
                "timestep": np.full((sample.shape[0],), t, dtype=np.float32),
                **cond,
                "controlnet_cond": net.image,
                "conditioning_scale": scales,
            }
            calls.append((net.component, feeds))
        return calls

    def supply(self, state: DenoiseState, outputs: list[Feeds]) -> None:
        """Hand over the outputs of `calls(state)` (same order): they are summed for the U-Net."""
        total: Feeds = {}
        for out in outputs:
            for name in self.residual_specs:
                total[name] = out[name] if name not in total else total[name] + out[name]
        if total and self.guess_mode and state.do_cfg:
            total = {k: np.concatenate([np.zeros_like(v), v]) for k, v in total.items()}
        self.supplied = (state.step, total)

    def unet_inputs(self, state: DenoiseState, component: str, feeds: Feeds) -> tuple[str, Feeds]:
        """The hook in `DenoiseState.unet_inputs`: the residual U-Net with this step's residuals."""
        if component not in FULL_UNETS:  # fast mode's shallow steps (only without control: see with_control)
            return component, feeds
        if self.supplied is None or self.supplied[0] != state.step:
            t0 = time.perf_counter()
            self.supply(state, [self.run(c, **f) for c, f in self.calls(state)])
            state.timings["controlnet"] = state.timings.get("controlnet", 0.0) + time.perf_counter() - t0
        assert self.supplied is not None
        residuals = self.supplied[1] or self._zero_residuals(feeds["sample"].shape)
        return self.unet, {**feeds, **residuals}

    def _zero_residuals(self, sample_shape: tuple[int, ...]) -> Feeds:
        batch, _, h, w = sample_shape
        sizes = {"batch": batch, "latent_height": h, "latent_width": w}
        out = {}
        for name, spec in self.residual_specs.items():
            shape = tuple(
                d
                if isinstance(d, int)
                else sizes[d]
                if d in sizes
                else sizes[d.partition("/")[0]] // int(d.partition("/")[2])
                for d in spec
            )
            if shape not in self._zeros:
                self._zeros[shape] = np.zeros(shape, np.float32)
            out[name] = self._zeros[shape]
        return out


def control_state(
    run: RunComponent, manifest: Manifest, components: Collection[str], request: GenerationRequest
) -> ControlState | None:
    """The request's ControlNet stage, or None where the pipeline runs the plain U-Net.

    Args:
        run: the pipeline's component runner; manifest: the artifact's; components: those loaded.
        request: the request (its `control` may be None: zero residuals, same images).
    Returns:
        The state to set as `DenoiseState.control`.
    """
    section = manifest.controlnet
    if section is None or section.unet not in components:
        return None
    unet = manifest.components[section.unet]
    specs = {name: unet.input(name).shape for name in section.residuals}
    control: ControlRequest | None = getattr(request, "control", None)
    if control is None:
        return ControlState(run, section.unet, specs, [])
    guess = control.guess_mode
    nets = []
    for name, image, scale, start, end in zip(
        control.names, control.images, control.scales, control.starts, control.ends, strict=True
    ):
        image = _repeat_for_batch(image, request)
        if request.do_cfg and not guess:
            image = np.concatenate([image, image])
        spec = section.get(name)
        assert spec is not None
        nets.append(_Net(spec.component, image, scale, start, end))
    return ControlState(run, section.unet, specs, nets, guess)


def _repeat_for_batch(image: np.ndarray, request: GenerationRequest) -> np.ndarray:
    """diffusers' prepare_image: one image -> every output; one per prompt -> repeat_interleave."""
    repeat = request.batch if image.shape[0] == 1 else request.num_images_per_prompt
    return np.repeat(image, repeat, axis=0)
