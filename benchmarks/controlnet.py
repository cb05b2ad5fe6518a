"""ControlNet benchmark: diffusers (PyTorch) against the lean runtime, per stage, ControlNet as its own stage;
plus what the residual U-Net costs on disk and in memory.

    flock /tmp/sdopt-heavy.lock python benchmarks/controlnet.py [--model synthetic:sd15] [--size 256]
        [--steps 10] [--runs 2] [--out benchmarks/results/sd15-256-cpu-controlnet-DATE]

1. Exports MODEL with one synthetic ControlNet (`--controlnet synthetic`, seeded random weights:
   speed and memory do not depend on weight values) unless ARTIFACT exists.
2. Sizes: the U-Net's weights file, the residual U-Net graph (unet/control.onnx, which reads the
   same weights file), the ControlNet, the whole artifact.
3. Peak RSS of a fresh process that loads the artifact and generates one image: plain
   (`Pipeline.load(controlnet=False)`), with ControlNet (the default load: residual U-Net +
   ControlNet), and, for comparison only, a process that opens both U-Net graphs (what loading
   a second U-Net would cost).
4. Seconds per stage (text encoder, ControlNet, U-Net, VAE decode) of diffusers'
   StableDiffusionControlNetPipeline and of the runtime, same initial latents, both loaded in this
   process and run in turn (interleaved), median of `runs` after one warm-up each, and the max
   abs pixel difference of their images.

Results go to results.json and results.md in --out. Timings on a shared machine are noisy: the
ratio torch/runtime measured side by side is the robust number.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
STAGES = ("text_encoder", "controlnet", "unet", "vae_decoder")


def control_image(size: int):
    """A synthetic edge map (white lines on black), like a Canny ControlNet's input."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    edges = ((x + y) % 32 < 2) | ((x - y) % 48 < 2) | ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2)
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def export(model: str, out: Path) -> float:
    from sdopt.export.artifact import ExportOptions, export_artifact

    comps = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    t0 = time.perf_counter()
    export_artifact(model, out, ExportOptions(components=comps, controlnets=["synthetic"]))
    return time.perf_counter() - t0


def sizes(root: Path) -> dict[str, int]:
    def total(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    return {
        "unet/model.onnx.data (U-Net weights, shared)": (root / "unet/model.onnx.data").stat().st_size,
        "unet/model.onnx": (root / "unet/model.onnx").stat().st_size,
        "unet/control.onnx (residual U-Net)": (root / "unet/control.onnx").stat().st_size,
        "unet/model.ort-cpu.onnx* (ORT-optimised plain U-Net)": sum(
            p.stat().st_size for p in (root / "unet").glob("model.ort-cpu.onnx*")
        ),
        "controlnet/synthetic/ (ControlNet, with its ORT-optimised copy)": total(root / "controlnet/synthetic"),
        "artifact": total(root),
    }


RSS_CHILD = """
import sys, json
from PIL import Image
sys.path.insert(0, {bench!r})
from controlnet import control_image
from sdopt.runtime import Pipeline
mode, art, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = Pipeline.load(art, controlnet=mode != "plain")
if mode == "both-unets":  # comparison only: a second U-Net session next to the residual one
    pipe.sessions["unet"] = pipe.backend.load("unet")
kw = dict(num_inference_steps=2, height=size, width=size, seed=0)
if mode == "plain":
    pipe(PROMPT, **kw)
else:
    pipe(PROMPT, control_image=control_image(size), **kw)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # this process's own peak
print(json.dumps(int(hwm.split()[1]) * 1024))
""".replace("PROMPT", repr(PROMPT))


def peak_rss(root: Path, size: int) -> dict[str, int]:
    out = {}
    for mode in ("plain", "controlnet", "both-unets"):
        code = RSS_CHILD.format(bench=str(Path(__file__).parent))
        proc = subprocess.run(
            [sys.executable, "-c", code, mode, str(root), str(size)], capture_output=True, text=True, check=True
        )
        out[mode] = int(proc.stdout.strip().splitlines()[-1])
    return out


def torch_runner(model: str, size: int, steps: int, latents: np.ndarray) -> Callable[[], tuple[dict, np.ndarray]]:
    """diffusers' StableDiffusionControlNetPipeline with per-stage timers; returns one-run callable."""
    import diffusers
    import torch

    from sdopt.export.controlnet import synthetic_controlnet
    from sdopt.export.sources import load_model

    ref = load_model(model).pipe
    net = synthetic_controlnet(ref.unet, 0)  # the export's `synthetic` ControlNet (export seed 0)
    skip = ("safety_checker", "feature_extractor", "image_encoder")
    parts = {k: v for k, v in ref.components.items() if k not in skip}
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **parts, controlnet=net, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    spent: dict[str, float] = {}

    def timed(name: str, module) -> None:
        start: list[float] = []
        module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_: spent.__setitem__(name, spent.get(name, 0.0) + time.perf_counter() - start.pop())
        )

    for name, module in (
        ("text_encoder", pipe.text_encoder),
        ("controlnet", net),
        ("unet", pipe.unet),
        ("vae_decoder", pipe.vae.decoder),
    ):
        timed(name, module)

    def run() -> tuple[dict, np.ndarray]:
        spent.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            image = pipe(
                PROMPT,
                image=control_image(size),
                height=size,
                width=size,
                num_inference_steps=steps,
                latents=torch.from_numpy(latents),
                output_type="np",
            ).images
        return {**spent, "total": time.perf_counter() - t0}, image

    return run


def runtime_runner(root: Path, size: int, steps: int, latents: np.ndarray) -> Callable[[], tuple[dict, np.ndarray]]:
    """The runtime on the artifact (residual U-Net + ControlNet); returns a one-run callable."""
    from sdopt.runtime import Pipeline

    pipe = Pipeline.load(root)

    def run() -> tuple[dict, np.ndarray]:
        r = pipe(
            PROMPT,
            control_image=control_image(size),
            height=size,
            width=size,
            num_inference_steps=steps,
            latents=latents,
            seed=0,
            output_type="np",
        )
        return {k: r.timings[k] for k in (*STAGES, "total")}, r.images

    return run


def interleaved(runners: dict[str, Callable], runs: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """One warm-up each, then `runs` rounds of one run per backend in turn (so load from other
    jobs on the machine hits both alike); medians per stage."""
    times: dict[str, list[dict]] = {k: [] for k in runners}
    images: dict[str, np.ndarray] = {}
    for round_ in range(runs + 1):
        for name, run in runners.items():
            t, images[name] = run()
            if round_:
                times[name].append(t)
    return {k: _median(v) for k, v in times.items()}, images


TOGETHER_MAX_RSS = 9 << 30  # runtime + torch (~6 GiB for sd15) must fit in this shared machine's RAM


def timings(args: argparse.Namespace, latents: np.ndarray, together: bool) -> tuple[dict, dict]:
    """Both backends loaded and run in turn where memory allows, else one after the other."""
    if together:
        runners = {
            "runtime": runtime_runner(args.artifact, args.size, args.steps, latents),
            "torch": torch_runner(args.model, args.size, args.steps, latents),
        }
        return interleaved(runners, args.runs)
    medians, images = interleaved(
        {"runtime": runtime_runner(args.artifact, args.size, args.steps, latents)}, args.runs
    )
    gc.collect()
    more, more_images = interleaved({"torch": torch_runner(args.model, args.size, args.steps, latents)}, args.runs)
    return {**medians, **more}, {**images, **more_images}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}


def write_md(out: Path, res: dict) -> None:
    gib = 1 << 30
    lines = [
        f"# {res['name']}",
        "",
        res["description"],
        "",
        f"machine: {res['machine']}; {res['note']}; backends run "
        f"{'interleaved' if res['interleaved'] else 'one after the other'}",
        "",
        "## Seconds per image (median)",
        "",
        "| stage | torch (diffusers) | runtime (ONNX Runtime) | torch / runtime |",
        "|---|---:|---:|---:|",
    ]
    for stage in (*STAGES, "total"):
        t, r = res["torch"][stage], res["runtime"][stage]
        lines.append(f"| {stage} | {t:.3f} | {r:.3f} | {t / r:.2f}x |")
    lines += [
        "",
        f"max abs pixel difference torch vs runtime (same latents): {res['max_abs_pixel_diff']:.2e}",
        "",
        "## Artifact (bytes)",
        "",
        "| file | GiB |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v / gib:.3f} |" for k, v in res["sizes"].items()]
    lines += ["", "## Peak RSS of one generation in a fresh process", "", "| load | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v / gib:.2f} |" for k, v in res["peak_rss"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:sd15")
    ap.add_argument("--artifact", type=Path, default=Path("/tmp/sdopt-sd15-controlnet"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parent / "results" / f"sd15-{args.size}-cpu-controlnet-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    export_s = export(args.model, args.artifact) if not args.artifact.exists() else None
    latents = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8), dtype=np.float32)
    rss = peak_rss(args.artifact, args.size)  # first: fresh processes, nothing else of ours in memory
    together = rss["controlnet"] < TOGETHER_MAX_RSS
    medians, images = timings(args, latents, together)
    runtime, torch_t, ours, theirs = medians["runtime"], medians["torch"], images["runtime"], images["torch"]
    import platform

    from sdopt.hardware import physical_cores

    res = {
        "name": out.name,
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "description": f"{args.model} ({args.size}x{args.size}, {args.steps} steps, guidance 7.5) with one "
        "synthetic ControlNet: diffusers StableDiffusionControlNetPipeline vs the runtime (ORT).",
        "machine": f"{platform.processor() or platform.machine()}, {physical_cores()} physical cores",
        "note": "shared machine (other jobs running): absolute seconds are noisy, ratios less so",
        "export_seconds": export_s,
        "torch": torch_t,
        "runtime": runtime,
        "max_abs_pixel_diff": float(np.abs(ours.astype(np.float64) - theirs).max()),
        "sizes": sizes(args.artifact),
        "peak_rss": rss,
        "interleaved": together,
        "self_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    write_md(out, res)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
