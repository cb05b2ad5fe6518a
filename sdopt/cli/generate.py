"""`sdopt generate`: images from an artifact with the lean runtime (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from sdopt.cli.common import app, console, err_console, friendly_errors, split_list

# Help texts too long to keep their option on one line.
_ARTIFACT_HELP = "Artifact folder written by `sdopt export`, or an `optimum-cli export onnx` folder."
_OUT_HELP = "Image file; with --batch N: out-0.png ... out-(N-1).png."
_SCHEDULER_HELP = "ddim, euler, euler-a, dpm++2m, dpm++2m-karras, lcm, pndm, unipc. Default: the model's own."
_IMAGE_HELP = "Init image for img2img (or the image to inpaint with --mask)."
_FAST_HELP = "Fast mode: DeepCache with a full U-Net pass every 3 steps (see --deepcache)."
_DEEPCACHE_HELP = "Full U-Net pass every N steps, the last layer only between (1 = exact)."
_CONTROL_IMAGE_HELP = (
    "ControlNet conditioning image, resized to the output size. Repeat it for "
    "several ControlNets (one per ControlNet, in --controlnet order)."
)
_CONTROL_SCALE_HELP = "ControlNet conditioning scale (default 1.0); once for all, or once per ControlNet."
_CONTROLNET_HELP = "Comma-separated ControlNet names of the artifact (default: all, in export order)."
_CUDA_GRAPH_HELP = (
    "TensorRT: capture each component's engine call as a CUDA graph per input shape "
    "and replay it (best with static engines; a shape that cannot be captured runs "
    "without, after one warning)."
)
_LORA_HELP = (
    "LoRA file PATH[:SCALE] (.safetensors, diffusers/PEFT or kohya; scale default 1.0). Repeat to stack several."
)
_LORA_IGNORE_HELP = (
    "Apply a LoRA's other keys where some match no module of this model (default: refuse the file and list them)."
)


@app.command()
@friendly_errors
def generate(
    artifact: Path = typer.Argument(..., help=_ARTIFACT_HELP),
    prompt: str = typer.Argument(..., help="What to draw."),
    out: Path = typer.Option(Path("out.png"), "--out", "-o", help=_OUT_HELP),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt."),
    steps: int = typer.Option(30, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale (1.0 turns guidance off)."),
    seed: Optional[int] = typer.Option(None, help="Seed (printed when drawn at random)."),
    scheduler: Optional[str] = typer.Option(None, help=_SCHEDULER_HELP),
    height: Optional[int] = typer.Option(None, help="Image height in pixels (default: the artifact's)."),
    width: Optional[int] = typer.Option(None, help="Image width in pixels (default: the artifact's)."),
    batch: int = typer.Option(1, help="Images to generate."),
    image: Optional[Path] = typer.Option(None, help=_IMAGE_HELP),
    strength: Optional[float] = typer.Option(None, help="img2img/inpaint strength in (0, 1]."),
    mask: Optional[Path] = typer.Option(None, help="Inpainting mask: white = repaint."),
    provider: str = typer.Option("cpu", help="cpu, cuda (onnxruntime-gpu) or tensorrt."),
    fast: bool = typer.Option(False, "--fast", help=_FAST_HELP),
    deepcache: int = typer.Option(1, help=_DEEPCACHE_HELP),
    # -- ControlNet (artifacts exported with --controlnet) --
    control_image: Optional[list[Path]] = typer.Option(None, "--control-image", help=_CONTROL_IMAGE_HELP),
    control_scale: Optional[list[float]] = typer.Option(None, "--control-scale", help=_CONTROL_SCALE_HELP),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help=_CONTROLNET_HELP),
    control_start: float = typer.Option(0.0, help="Fraction of the steps before which the ControlNets are off."),
    control_end: float = typer.Option(1.0, help="Fraction of the steps after which the ControlNets are off."),
    guess_mode: bool = typer.Option(False, "--guess-mode", help="ControlNet guess mode (conditional half only)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help=_CUDA_GRAPH_HELP),
    allow_host_code: bool = typer.Option(
        False, "--allow-host-code", help="TensorRT: trust version-compatible engines' embedded code."
    ),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help=_LORA_HELP),
    lora_ignore_unmatched: bool = typer.Option(False, "--lora-ignore-unmatched", help=_LORA_IGNORE_HELP),
) -> None:
    """Generate images from an artifact with the lean runtime (no torch)."""
    trt_options = {"use_cuda_graph": cuda_graph, "allow_host_code": allow_host_code} if provider == "tensorrt" else {}
    pipe, loras, load_s = _load(artifact, provider, lora or [], lora_ignore_unmatched, trt_options)
    call_args = dict(
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=batch,
        seed=seed,
        scheduler=scheduler,
        image=image,
        mask_image=mask,
        strength=strength,
        deepcache=3 if fast and deepcache == 1 else deepcache,
        **_control_args(control_image, control_scale, controlnet, control_start, control_end, guess_mode),
    )
    result = _run_with_progress(pipe, prompt, call_args)
    _save_and_report(result, out, loras, load_s)


def _load(
    artifact: Path, provider: str, lora: list[str], ignore_unmatched: bool, trt_options: dict[str, bool]
) -> tuple[Any, list[Any], float]:
    """The lean Pipeline with its LoRAs applied, the parsed LoRA specs and the load time (imports included)."""
    import time

    t0 = time.perf_counter()
    from sdopt.lora.files import parse_lora_arg
    from sdopt.runtime import Pipeline

    loras = [parse_lora_arg(text) for text in lora]
    pipe = Pipeline.load(
        artifact, provider=provider, loras=loras, lora_ignore_unmatched=ignore_unmatched, **trt_options
    )
    return pipe, loras, time.perf_counter() - t0


def _run_with_progress(pipe: Any, prompt: str, call_args: dict[str, Any]) -> Any:
    """Run the pipeline under a step progress bar; its warnings are printed once the bar is done."""
    import warnings

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with (
        Progress("denoising", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        task = bar.add_task("steps", total=None)
        result = pipe(prompt, callback=lambda done, total: bar.update(task, completed=done, total=total), **call_args)
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    return result


def _save_and_report(result: Any, out: Path, loras: list[Any], load_s: float) -> None:
    """Write the images (out, or out-0 ... out-(N-1) for several) and print the seed and timings."""
    paths = (
        [out]
        if len(result.images) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(result.images))]
    )
    for im, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    t = result.timings
    console.print(f"seed {result.seed}; wrote {', '.join(map(str, paths))}")
    if "controlnet" in t:
        console.print(f"ControlNet {t['controlnet']:.2f} s")
    if loras:
        console.print("LoRA: " + ", ".join(f"{spec.path.name} x{spec.scale:g}" for spec in loras))
    console.print(
        f"load {load_s:.2f} s, text encoder {t['text_encoder']:.2f} s, U-Net {t['unet']:.2f} s "
        f"({t['unet_per_step'] * 1000:.0f} ms/step), VAE decode {t['vae_decoder']:.2f} s, total {t['total']:.2f} s"
    )


def _control_args(
    images: Optional[list[Path]],
    scales: Optional[list[float]],
    names: Optional[str],
    start: float,
    end: float,
    guess_mode: bool,
) -> dict[str, object]:
    """`sdopt generate`'s ControlNet options as Pipeline call arguments (none when unused)."""
    if not images and not names:
        if scales:
            from sdopt.errors import SdoptError

            raise SdoptError(
                "--control-scale without --control-image", "pass --control-image PATH (a ControlNet artifact)"
            )
        return {}
    chosen = split_list(names)
    one = len(images or []) == 1 and (chosen is None or len(chosen) == 1)
    return {
        "control_image": (images[0] if one else images) if images else None,
        "controlnet_conditioning_scale": scales[0] if scales and len(scales) == 1 else scales or 1.0,
        "controlnet": chosen,
        "control_guidance_start": start,
        "control_guidance_end": end,
        "guess_mode": guess_mode,
    }
