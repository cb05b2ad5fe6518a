"""The Optimum side of tests/test_optimum.py, run by the separate Optimum venv's python.

Hugging Face Optimum (optimum-onnx) pins transformers 4.x, so it cannot share sdopt's venv; this
script is run as a subprocess there and hands its results back as files:

    python tests/optimum_worker.py generate ARTIFACT LATENTS.npy OUT.npz --prompt P --steps N --guidance G
        Optimum's ORTStableDiffusion(XL)Pipeline (picked from model_index.json) loads ARTIFACT and
        generates from the given initial latents; OUT.npz gets `images` (NHWC float32 in [0, 1]).
    python tests/optimum_worker.py export DIFFUSERS_DIR OUT_DIR
        `optimum-cli export onnx` of a diffusers folder (the real CLI entry point, in-process).

Imports only what that venv has: torch, diffusers, transformers 4.x, optimum.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def generate(args: argparse.Namespace) -> None:
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    index = json.loads((Path(args.artifact) / "model_index.json").read_text())
    sdxl = "text_encoder_2" in index
    cls = ORTStableDiffusionXLPipeline if sdxl else ORTStableDiffusionPipeline
    pipe = cls.from_pretrained(args.artifact, provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(args.latents))
    out = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
               height=latents.shape[2] * 8, width=latents.shape[3] * 8, latents=latents, output_type="np")
    np.savez(args.out, images=np.asarray(out.images, dtype=np.float32), pipeline=type(pipe).__name__)


def export(args: argparse.Namespace) -> None:
    from optimum.commands.optimum_cli import main

    sys.argv = ["optimum-cli", "export", "onnx", "--model", args.diffusers_dir, "--task", "text-to-image",
                "--no-post-process", args.out_dir]
    main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("artifact")
    gen.add_argument("latents")
    gen.add_argument("out")
    gen.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    gen.add_argument("--steps", type=int, default=4)
    gen.add_argument("--guidance", type=float, default=7.5)
    exp = sub.add_parser("export")
    exp.add_argument("diffusers_dir")
    exp.add_argument("out_dir")
    args = parser.parse_args()
    {"generate": generate, "export": export}[args.command](args)


if __name__ == "__main__":
    main()
