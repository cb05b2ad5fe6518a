"""`sdopt bench`: the typer command function (registered in sdopt/cli/__init__.py).

The options live in sdopt/bench/options.py (type, flag, help); each is named after its BenchConfig
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

from sdopt.bench.options import (
    Backends,
    Batch,
    CacheDir,
    ClipModel,
    Compile,
    Config,
    ControlImage,
    Controlnet,
    ControlScale,
    Deepcache,
    Fast,
    Guidance,
    Height,
    InceptionWeights,
    Latents,
    MaxFidDelta,
    MinClipScore,
    Model,
    NegativePrompt,
    Out,
    Precision,
    Prompt,
    Prompts,
    Protocol,
    Quality,
    RefImages,
    RefStats,
    Runs,
    Scheduler,
    Seed,
    ServerApiKeyEnv,
    ServerQps,
    ServerTargetS,
    ServerUrl,
    Steps,
    Threads,
    Warmup,
    Width,
)

NOT_CONFIG = ("config", "out", "cache_dir")  # options that are not BenchConfig fields


def bench_command(
    model: Model = None,
    backends: Backends = None,
    runs: Runs = None,
    warmup: Warmup = None,
    steps: Steps = None,
    height: Height = None,
    width: Width = None,
    batch: Batch = None,
    guidance: Guidance = None,
    scheduler: Scheduler = None,
    prompt: Prompt = None,
    negative_prompt: NegativePrompt = None,
    seed: Seed = None,
    threads: Threads = None,
    compile: Compile = None,
    fast: Fast = None,
    deepcache: Deepcache = None,
    precision: Precision = None,
    controlnet: Controlnet = None,
    control_image: ControlImage = None,
    control_scale: ControlScale = None,
    quality: Quality = None,
    prompts: Prompts = None,
    ref_images: RefImages = None,
    ref_stats: RefStats = None,
    inception_weights: InceptionWeights = None,
    clip_model: ClipModel = None,
    latents: Latents = None,
    max_fid_delta: MaxFidDelta = None,
    min_clip_score: MinClipScore = None,
    protocol: Protocol = None,
    server_qps: ServerQps = None,
    server_target_s: ServerTargetS = None,
    server_url: ServerUrl = None,
    server_api_key_env: ServerApiKeyEnv = None,
    config: Config = None,
    out: Out = None,
    cache_dir: CacheDir = None,
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
    _run(cfg, out, cache_dir, _command_line(locals_for_command(options.pop("model"), **options)))


def _run(cfg: Any, out: Optional[Path], cache_dir: Optional[Path], command: str) -> None:
    """Run, print the tables, and exit 1 when the quality gate failed."""
    from sdopt.bench import report
    from sdopt.bench.runner import run_benchmark

    console = Console()
    if not console.is_terminal:  # piped or logged: no terminal width to squeeze the table into
        console = Console(width=max(console.width, 150))

    def log(message: str) -> None:
        console.print(f"[dim]{escape(message)}[/]", highlight=False)

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
