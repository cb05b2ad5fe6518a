"""LoRA on the CPU runtime: swap time, step time before/after a swap, LCM-LoRA few-step mode.

    flock /tmp/sdopt-heavy.lock python benchmarks/lora_swap.py ARTIFACT [--size 256] [--out DIR]

ARTIFACT is an sd15 export (`sdopt export synthetic:sd15 --components text_encoder,unet,unet_shallow,vae_decoder`).
Two LoRA files are written from the artifact's own weight map (random values: the weights of
the synthetic model are random too, so images say nothing about quality, only speed):
- "style": a typical U-Net + text-encoder LoRA, rank 16, on attention (to_q/k/v/out),
  proj_in/proj_out and feed-forward of the U-Net and q/k/v/out_proj and fc1/fc2 of CLIP;
- "lcm": shaped like LCM-LoRA for SD 1.5 (rank 64 on every U-Net Linear and Conv2d).
Measured in one process, side by side: swap (set_loras) and restore (set_loras([])) times
(each swap split into its spans: weights = reading the file, B @ A, reading the base weights
and merging; engines = creating the new sessions; swap_in = waiting for calls in flight),
U-Net step time of 20-step runs before and after a swap, and the LCM 4-step run (`lcm`
scheduler, no CFG) against the 20-step exact run (model's scheduler, CFG 7.5). A swap
includes reading the file, B @ A for every module, reading the base weights from the graph
file and creating the new sessions; the old ones serve calls meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sdopt.runtime import Pipeline
from sdopt.runtime.lora_swap import manifest_targets

STYLE_UNET = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
STYLE_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def write_lora(manifest, path: Path, rank: int, select, seed: int) -> int:
    """A diffusers-format LoRA over the modules `select(component, module)` picks; returns its key count."""
    rng = np.random.default_rng(seed)
    tensors, meta = {}, {}
    for component, modules in manifest_targets(manifest).items():
        for module, shape in modules.items():
            if not select(component, module):
                continue
            fan_in = int(np.prod(shape[1:]))
            down = (rng.standard_normal((rank, *shape[1:]), dtype=np.float32) / np.sqrt(fan_in)).astype(np.float16)
            up = rng.standard_normal((shape[0], rank, *[1] * (len(shape) - 2)), dtype=np.float32) * 0.01
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up.astype(np.float16)
            meta[f"{component}.r"], meta[f"{component}.lora_alpha"] = rank, rank
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return len(tensors)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parent / "results" / f"lora-sd15-{args.size}-cpu-{stamp}"
    out.mkdir(parents=True, exist_ok=True)

    load_avg = [os.getloadavg()]
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.artifact)
    load_s = time.perf_counter() - t0
    m = pipe.manifest
    style, lcm = out / "style-rank16.safetensors", out / "lcm-shaped-rank64.safetensors"
    keys = {
        "style": write_lora(
            m,
            style,
            16,
            lambda c, mod: mod.split(".")[-1] in STYLE_TEXT or any(mod.endswith(t) for t in STYLE_UNET),
            seed=1,
        ),
        "lcm": write_lora(m, lcm, 64, lambda c, mod: c == "unet", seed=2),
    }
    call = dict(height=args.size, width=args.size, seed=0, output_type="np")
    prompt = "a photograph of an astronaut riding a horse"

    def exact(steps: int = 20):
        return pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, **call)

    exact(2)  # warm-up (first-run allocations)
    base_image = exact(2).images
    before = [exact().timings for _ in range(args.repeats)]
    swaps, restores, spans = [], [], []
    for _ in range(args.repeats):
        swaps.append(timed(lambda: pipe.set_loras([(style, 1.0)])))
        spans.append({k: round(v, 3) for k, v in getattr(pipe.lora, "timings", {}).items()})
        restores.append(timed(lambda: pipe.set_loras([])))
    restored = exact(2).images
    pipe.set_loras([(style, 1.0)])
    exact(2)  # warm-up of the new sessions
    after = [exact().timings for _ in range(args.repeats)]
    lcm_swap = timed(lambda: pipe.set_loras([(lcm, 1.0)]))

    def few():
        return pipe(prompt, num_inference_steps=4, guidance_scale=1.0, scheduler="lcm", **call)

    few()
    lcm_runs = [few().timings for _ in range(max(args.repeats, 3))]
    pipe.set_loras([])
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    result = {
        "artifact": str(args.artifact),
        "size": args.size,
        "repeats": args.repeats,
        "load_s": round(load_s, 2),
        "lora_keys": keys,
        "machine": platform.processor() or platform.machine(),
        "swap_unet_te_rank16_s": med(swaps),
        "restore_s": med(restores),
        "swap_all_s": [round(x, 3) for x in swaps],
        "restore_all_s": [round(x, 3) for x in restores],
        "swap_spans_s": spans,  # per swap: weights (read, B @ A, merge) / engines (new sessions) / swap_in
        "swap_lcm_rank64_s": round(lcm_swap, 3),
        "step_s_before_swap": med([t["unet_per_step"] for t in before]),
        "step_s_after_swap": med([t["unet_per_step"] for t in after]),
        "exact_20_steps_cfg_total_s": med([t["total"] for t in before]),
        "lcm_4_steps_no_cfg_total_s": med([t["total"] for t in lcm_runs]),
        "lcm_step_s": med([t["unet_per_step"] for t in lcm_runs]),
        "restore_identical_bytes": bool(base_image.tobytes() == restored.tobytes()),
        "re_export_s": sum(c.export_seconds for c in m.components.values()),
        "load_average_start_end": [[round(x, 2) for x in load_avg[0]], [round(x, 2) for x in os.getloadavg()]],
        "note": "random weights: images say nothing about quality; timings on a shared 2-core machine (noisy)",
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for f in (style, lcm):
        f.unlink()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
