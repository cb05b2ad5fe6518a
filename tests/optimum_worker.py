"""The Optimum side of tests/test_optimum.py, run by the separate Optimum venv's python.

Hugging Face Optimum (optimum-onnx) pins transformers 4.x, so it cannot share sdopt's venv; this
script runs there as one subprocess (one import of torch + Optimum for every job) and hands its
results back as files:

    python tests/optimum_worker.py JOBS.json

JOBS.json: {"export": [{"model": DIFFUSERS_DIR, "out": DIR}, ...],
            "generate": [{"artifact": DIR, "latents": NPY, "out": NPZ, "prompt": P, "steps": N, "guidance": G}]}

* export: Optimum's ONNX export of a diffusers folder: `main_export`, the function behind
  `optimum-cli export onnx --model DIFFUSERS_DIR --task text-to-image DIR`, with its defaults
  (it validates the graphs against the PyTorch model as the CLI does).
* generate: ORTStableDiffusion(XL)Pipeline.from_pretrained(DIR) (picked from model_index.json),
  then a txt2img call from the given initial latents; NPZ gets `images` (NHWC float32 in [0, 1]).

Imports only what that venv has: torch, diffusers, transformers 4.x, optimum.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def export(model: str, out: str) -> None:
    from optimum.exporters.onnx import main_export

    main_export(model_name_or_path=model, output=out, task="text-to-image")


def generate(artifact: str, latents: str, out: str, prompt: str, steps: int, guidance: float) -> None:
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    index = json.loads((Path(artifact) / "model_index.json").read_text())
    cls = ORTStableDiffusionXLPipeline if "text_encoder_2" in index else ORTStableDiffusionPipeline
    pipe = cls.from_pretrained(artifact, provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)
    x = torch.from_numpy(np.load(latents))
    result = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=x.shape[2] * 8,
        width=x.shape[3] * 8,
        latents=x,
        output_type="np",
    )
    np.savez(out, images=np.asarray(result.images, dtype=np.float32), pipeline=type(pipe).__name__)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs.get("export", []):
        export(**job)
    for job in jobs.get("generate", []):
        generate(**job)


if __name__ == "__main__":
    main()
