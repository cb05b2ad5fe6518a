"""Write one self-describing artifact folder, atomically.

Everything is written into a hidden sibling folder `.NAME.partial-PID`; only when every
component is exported and verified is the manifest written and the folder renamed into
place. An interrupted or failed export leaves no folder that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdopt.errors import SdoptError
from sdopt.export import onnx_graph
from sdopt.export.components import ComponentPlan, plan_components, probe_dims, vae_scale
from sdopt.export.controlnet_export import export_controlnets, prepare_controlnets  # ControlNet hook (issue 15)
from sdopt.export.lora_merge import merge_loras
from sdopt.export.manifest_build import build_manifest, write_support_files
from sdopt.export.sources import LoadedModel, load_model
from sdopt.export.verify import TOLERANCE, verify_component
from sdopt.export.weight_map import lora_weight_map
from sdopt.manifest import (
    COMPONENTS,
    MANIFEST_NAME,
    UNET_DEEP_FILE,
    Component,
    ImageSpec,
    Manifest,
    TensorSpec,
    Verification,
    check_multiple,
    sha256_file,
)


@dataclass
class ExportOptions:
    precision: str = "fp32"  # fp32 | fp16
    components: list[str] | None = None  # None: every component the family has
    min_size: int | None = None  # None: the family's default range
    max_size: int | None = None
    max_batch: int = 4
    opset: int = 18
    exporter: str = "torchscript"
    force: bool = False
    allow_verify_failure: bool = False
    seed: int = 0
    tolerance: float | None = None  # None: TOLERANCE[precision]
    ort_optimize: bool = True  # also save ONNX Runtime's optimised CPU graph (fast session start)
    controlnets: list[str] = field(default_factory=list)  # ControlNet hook: --controlnet SOURCE / NAME=SOURCE
    loras: list = field(default_factory=list)  # LoRA: sdopt.lora.files.LoraSpec, merged before export
    lora_ignore_unmatched: bool = False


# Stage callback: (component, stage, detail), stage in {"export", "clean", "verify", "optimize", "done"}.
Progress = Callable[[str, str, str], None]


@dataclass
class ExportResult:
    manifest: Manifest
    out: Path
    seconds: float
    load_seconds: float
    failures: list[str] = field(default_factory=list)


def check_options(out: Path, opts: ExportOptions) -> None:
    """Everything checkable before loading a model (which can take minutes)."""
    if opts.precision not in TOLERANCE:
        raise SdoptError(f"unknown precision {opts.precision!r}", "use fp32 or fp16")
    if opts.exporter not in ("torchscript", "dynamo"):
        raise SdoptError(f"unknown exporter {opts.exporter!r}", "use torchscript or dynamo")
    for name in opts.components or []:
        if name not in COMPONENTS:
            raise SdoptError(f"unknown component {name!r}", f"choose from {', '.join(COMPONENTS)}")
    for label, size in (("--min-size", opts.min_size), ("--max-size", opts.max_size)):
        if size is not None:
            check_multiple(label, size, 8)
    if opts.min_size and opts.max_size and opts.min_size > opts.max_size:
        raise SdoptError(f"--min-size {opts.min_size} is larger than --max-size {opts.max_size}", "swap them")
    if opts.max_batch < 1:
        raise SdoptError(f"--max-batch {opts.max_batch} must be at least 1", "use --max-batch 1 or more")
    if out.exists() and not opts.force:
        raise SdoptError(f"output folder {out} already exists", "pass --force to replace it, or choose another --out")


def image_spec(model: LoadedModel, opts: ExportOptions) -> ImageSpec:
    scale = vae_scale(model.pipe)
    multiple = scale * 2 ** (len(model.pipe.unet.config.block_out_channels) - 1)
    lo, hi, default = model.size_range
    lo, hi = opts.min_size or lo, opts.max_size or hi
    for label, size in (("--min-size", lo), ("--max-size", hi)):
        check_multiple(label, size, multiple)  # VAE x scale, U-Net x multiple // scale
    if lo > hi:
        raise SdoptError(f"min size {lo} is larger than max size {hi}", "pass both --min-size and --max-size")
    default = min(max(default, lo), hi) // multiple * multiple
    return ImageSpec(lo, hi, multiple, default, default, opts.max_batch)


def export_artifact(model_id: str, out: Path, opts: ExportOptions, progress: Progress | None = None) -> ExportResult:
    out = Path(out).expanduser().resolve()
    check_options(out, opts)
    progress = progress or (lambda *_: None)
    t0 = time.perf_counter()
    model = load_model(model_id, seed=opts.seed)
    lora_records = merge_loras(model.pipe, opts.loras, opts.lora_ignore_unmatched)  # LoRA hook (lora_merge.py)
    load_seconds = time.perf_counter() - t0
    image = image_spec(model, opts)
    names = _component_names(model, opts)
    tolerance = opts.tolerance if opts.tolerance is not None else TOLERANCE[opts.precision]
    controlnets = prepare_controlnets(opts.controlnets, model, names, opts)  # ControlNet hook (issue 15)

    tmp = _staging_folder(out)
    try:
        components, failures = _export_components(model, names, tmp, image, opts, tolerance, progress)
        control, control_failures = export_controlnets(  # ControlNet hook (issue 15)
            controlnets, model, tmp, image, opts, tolerance, components, progress
        )
        failures += control_failures
        if failures and not opts.allow_verify_failure:
            raise SdoptError(
                "verification failed: " + "; ".join(failures),
                "inspect the model, or pass --allow-verify-failure to keep the export anyway",
            )
        manifest = build_manifest(model, image, opts, components)
        manifest.controlnet = control  # ControlNet hook (issue 15)
        manifest.loras = lora_records  # LoRA hook
        write_support_files(model, tmp, names)
        manifest.write(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(manifest, out, time.perf_counter() - t0, load_seconds, failures)


def _component_names(model: LoadedModel, opts: ExportOptions) -> list[str]:
    """The components to export, in COMPONENTS order, with those the requested ones need."""
    available = [c for c in COMPONENTS if c != "text_encoder_2" or model.family == "sdxl"]
    names = opts.components or available
    if "unet_shallow" in names and "unet_deep" not in names:  # fast mode needs the deep feature
        names = [*names, "unet_deep"]
    if "unet_deep" in names and "unet" not in names:  # the deep graph's weights are the plain graph's file
        names = [*names, "unet"]
    names = [c for c in COMPONENTS if c in names]
    missing = [c for c in names if c not in available]
    if missing:
        raise SdoptError(f"a {model.family} model has no {', '.join(missing)}", f"choose from {', '.join(available)}")
    return names


def _staging_folder(out: Path) -> Path:
    """A fresh, empty hidden sibling of `out` to write the artifact into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _export_components(
    model: LoadedModel,
    names: list[str],
    tmp: Path,
    image: ImageSpec,
    opts: ExportOptions,
    tolerance: float,
    progress: Progress,
) -> tuple[dict[str, Component], list[str]]:
    """Export every planned graph into `tmp`: (components in COMPONENTS order, verification failures)."""
    n_deep = names.count("unet_deep")
    components: dict[str, Component] = {}
    failures: list[str] = []
    for plan in plan_components(model.pipe, model.family, image, [n for n in names if n != "unet" or n_deep == 0]):
        if plan.name == "unet_deep":  # traced once: the plain unet graph shares its weights file
            comp = _export_component(
                plan,
                tmp,
                image,
                vae_scale(model.pipe),
                opts,
                tolerance,
                progress,
                folder="unet",
                filename=UNET_DEEP_FILE,
                weights=onnx_graph.EXTERNAL_DATA,
            )
            components["unet"] = _plain_unet(comp, tmp)
        else:
            comp = _export_component(plan, tmp, image, vae_scale(model.pipe), opts, tolerance, progress)
        components[plan.name] = comp
        if not comp.verification.passed:
            failures.append(f"{plan.name}: max relative error {comp.verification.max_rel_err:.2e} > {tolerance:.0e}")
    return {name: components[name] for name in names}, failures  # manifest order: COMPONENTS order


def _export_component(
    plan: ComponentPlan,
    root: Path,
    image: ImageSpec,
    scale: int,
    opts: ExportOptions,
    tolerance: float,
    progress: Progress,
    folder: str | None = None,
    filename: str = "model.onnx",
    weights: str | None = None,
) -> Component:
    """Export, clean, verify and (optionally) ORT-optimise one graph into `root/folder/filename`;
    `weights`: always keep the weights in that external data file (shared by several graphs)."""
    t0 = time.perf_counter()
    folder_path = root / (folder or plan.name)
    path = folder_path / filename
    small, opt = probe_dims(image, scale)
    fp16_ops = _trace_and_clean(plan, path, small, opts, progress, weights)
    progress(plan.name, "verify", "")
    verification = verify_component(
        plan,
        path,
        [small, opt],
        tolerance if fp16_ops is not None else min(tolerance, TOLERANCE["fp32"]),
        seed=opts.seed + 1,
    )
    ort_cpu = _save_ort_cpu(plan, path, root, opts, progress)
    comp = _component_record(plan, path, root, fp16_ops, verification, ort_cpu, t0)
    progress(plan.name, "done", f"{verification.max_abs_err:.2e} abs / {verification.max_rel_err:.2e} rel")
    return comp


def _trace_and_clean(
    plan: ComponentPlan,
    path: Path,
    small: dict[str, int],
    opts: ExportOptions,
    progress: Progress,
    weights: str | None,
) -> list[str] | None:
    """Trace the raw graph beside `path`, clean it into `path`; the fp32 op list of fp16 mode (None: fp32)."""
    raw_dir = path.parent / f"_raw-{plan.name}"
    raw_dir.mkdir(parents=True)
    progress(plan.name, "export", "")
    onnx_graph.export_raw(
        plan, raw_dir / "model.onnx", plan.example_inputs(small, opts.seed), opts.opset, opts.exporter
    )
    progress(plan.name, "clean", "")
    fp16_ops = None if opts.precision == "fp32" or plan.keep_fp32 else plan.fp32_ops
    onnx_graph.finalize(raw_dir / "model.onnx", path, fp16_ops, location=weights)
    onnx_graph.remove(raw_dir)
    return fp16_ops


def _save_ort_cpu(
    plan: ComponentPlan, path: Path, root: Path, opts: ExportOptions, progress: Progress
) -> tuple[str | None, str | None]:
    """With `ort_optimize`, save ONNX Runtime's optimised CPU graph beside `path`: (its path, its CPU target)."""
    if not opts.ort_optimize:
        return None, None
    progress(plan.name, "optimize", "")
    from sdopt.engines.ort import cpu_target, save_optimized

    ort_path = path.with_name(path.stem + ".ort-cpu.onnx")
    save_optimized(path, ort_path)
    return str(ort_path.relative_to(root)), cpu_target()


def _component_record(
    plan: ComponentPlan,
    path: Path,
    root: Path,
    fp16_ops: list[str] | None,
    verification: Verification,
    ort_cpu: tuple[str | None, str | None],
    t0: float,
) -> Component:
    """The manifest entry of the graph at `path`: typed I/O, hashes of its folder's files, LoRA weight map."""
    weight_refs = lora_weight_map(plan, path)  # LoRA hook (sdopt/export/weight_map.py)
    io_types = onnx_graph.graph_io(path)
    retype = lambda specs: [TensorSpec(s.name, io_types[s.name], s.shape) for s in specs]  # noqa: E731
    files = {str(p.relative_to(root)): sha256_file(p) for p in sorted(path.parent.iterdir()) if p.is_file()}
    return Component(
        name=plan.name,
        path=str(path.relative_to(root)),
        precision="fp16" if fp16_ops is not None else "fp32",
        inputs=retype(plan.inputs),
        outputs=retype(plan.outputs),
        dims=plan.dims,
        files=files,
        verification=verification,
        fp32_ops=list(fp16_ops or []),
        export_seconds=round(time.perf_counter() - t0, 2),
        ort_cpu_path=ort_cpu[0],
        ort_cpu_target=ort_cpu[1],
        aliases=dict(plan.aliases),
        weights=weight_refs,
    )


def _plain_unet(deep: Component, root: Path) -> Component:
    """`unet/model.onnx`: the deep U-Net graph without its `deep_feature` output (Optimum's
    interface), over the same weights file; verified as the deep graph's `out_sample`."""
    path = root / "unet" / "model.onnx"
    onnx_graph.drop_outputs(root / deep.path, path, ["deep_feature"])
    weights = str(path.with_name(onnx_graph.EXTERNAL_DATA).relative_to(root))
    v = deep.verification
    own = v.per_output["out_sample"]
    verification = Verification(
        own["max_abs_err"], own["max_rel_err"], v.tolerance, own["max_rel_err"] <= v.tolerance, {"out_sample": own}
    )
    return dataclasses.replace(
        deep,
        name="unet",
        path=str(path.relative_to(root)),
        outputs=deep.outputs[:1],
        files={str(path.relative_to(root)): sha256_file(path), weights: deep.files[weights]},
        verification=verification,
        ort_cpu_path=None,
        ort_cpu_target=None,
    )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` so that at no moment does a half-written `out` exist."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["ExportOptions", "ExportResult", "export_artifact", "check_options", "MANIFEST_NAME"]
