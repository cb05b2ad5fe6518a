"""The `sdopt` command line: export, inspect, generate, bench, build.

Heavy libraries are imported inside the commands that need them, so `sdopt --help` and
`sdopt generate` stay fast and torch-free. Every SdoptError becomes one `error:` line and
exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdopt.errors import SdoptError

app = typer.Typer(
    help="Stable Diffusion from PyTorch/diffusers to verified ONNX and TensorRT, and a lean runtime to run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def friendly_errors(fn: Callable) -> Callable:
    """Turn SdoptError (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdoptError as e:
            err_console.print(f"[bold red]error:[/] {escape(e.problem)}" + (f"\n[dim]fix:[/] {escape(e.fix)}" if e.fix else ""),
                              highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
@friendly_errors
def export(
    model: str = typer.Argument("synthetic:tiny", help="synthetic:PRESET, a diffusers folder, a .safetensors file, or a hub id."),
    out: Path = typer.Option(Path("artifacts/tiny"), "--out", "-o", help="Artifact folder to write (atomically)."),
    precision: str = typer.Option("fp32", help="fp32, or fp16 (fp32 islands where fp16 overflows: VAE, norms)."),
    components: Optional[str] = typer.Option(None, help="Comma-separated subset, e.g. text_encoder,unet. Default: all."),
    min_size: Optional[int] = typer.Option(None, help="Smallest image side the graphs accept (pixels)."),
    max_size: Optional[int] = typer.Option(None, help="Largest image side the graphs accept (pixels)."),
    max_batch: int = typer.Option(4, help="Most images per call (the U-Net sees twice this for guidance)."),
    opset: int = typer.Option(18, help="ONNX opset."),
    exporter: str = typer.Option("torchscript", help="torchscript (fast, fusable) or dynamo (torch.export)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_verify_failure: bool = typer.Option(False, help="Keep the export even if ONNX differs from PyTorch beyond tolerance."),
    seed: int = typer.Option(0, help="Seed of synthetic weights and of verification inputs."),
    backend: str = typer.Option("onnx", help="onnx, or tensorrt to also build engines (default dynamic profiles; see `sdopt build`)."),
    ort_optimize: bool = typer.Option(True, help="Also save ONNX Runtime's optimised CPU graph (sessions start in seconds)."),
) -> None:
    """Export a Stable Diffusion model to verified ONNX in one artifact folder."""
    from sdopt.export.artifact import ExportOptions, check_options

    opts = ExportOptions(precision=precision, components=_split(components), min_size=min_size, max_size=max_size,
                         max_batch=max_batch, opset=opset, exporter=exporter, force=force,
                         allow_verify_failure=allow_verify_failure, seed=seed, ort_optimize=ort_optimize)
    check_options(out.expanduser().resolve(), opts)  # fail before the slow imports
    if backend not in ("onnx", "tensorrt"):
        raise SdoptError(f"unknown backend {backend!r}", "use onnx or tensorrt")
    if backend == "tensorrt":  # fail in seconds, not after the export
        from sdopt.export.tensorrt_build import BuildOptions, preflight

        preflight()
    from sdopt.export.artifact import export_artifact
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    stages = {"export": "tracing to ONNX", "clean": "folding / shape inference", "verify": "verifying vs PyTorch",
              "optimize": "saving ONNX Runtime's optimised CPU graph"}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=False) as bar:
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

        result = export_artifact(model, out, opts, progress)
    _print_components(result.manifest)
    console.print(f"wrote [bold]{result.out}[/] in {result.seconds:.1f} s (model load {result.load_seconds:.1f} s)")
    if backend == "tensorrt":
        _build(result.out, BuildOptions())


@app.command()
@friendly_errors
def build(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `sdopt export` (fp16 export for fp16 engines)."),
    static: bool = typer.Option(False, "--static", help="One fixed batch and size (fastest); default: the exported ranges."),
    batch: Optional[int] = typer.Option(None, help="Images per call (static), or the profile's opt batch (dynamic)."),
    height: Optional[int] = typer.Option(None, help="Image height (static), or the profile's opt height."),
    width: Optional[int] = typer.Option(None, help="Image width (static), or the profile's opt width."),
    opt_level: int = typer.Option(3, help="TensorRT builder optimization level 0..5."),
    workspace_gb: Optional[float] = typer.Option(None, help="Workspace memory pool limit in GiB."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file (default ARTIFACT/engines/timing.cache)."),
    refittable: bool = typer.Option(False, "--refittable", help="Engines whose weights can be refitted (LoRA)."),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="Engines for later TensorRT versions (embed host code)."),
    exclude_lean_runtime: bool = typer.Option(False, "--exclude-lean-runtime", help="With --version-compatible: smaller plans."),
    components: Optional[str] = typer.Option(None, help="Comma-separated subset. Default: all."),
    force: bool = typer.Option(False, "--force", help="Rebuild engines that exist for this GPU and TensorRT version."),
) -> None:
    """Build TensorRT engines from an artifact's ONNX (strongly typed; needs tensorrt and a GPU)."""
    from sdopt.export.tensorrt_build import BuildOptions

    _build(artifact, BuildOptions(static=static, batch=batch, height=height, width=width, opt_level=opt_level,
                                  workspace_gb=workspace_gb, timing_cache=timing_cache, refittable=refittable,
                                  version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime,
                                  components=_split(components), force=force))


def _build(artifact: Path, options) -> None:
    from sdopt.export.tensorrt_build import build_engines, check_build_options

    check_build_options(options)
    with console.status("building TensorRT engines") as status:
        entries = build_engines(artifact, options, lambda c, stage, d: status.update(f"{c}: {stage} {d}"))
    table = Table("component", "engine", "TensorRT", "GPU", "build s")
    for e in entries:
        table.add_row(e["component"], e["path"], e["tensorrt"], e["gpu"], f"{e.get('build_seconds', 0):.1f}")
    console.print(table)


@app.command()
@friendly_errors
def inspect(artifact: Path = typer.Argument(..., help="Artifact folder written by `sdopt export`."),
            verify: bool = typer.Option(False, "--verify", help="Also check every file's sha256.")) -> None:
    """Print an artifact's manifest readably."""
    from sdopt.manifest import load_manifest, verify_files

    m = load_manifest(artifact)
    console.print(f"[bold]{artifact}[/]: {m.family} ({m.prediction_type}) from {m.source.get('kind')} "
                  f"{m.source.get('id')}, {m.precision}, opset {m.opset}, {m.exporter} exporter, created {m.created}")
    console.print(f"images {m.image.min_size}..{m.image.max_size} px (multiple of {m.image.multiple}, default "
                  f"{m.image.default_height}x{m.image.default_width}), batch <= {m.image.max_batch}; VAE scaling "
                  f"{m.vae.scaling_factor}, text length {m.text_max_length}")
    io = Table("component", "inputs", "outputs", "dims")
    for c in m.components.values():
        fmt = lambda specs: "\n".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in specs)  # noqa: E731
        io.add_row(c.name, fmt(c.inputs), fmt(c.outputs),
                   "\n".join(f"{k} {d.min}..{d.max} (opt {d.opt})" for k, d in c.dims.items()))
    console.print(io)
    _print_components(m)
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    for e in m.engines:
        console.print(f"engine: {e}")
    if verify:
        verify_files(artifact, m)
        console.print("[green]all file hashes match[/]")


@app.command()
@friendly_errors
def generate(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `sdopt export`."),
    prompt: str = typer.Argument(..., help="What to draw."),
    out: Path = typer.Option(Path("out.png"), "--out", "-o", help="Image file; with --batch N: out-0.png ... out-(N-1).png."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt."),
    steps: int = typer.Option(30, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale (1.0 turns guidance off)."),
    seed: Optional[int] = typer.Option(None, help="Seed (printed when drawn at random)."),
    scheduler: Optional[str] = typer.Option(None, help="ddim, euler, euler-a, dpm++2m, dpm++2m-karras, lcm, pndm, unipc. Default: the model's own."),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the artifact's)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the artifact's)."),
    batch: int = typer.Option(1, help="Images to generate."),
    image: Optional[Path] = typer.Option(None, help="Init image for img2img (or the image to inpaint with --mask)."),
    strength: Optional[float] = typer.Option(None, help="img2img/inpaint strength in (0, 1]."),
    mask: Optional[Path] = typer.Option(None, help="Inpainting mask: white = repaint."),
    provider: str = typer.Option("cpu", help="cpu, cuda (onnxruntime-gpu) or tensorrt."),
    fast: bool = typer.Option(False, "--fast", help="Fast mode: DeepCache with a full U-Net pass every 3 steps (see --deepcache)."),
    deepcache: int = typer.Option(1, help="Full U-Net pass every N steps, the last layer only between (1 = exact)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="TensorRT: replay the U-Net as a CUDA graph (static shapes)."),
    allow_host_code: bool = typer.Option(False, "--allow-host-code", help="TensorRT: trust version-compatible engines' embedded code."),
) -> None:
    """Generate images from an artifact with the lean runtime (no torch)."""
    import time
    import warnings

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    t0 = time.perf_counter()
    from sdopt.runtime import Pipeline

    trt_options = {"use_cuda_graph": cuda_graph, "allow_host_code": allow_host_code} if provider == "tensorrt" else {}
    pipe = Pipeline.load(artifact, provider=provider, **trt_options)
    load_s = time.perf_counter() - t0
    with Progress("denoising", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = bar.add_task("steps", total=None)
        result = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                      height=height, width=width, num_images_per_prompt=batch, seed=seed, scheduler=scheduler,
                      image=image, mask_image=mask, strength=strength, deepcache=3 if fast and deepcache == 1 else deepcache,
                      callback=lambda done, total: bar.update(task, completed=done, total=total))
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(result.images))]
    for im, path in zip(result.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    t = result.timings
    console.print(f"seed {result.seed}; wrote {', '.join(map(str, paths))}")
    console.print(f"load {load_s:.2f} s, text encoder {t['text_encoder']:.2f} s, U-Net {t['unet']:.2f} s "
                  f"({t['unet_per_step'] * 1000:.0f} ms/step), VAE decode {t['vae_decoder']:.2f} s, total {t['total']:.2f} s")


def _print_components(m) -> None:
    table = Table("component", "precision", "export s", "max abs err", "max rel err", "tolerance", "verified")
    for c in m.components.values():
        v = c.verification
        table.add_row(c.name, c.precision, f"{c.export_seconds:.1f}", f"{v.max_abs_err:.2e}", f"{v.max_rel_err:.2e}",
                      f"{v.tolerance:.0e}", "[green]ok[/]" if v.passed else "[red]FAILED[/]")
    console.print(table)



def _register_bench() -> None:
    """`sdopt bench` lives in sdopt.bench (its workers import torch lazily)."""
    from sdopt.bench.command import bench_command

    app.command("bench")(friendly_errors(bench_command))


_register_bench()
