"""`sdopt export`, `sdopt build` and `sdopt inspect`: making and reading artifact folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich import box
from rich.table import Table

from sdopt.cli.common import app, console, friendly_errors, split_list

if TYPE_CHECKING:
    from sdopt.export.artifact import ExportOptions, ExportResult
    from sdopt.export.tensorrt_build import BuildOptions
    from sdopt.manifest import EngineEntry


# Help texts too long to keep their option on one line.
_MODEL_HELP = "synthetic:PRESET, a diffusers folder, a .safetensors file, or a hub id."
_PRECISION_HELP = "fp32, or fp16 (fp32 islands where fp16 overflows: VAE, norms)."
_COMPONENTS_HELP = "Comma-separated subset, e.g. text_encoder,unet. Default: all."
_MAX_BATCH_HELP = "Most images per call (the U-Net sees twice this for guidance)."
_EXPORTER_HELP = "torchscript (fast, fusable) or dynamo (torch.export)."
_ALLOW_VERIFY_FAILURE_HELP = "Keep the export even if ONNX differs from PyTorch beyond tolerance."
_TENSORRT_HELP = (
    "Also build TensorRT engines (dynamic profiles over the exported range; needs a GPU "
    "host with the tensorrt-cuXX extra; see `sdopt build` for the options)."
)
_ORT_OPTIMIZE_HELP = "Also save ONNX Runtime's optimised CPU graph (sessions start in seconds)."
_CONTROLNET_HELP = (
    "ControlNets to export with the model, comma-separated: a diffusers ControlNetModel "
    "folder, a hub id, or synthetic[:SEED] (random weights, derived from the U-Net); NAME=SOURCE names one "
    "(default name: the folder's). Adds controlnet/NAME/model.onnx and unet/control.onnx (shares the U-Net's "
    "weights)."
)
_LORA_HELP = (
    "Merge a LoRA PATH[:SCALE] (.safetensors, diffusers/PEFT or kohya) into the weights "
    "before export; repeat to stack. The manifest records each file's sha256 and scale."
)
_LORA_IGNORE_HELP = "Merge a LoRA's other keys where some match no module of the model."


@app.command()
@friendly_errors
def export(
    model: str = typer.Argument("synthetic:tiny", help=_MODEL_HELP),
    out: Path = typer.Option(Path("artifacts/tiny"), "--out", "-o", help="Artifact folder to write (atomically)."),
    precision: str = typer.Option("fp32", help=_PRECISION_HELP),
    components: Optional[str] = typer.Option(None, help=_COMPONENTS_HELP),
    min_size: Optional[int] = typer.Option(None, help="Smallest image side the graphs accept (pixels)."),
    max_size: Optional[int] = typer.Option(None, help="Largest image side the graphs accept (pixels)."),
    max_batch: int = typer.Option(4, help=_MAX_BATCH_HELP),
    opset: int = typer.Option(18, help="ONNX opset."),
    exporter: str = typer.Option("torchscript", help=_EXPORTER_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_verify_failure: bool = typer.Option(False, help=_ALLOW_VERIFY_FAILURE_HELP),
    seed: int = typer.Option(0, help="Seed of synthetic weights and of verification inputs."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help=_TENSORRT_HELP),
    ort_optimize: bool = typer.Option(True, help=_ORT_OPTIMIZE_HELP),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help=_CONTROLNET_HELP),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help=_LORA_HELP),
    lora_ignore_unmatched: bool = typer.Option(False, "--lora-ignore-unmatched", help=_LORA_IGNORE_HELP),
) -> None:
    """Export a Stable Diffusion model to verified ONNX in one artifact folder."""
    from sdopt.export.artifact import ExportOptions, check_options

    opts = ExportOptions(
        precision=precision,
        components=split_list(components),
        min_size=min_size,
        max_size=max_size,
        max_batch=max_batch,
        opset=opset,
        exporter=exporter,
        force=force,
        allow_verify_failure=allow_verify_failure,
        seed=seed,
        ort_optimize=ort_optimize,
        controlnets=split_list(controlnet) or [],
    )
    check_options(out.expanduser().resolve(), opts)  # fail before the slow imports
    _add_loras(opts, lora or [], lora_ignore_unmatched)
    if tensorrt:  # fail in seconds, not after the export
        from sdopt.export.tensorrt_build import BuildOptions, preflight

        preflight()
    result = _export_with_progress(model, out, opts)
    _print_components(result.manifest)
    console.print(f"wrote [bold]{result.out}[/] in {result.seconds:.1f} s (model load {result.load_seconds:.1f} s)")
    if tensorrt:
        _build(result.out, BuildOptions())


def _add_loras(opts: ExportOptions, lora: list[str], ignore_unmatched: bool) -> None:
    """LoRA files to merge: a missing or pickle file fails now, not after the model load."""
    if not lora:
        return
    from sdopt.lora.files import parse_lora_arg, read_lora_file

    opts.loras = [parse_lora_arg(text) for text in lora]
    opts.lora_ignore_unmatched = ignore_unmatched
    for spec in opts.loras:
        read_lora_file(spec.path)


def _export_with_progress(model: str, out: Path, opts: ExportOptions) -> ExportResult:
    """`export_artifact` with one progress line per component and stage."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from sdopt.export.artifact import export_artifact

    stages = {
        "export": "tracing to ONNX",
        "clean": "folding / shape inference",
        "verify": "verifying vs PyTorch",
        "optimize": "saving ONNX Runtime's optimised CPU graph",
    }
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as bar:
        tasks: dict[str, int] = {}
        load = bar.add_task(f"loading {model}", total=None)

        def progress(component: str, stage: str, detail: str) -> None:
            if load in bar.task_ids and not bar.tasks[load].finished:
                bar.update(load, description=f"loaded {model}", total=1, completed=1)
            if component not in tasks:
                tasks[component] = bar.add_task(component, total=None)
            if stage == "done":
                bar.update(tasks[component], description=f"{component}: verified ({detail})", total=1, completed=1)
            else:
                bar.update(tasks[component], description=f"{component}: {stages[stage]}")

        return export_artifact(model, out, opts, progress)


@app.command()
@friendly_errors
def build(
    artifact: Path = typer.Argument(
        ..., help="Artifact folder written by `sdopt export` (fp16 export for fp16 engines)."
    ),
    static: bool = typer.Option(
        False, "--static", help="One fixed batch and size (fastest); default: the exported ranges."
    ),
    batch: Optional[int] = typer.Option(None, help="Images per call (static), or the profile's opt batch (dynamic)."),
    height: Optional[int] = typer.Option(None, help="Image height (static), or the profile's opt height."),
    width: Optional[int] = typer.Option(None, help="Image width (static), or the profile's opt width."),
    opt_level: int = typer.Option(3, help="TensorRT builder optimization level 0..5."),
    workspace_gb: Optional[float] = typer.Option(None, help="Workspace memory pool limit in GiB."),
    timing_cache: Optional[Path] = typer.Option(
        None,
        help="Timing cache file (default: timing.cache in the engines' own folder, one per GPU model and "
        "TensorRT version).",
    ),
    refittable: bool = typer.Option(
        False,
        "--refittable",
        help="BuilderFlag.REFIT: engine weights can be replaced later without a rebuild "
        "(LoRA). TensorRT 11.3 lists a known issue: such engines may drop a GEMM bias "
        "even when never refitted.",
    ),
    version_compatible: bool = typer.Option(
        False,
        "--version-compatible",
        help="Engines that also load in later TensorRT of the same major or the next "
        "(10 -> 11); they embed host code, so loading needs --allow-host-code.",
    ),
    tf32: bool = typer.Option(
        True,
        "--tf32/--no-tf32",
        help="Let fp32 matmuls and convolutions round inputs to TF32 (TensorRT's default "
        "on Ampere and newer); --no-tf32 for full fp32.",
    ),
    components: Optional[str] = typer.Option(None, help="Comma-separated subset. Default: all."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that exist for this GPU and TensorRT version."),
) -> None:
    """Build TensorRT engines from an artifact's ONNX (strongly typed; needs tensorrt and a GPU)."""
    from sdopt.export.tensorrt_build import BuildOptions

    _build(
        artifact,
        BuildOptions(
            static=static,
            batch=batch,
            height=height,
            width=width,
            opt_level=opt_level,
            workspace_gb=workspace_gb,
            timing_cache=timing_cache,
            refittable=refittable,
            version_compatible=version_compatible,
            tf32=tf32,
            components=split_list(components),
            force=force,
        ),
    )


def _build(artifact: Path, options: BuildOptions) -> None:
    from sdopt.export.tensorrt_build import build_engines, check_build_options

    check_build_options(options)
    with console.status("building TensorRT engines") as status:
        entries = build_engines(artifact, options, lambda c, stage, d: status.update(f"{c}: {stage} {d}"))
    console.print(_engine_table(entries))


def _engine_table(entries: list[EngineEntry]) -> Table:
    """One row per manifest EngineEntry: what it is for, how it was built, its profile."""
    table = Table("component", "engine", "TensorRT", "GPU (sm)", "flags", "profile (min..max)", "MB", "build s")
    for e in entries:
        f = e.flags
        flags = [
            name
            for name, on in (
                ("static", f.static),
                ("refittable", f.refittable),
                ("version-compatible", f.version_compatible),
                ("no-tf32", not f.tf32),
                ("excludes-lean-runtime", f.exclude_lean_runtime),
            )
            if on
        ]
        profile = "\n".join(f"{k} {r.min}..{r.max}" for k, r in (e.profiles[0].items() if e.profiles else []))
        table.add_row(
            e.component,
            e.path,
            e.tensorrt,
            f"{e.gpu} ({e.compute_capability})",
            ", ".join(flags + [f"opt {f.opt_level}"]),
            profile,
            f"{e.bytes / 2**20:.1f}",
            f"{e.build_seconds:.1f}",
        )
    return table


@app.command()
@friendly_errors
def inspect(
    artifact: Path = typer.Argument(
        ..., help="Artifact folder written by `sdopt export`, or an `optimum-cli export onnx` folder."
    ),
    verify: bool = typer.Option(False, "--verify", help="Also check every file's sha256."),
) -> None:
    """Print an artifact's manifest readably."""
    from sdopt.manifest import load_manifest, verify_files

    m = load_manifest(artifact)
    console.print(
        f"[bold]{artifact}[/]: {m.family} ({m.prediction_type}) from {m.source.get('kind')} "
        f"{m.source.get('id')}, {m.precision}, opset {m.opset}, {m.exporter} exporter, created {m.created}"
    )
    size = "any size" if m.image.min_size is None else f"{m.image.min_size}..{m.image.max_size} px"
    batch = "batch not recorded" if m.image.max_batch is None else f"batch <= {m.image.max_batch}"
    console.print(
        f"images {size} (multiple of {m.image.multiple}, default {m.image.default_height}x"
        f"{m.image.default_width}), {batch}; VAE scaling {m.vae.scaling_factor}, "
        f"text length {m.text_max_length}"
    )
    if m.source.get("kind") == "optimum":
        console.print(
            "an Optimum ONNX export: verification errors, file hashes, the size range and the maximum "
            "batch are not recorded there (shown as —)"
        )
    io = Table("component", "inputs", "outputs", "dims")
    io.columns[0].no_wrap = True  # names are never cut: the other columns wrap instead
    for c in m.components.values():
        fmt = lambda specs: "\n".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in specs)  # noqa: E731
        io.add_row(
            c.name,
            fmt(c.inputs),
            fmt(c.outputs),
            "\n".join(f"{k} {d.min}..{d.max} (opt {d.opt})" for k, d in c.dims.items()),
        )
    console.print(io)
    _print_components(m)
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    if m.controlnet:  # ControlNet section (issue 15)
        cn = m.controlnet
        console.print(
            "ControlNets: "
            + ", ".join(f"{c.name} ({c.source.get('kind')} {c.source.get('id')})" for c in cn.controlnets)
            + f"; residual U-Net {m.components[cn.unet].path} reads {cn.shared_bytes / 2**20:.1f} MiB of "
            f"weights from {cn.shared_weights} and stores {cn.own_bytes / 2**20:.2f} MiB itself"
        )
    if m.engines:
        console.print(_engine_table(m.engines))
    if verify:
        verify_files(artifact, m)
        hashed = any(c.files for c in m.components.values())
        console.print("[green]all file hashes match[/]" if hashed else "no file hashes recorded: nothing to verify")


def _print_components(m) -> None:
    """The per-component verification summary; fits an 80-column terminal without cutting names."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("component", no_wrap=True, min_width=max(len(c) for c in m.components))
    for header in ("precision", "export\nseconds", "max abs\nerr", "max rel\nerr", "tolerance", "verified"):
        table.add_column(header, no_wrap=True)
    for c in m.components.values():
        v = c.verification
        if v is None:  # not recorded (an Optimum export): absent, not invented
            table.add_row(c.name, c.precision, "—", "—", "—", "—", "—")
            continue
        table.add_row(
            c.name,
            c.precision,
            f"{c.export_seconds:.1f}",
            f"{v.max_abs_err:.2e}",
            f"{v.max_rel_err:.2e}",
            f"{v.tolerance:.0e}",
            "[green]ok[/]" if v.passed else "[red]FAILED[/]",
        )
    console.print(table)
