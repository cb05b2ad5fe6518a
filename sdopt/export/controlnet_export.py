"""Export an artifact's ControlNets and the U-Net graph that takes their residuals.

Called by `sdopt.export.artifact.export_artifact` (two hook lines) after the plain components:

- `controlnet/<name>/model.onnx` per ControlNet (+ its diffusers config.json);
- `unet/control.onnx`: the U-Net with residual inputs. It stores no second copy of the U-Net
  weights: unet/model.onnx is re-saved with its weights in unet/model.onnx.data and the
  control graph points at the same bytes (`sdopt.export.shared_weights`). unet/model.onnx
  keeps its plain interface (Optimum reads it).

Every graph is verified against PyTorch like the other components; the errors go to the
manifest. The residual U-Net gets no saved ONNX Runtime-optimised copy (that would be a second
copy of the weights on disk); its session optimises at load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError
from sdopt.export import onnx_graph
from sdopt.export.components import ComponentPlan, plan_components, probe_dims, vae_scale
from sdopt.export.controlnet import LoadedControlNet, control_plans, load_controlnet, parse_sources
from sdopt.export.shared_weights import DATA_NAME, SharingReport, externalize, share_weights
from sdopt.export.verify import TOLERANCE, verify_component
from sdopt.manifest import Component, ControlNetSection, ControlNetSpec, ImageSpec, TensorSpec, sha256_file

Progress = Callable[[str, str, str], None]
UNET_CONTROL = "unet_control"
UNET_CONTROL_PATH = "unet/control.onnx"


def prepare_controlnets(specs: list[str], model: Any, names: list[str], opts: Any) -> list[LoadedControlNet]:
    """Parse, load and check every `--controlnet` before anything is exported (fail in seconds).

    Args:
        specs: the `--controlnet` values (empty: no ControlNet).
        model: the LoadedModel being exported.
        names: the components this export writes.
        opts: the ExportOptions.
    Returns:
        The loaded ControlNets, in order.
    """
    if not specs:
        return []
    if "unet" not in names:
        raise SdoptError("ControlNets need the U-Net in the export", "drop --components, or include unet in it")
    if opts.exporter != "torchscript":
        raise SdoptError("ControlNet export supports the torchscript exporter only", "drop --exporter dynamo")
    channels, latent = model.pipe.unet.config.in_channels, model.pipe.vae.config.latent_channels
    if channels != latent:  # the ControlNet graph takes the U-Net's `sample`: latents only, not mask + masked image
        raise SdoptError(
            f"ControlNet with a {channels}-channel (inpainting) U-Net is not supported: sdopt exports "
            f"ControlNets only for U-Nets that take the {latent} latent channels",
            "export the base (non-inpainting) model with --controlnet: it inpaints with ControlNet through its "
            "own U-Net (image= + mask_image= + control_image=)",
        )
    return [load_controlnet(src, model.pipe, model.family, opts.seed) for src in parse_sources(specs)]


def export_controlnets(
    nets: list[LoadedControlNet],
    model: Any,
    root: Path,
    image: ImageSpec,
    opts: Any,
    tolerance: float,
    components: dict[str, Component],
    progress: Progress,
) -> tuple[ControlNetSection | None, list[str]]:
    """Export the residual U-Net and each ControlNet into `root` and add them to `components`.

    Args:
        nets: from `prepare_controlnets`; nothing happens when empty.
        model: the LoadedModel; root: the (temporary) artifact folder, with unet/ already exported.
        image: the artifact's image spec; opts: the ExportOptions; tolerance: verification bound.
        components: the manifest's components so far (unet included); updated in place.
        progress: the export's progress callback.
    Returns:
        (the manifest's ControlNet section, verification failures as "component: detail" lines).
    """
    if not nets:
        return None, []
    pipe, family = model.pipe, model.family
    unet_plan = plan_components(pipe, family, image, ["unet_deep"])[0]  # outputs + deep_feature (fast mode)
    uplan, cplans, residuals = control_plans(pipe, family, unet_plan, nets, image)
    report = _export_control_unet(uplan, root, image, vae_scale(pipe), opts, tolerance, components, progress)
    specs = [
        _export_controlnet(net, plan, root, image, vae_scale(pipe), opts, tolerance, components, progress)
        for net, plan in zip(nets, cplans, strict=True)
    ]
    exported = [components[UNET_CONTROL], *(components[s.component] for s in specs)]
    failures = [
        f"{c.name}: max relative error {c.verification.max_rel_err:.2e} > {tolerance:.0e}"
        for c in exported
        if not c.verification.passed
    ]
    section = ControlNetSection(
        unet=UNET_CONTROL,
        residuals=[r.name for r in residuals],
        controlnets=specs,
        shared_weights=f"unet/{DATA_NAME}",
        shared_bytes=report.shared_bytes,
        own_bytes=report.own_bytes,
    )
    return section, failures


def _export_control_unet(
    uplan: ComponentPlan,
    root: Path,
    image: ImageSpec,
    scale: int,
    opts: Any,
    tolerance: float,
    components: dict[str, Component],
    progress: Progress,
) -> SharingReport:
    """`unet/control.onnx` over unet/model.onnx's weights (moved to unet/model.onnx.data, the
    unet component's hashes updated); added to `components`. Returns the weight-sharing report."""
    unet_path = root / "unet" / "model.onnx"
    data = externalize(unet_path)
    unet = components["unet"]  # its graph may now keep its weights in `data`: re-hash what changed
    unet.files = {rel: sha256_file(root / rel) for rel in sorted({*unet.files, str(data.relative_to(root))})}

    staging = root / "_controlnet_staging"
    shared = []

    def place(path: Path) -> Path:  # verified where it will be read: weights from unet/model.onnx.data
        shared.append(share_weights(unet_path, path, root / UNET_CONTROL_PATH))
        onnx_graph.remove(staging)
        return root / UNET_CONTROL_PATH

    comp = _export(uplan, staging / "model.onnx", root, image, scale, opts, tolerance, progress, place)
    comp.files = {UNET_CONTROL_PATH: sha256_file(root / UNET_CONTROL_PATH)}
    components[UNET_CONTROL] = comp
    return shared[0]


def _export_controlnet(
    net: LoadedControlNet,
    plan: ComponentPlan,
    root: Path,
    image: ImageSpec,
    scale: int,
    opts: Any,
    tolerance: float,
    components: dict[str, Component],
    progress: Progress,
) -> ControlNetSpec:
    """`controlnet/<name>/` (graph, optional ORT CPU copy, config.json); added to `components`."""
    folder = root / "controlnet" / net.name
    comp = _export(plan, folder / "model.onnx", root, image, scale, opts, tolerance, progress)
    if opts.ort_optimize:
        from sdopt.engines.ort import cpu_target, save_optimized

        save_optimized(folder / "model.onnx", folder / "model.ort-cpu.onnx")
        comp.ort_cpu_path, comp.ort_cpu_target = f"controlnet/{net.name}/model.ort-cpu.onnx", cpu_target()
    comp.files = {str(p.relative_to(root)): sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    net.model.save_config(folder)  # after hashing, like the other components' configs
    components[plan.name] = comp
    return ControlNetSpec(net.name, plan.name, net.source, int(net.model.config.conditioning_channels))


def _export(
    plan: ComponentPlan,
    path: Path,
    root: Path,
    image: ImageSpec,
    scale: int,
    opts: Any,
    tolerance: float,
    progress: Progress,
    place: Callable[[Path], Path] | None = None,
) -> Component:
    """Trace and clean one graph into `path` (its folder is created), move it with `place`
    (default: leave it), verify it where it ends; `files` are left for the caller."""
    t0 = time.perf_counter()
    raw_dir = path.parent / "_raw"
    raw_dir.mkdir(parents=True)
    small, opt = probe_dims(image, scale)
    progress(plan.name, "export", "")
    example = plan.example_inputs(small, opts.seed)
    onnx_graph.export_raw(plan, raw_dir / "model.onnx", example, opts.opset, opts.exporter)
    progress(plan.name, "clean", "")
    fp16_ops = None if opts.precision == "fp32" or plan.keep_fp32 else plan.fp32_ops
    onnx_graph.finalize(raw_dir / "model.onnx", path, fp16_ops)
    onnx_graph.remove(raw_dir)
    path = place(path) if place else path
    progress(plan.name, "verify", "")
    bound = tolerance if fp16_ops is not None else min(tolerance, TOLERANCE["fp32"])
    verification = verify_component(plan, path, [small, opt], bound, seed=opts.seed + 1)
    io_types = onnx_graph.graph_io(path)
    retype = lambda specs: [TensorSpec(s.name, io_types[s.name], s.shape) for s in specs]  # noqa: E731
    progress(plan.name, "done", f"{verification.max_abs_err:.2e} abs / {verification.max_rel_err:.2e} rel")
    precision = "fp16" if fp16_ops is not None else "fp32"
    return Component(
        name=plan.name,
        path=str(path.relative_to(root)),
        precision=precision,
        inputs=retype(plan.inputs),
        outputs=retype(plan.outputs),
        dims=plan.dims,
        verification=verification,
        fp32_ops=list(fp16_ops or []),
        export_seconds=round(time.perf_counter() - t0, 2),
    )
