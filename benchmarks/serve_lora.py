"""Serving with LoRAs: what mixed LoRA traffic costs the step batcher, and that each image is right.

    flock /tmp/sdopt-heavy.lock python benchmarks/serve_lora.py ARTIFACT [--size 256] [--steps 4] [--requests 8]

In one process, side by side, on the replica's own engine (`StepBatcher`, the code `sdopt serve`
runs; no HTTP, whose overhead `serve_load.py` measures): the same N requests submitted at once,
(1) all on the base weights, (2) cycling base / LoRA "a" / LoRA "b" (the turn policy groups them:
one swap per LoRA set, not per request), (3) the same mix in strict arrival order (a turn takes only
the run of same-set requests at the head of the queue: what the engine would do without grouping).
Reported: wall time, swaps and their seconds, U-Net calls. Then each
LoRA request's image is compared with `Pipeline` + `set_loras` in-process (max |diff| on [0, 1]
pixels). The two LoRAs are written from the artifact's weight map like benchmarks/lora_swap.py's
"style" file (U-Net + text encoder, rank 16, random values: speed and equality only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from lora_swap import STYLE_TEXT, STYLE_UNET, write_lora  # noqa: E402

from sdopt.runtime import Pipeline  # noqa: E402
from sdopt.serve.config import ServeLora  # noqa: E402
from sdopt.serve.engine import StepBatcher  # noqa: E402
from sdopt.serve.lora_groups import LoraCatalog, LoraTurns  # noqa: E402
from sdopt.serve.metrics import ServeMetrics  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def style(component: str, module: str) -> bool:
    return module.split(".")[-1] in STYLE_TEXT or any(module.endswith(t) for t in STYLE_UNET)


class StrictFifo(LoraTurns):
    """No grouping: only the same-set run at the head of the queue is admissible."""

    def admissible(self, waiting):
        run = []
        for job in waiting:
            if job.lora != self.current:
                break
            run.append(job)
        return run


def run_engine(pipe, catalog, sets, args, turns: LoraTurns | None = None) -> dict:
    """Submit one request per LoRA set at once; wait for all. The pipeline ends on the base weights."""
    metrics = ServeMetrics()
    engine = StepBatcher(pipe, args.max_batch, max_waiting=len(sets), observer=metrics, loras=catalog)
    if turns is not None:
        engine._turns = turns  # the policy under comparison (set before any job arrives)
    call = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="np")
    requests = [pipe.make_request(PROMPT, seed=i, **call) for i in range(len(sets))]
    t0 = time.perf_counter()
    jobs = [engine.submit(r, s) for r, s in zip(requests, sets, strict=True)]
    images = [job.future.result(3600)[0].image for job in jobs]
    wall = time.perf_counter() - t0
    engine.close()
    pipe.set_loras([])
    get = metrics.registry.get_sample_value
    return {
        "wall_s": round(wall, 2),
        "swaps": int(get("sdopt_lora_swaps_total") or 0),
        "swap_s_total": round(get("sdopt_lora_swap_seconds_sum") or 0.0, 2),
        "unet_calls": int(get("sdopt_unet_batch_images_count") or 0),
        "images_per_unet_call": round(
            (get("sdopt_unet_batch_images_sum") or 0) / max(get("sdopt_unet_batch_images_count") or 1, 1), 2
        ),
        "images": images,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parent / "results" / f"serve-lora-{args.size}-cpu-{stamp}"
    out.mkdir(parents=True, exist_ok=True)

    pipe = Pipeline.load(args.artifact)
    paths = {name: out / f"{name}-rank16.safetensors" for name in ("a", "b")}
    for seed, path in enumerate(paths.values(), start=1):
        write_lora(pipe.manifest, path, 16, style, seed=seed)
    catalog = LoraCatalog(tuple(ServeLora(name, str(path)) for name, path in paths.items()))
    catalog.check_files(args.artifact)
    pipe(PROMPT, num_inference_steps=1, height=args.size, width=args.size, output_type="np")  # warm-up
    cycle = [(), ("a",), ("b",)]
    mixed_sets = [cycle[i % 3] for i in range(args.requests)]
    base = run_engine(pipe, catalog, [()] * args.requests, args)
    mixed = run_engine(pipe, catalog, mixed_sets, args)
    fifo = run_engine(pipe, catalog, mixed_sets, args, StrictFifo())

    diffs = {}  # one request per LoRA set against Pipeline + set_loras in-process
    for lora_set in cycle:
        i = mixed_sets.index(lora_set)
        pipe.set_loras(catalog.specs(lora_set))
        want = pipe(
            PROMPT, num_inference_steps=args.steps, height=args.size, width=args.size, seed=i, output_type="np"
        )
        diffs["+".join(lora_set) or "base"] = float(np.abs(want.images[0] - mixed["images"][i]).max())
    pipe.set_loras([])
    base_same = float(np.abs(base["images"][0] - mixed["images"][0]).max())  # request 0 is base in both
    fifo_same = max(float(np.abs(a - b).max()) for a, b in zip(mixed["images"], fifo["images"], strict=True))
    for run in (base, mixed, fifo):
        del run["images"]
    result = {
        "artifact": str(args.artifact),
        "size": args.size,
        "steps": args.steps,
        "requests": args.requests,
        "max_batch": args.max_batch,
        "machine": platform.processor() or platform.machine(),
        "all_base": base,
        "mixed_base_a_b": mixed,
        "mixed_strict_fifo": fifo,
        "grouped_vs_fifo_images_max_abs_diff": fifo_same,
        "max_abs_diff_vs_in_process_set_loras": diffs,
        "base_request_same_in_both_runs_max_abs_diff": base_same,
        "note": "random LoRA weights: speed and equality only; shared 2-core machine (noisy)",
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    for path in paths.values():
        path.unlink()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
