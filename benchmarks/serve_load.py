"""Load numbers for `sdopt serve`: --max-batch 1 against step-level batching, 1 against 2 replicas.

For each server setting, starts `sdopt serve` (a fresh local Ray instance) on loopback, waits
for /ready, warms it up with one request per replica, runs `sdopt bench-serve` (N requests at
concurrency C), then stops the server (SIGINT) and waits for it to exit. Also measures the
batching tolerance: max |difference| between images from the step batcher (mixed steps,
mixed guidance, stacked) and `Pipeline` alone, same seeds, float [0, 1] pixels.

Usage (heavy: run under the lock):

    flock /tmp/sdopt-heavy.lock python benchmarks/serve_load.py --model synthetic:tiny --size 256 -n 24 -c 8
    flock /tmp/sdopt-heavy.lock python benchmarks/serve_load.py --model synthetic:sd15 --size 256 -n 4 -c 4 --steps 8

A model id is exported once into the same cache `sdopt bench` uses (~/.cache/sdopt/artifacts/<key>).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sdopt.serve import process as serve_process

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (label, replicas, max_batch, ORT threads per replica) on a 2-core machine
    ("1 replica, --max-batch 1 (no batching)", 1, 1, 2),
    ("1 replica, --max-batch 8 (step-level batching)", 1, 8, 2),
    ("2 replicas x 1 thread, --max-batch 1", 2, 1, 1),
    ("2 replicas x 1 thread, --max-batch 8", 2, 8, 1),
]


def artifact_for(model: str) -> Path:
    """An artifact folder: the path itself, or the bench harness's cached export of a model id."""
    if Path(model).is_dir():
        return Path(model)
    from sdopt.bench.config import BenchConfig
    from sdopt.bench.runner import cache_key, default_cache_dir, export_settings
    from sdopt.export.artifact import ExportOptions, export_artifact

    out = default_cache_dir() / cache_key(export_settings(model, BenchConfig(model=model)))
    if not (out / "sdopt.json").is_file():
        print(f"exporting {model} to {out}", flush=True)
        export_artifact(model, out, ExportOptions(max_batch=4, force=True))
    return out


def run_setting(artifact: Path, args: argparse.Namespace, replicas: int, max_batch: int, threads: int) -> dict:
    from sdopt.serve.bench import BenchServeOptions, run_bench_serve

    port = serve_process.free_port()
    url = f"http://127.0.0.1:{port}"
    serve_args = [
        "--replicas",
        str(replicas),
        "--max-batch",
        str(max_batch),
        "--threads",
        str(threads),
        "--cpus-per-replica",
        "1",
        "--max-queue",
        str(args.requests),
        "--max-size",
        str(args.size),
        "--provider",
        args.provider,
    ]
    t0 = time.monotonic()
    log = Path(tempfile.gettempdir()) / f"sdopt-serve-load-{port}.log"
    proc = serve_process.start(artifact, port, serve_args, log, env={"PYTHONPATH": str(ROOT)})
    try:
        if serve_process.wait_ready(url, proc, args.start_timeout) is None:
            raise RuntimeError(f"sdopt serve at {url} not ready after {args.start_timeout} s (see {log})")
        start_s = time.monotonic() - t0
        size = f"{args.size}x{args.size}"
        warm = BenchServeOptions(url, requests=replicas, concurrency=replicas, steps=2, size=size, time_limit_s=600)
        run_bench_serve(warm)  # warm-up: one request per replica (ORT's first-call allocations)
        options = BenchServeOptions(
            url,
            requests=args.requests,
            concurrency=args.concurrency,
            steps=args.steps,
            size=size,
            guidance=7.5,
            time_limit_s=args.time_limit,
        )
        result = run_bench_serve(options)
        print(f"  {result.summary()}", flush=True)
        return {**asdict(result), "server_start_s": start_s}
    finally:
        serve_process.stop(proc, timeout_s=60)


def batching_tolerance(pipe: Any, size: int, steps: int, count: int) -> dict:
    """Max |Δ| on [0, 1] pixels between step-batched images and Pipeline alone, same requests."""
    from sdopt.serve.engine import StepBatcher

    calls = [
        dict(
            prompt=f"a harbour at dawn {i}",
            seed=100 + i,
            num_inference_steps=steps - (i % 2),
            guidance_scale=7.5 if i % 3 else 1.0,
            height=size,
            width=size,
            output_type="np",
        )
        for i in range(count)
    ]
    engine = StepBatcher(pipe, max_batch=count, max_waiting=count)
    try:
        half = max(1, count // 2)
        jobs = [engine.submit(pipe.make_request(**c)) for c in calls[:half]]
        while jobs[0].state is None or jobs[0].state.step < 1:  # the rest join a running batch
            time.sleep(0.01)
        jobs += [engine.submit(pipe.make_request(**c)) for c in calls[half:]]
        batched = [j.future.result(timeout=3600)[0].image for j in jobs]
    finally:
        engine.close()
    diffs = [float(np.abs(b - pipe(**c).images[0]).max()) for b, c in zip(batched, calls, strict=True)]
    return {
        "max_abs_diff": max(diffs),
        "per_image": diffs,
        "images": count,
        "steps": steps,
        "size": size,
        "note": "half the requests join the running batch after its first step; guided and unguided, "
        "different step counts, in the same U-Net calls",
    }


def unet_scaling(pipe: Any, size: int, batches: tuple[int, ...] = (1, 2, 4, 8), reps: int = 2) -> dict:
    """Seconds per U-Net call (guided: 2 rows per image) and per image-step, by images stacked."""
    state = pipe.prepare(pipe.make_request("a harbour at dawn", height=size, width=size, seed=0, output_type="np"))
    component, feeds = state.unet_inputs()
    out = {}
    for n in batches:
        stacked = {k: np.concatenate([v] * n) for k, v in feeds.items()}
        pipe.unet(component, stacked)  # warm-up (ORT allocations for this shape)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pipe.unet(component, stacked)
            times.append(time.perf_counter() - t0)
        best = min(times)
        out[str(n)] = {"call_s": best, "per_image_step_s": best / n}
        print(f"  U-Net, {n} image(s) stacked: {best:.3f} s per call, {best / n:.3f} s per image-step", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("-n", "--requests", type=int, default=24)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=900.0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--tolerance-images", type=int, default=4)
    parser.add_argument("--provider", default="cpu", help="cpu, cuda or tensorrt (on a GPU host)")
    parser.add_argument("--scaling-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--scaling-reps", type=int, default=2)
    parser.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    artifact = artifact_for(args.model)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{args.model.split(':')[-1]}-{args.size}-cpu-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    source = json.loads((artifact / "sdopt.json").read_text()).get("source", {})
    record = {
        "model": source.get("id", args.model),
        "artifact": str(artifact),
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "settings": [],
    }
    from sdopt.runtime import Pipeline

    pipe = Pipeline.load(artifact, provider=args.provider)
    print(f"batching tolerance on {args.tolerance_images} images ...", flush=True)
    record["tolerance"] = batching_tolerance(pipe, args.size, args.steps, args.tolerance_images)
    print(f"  max |Δ| {record['tolerance']['max_abs_diff']:.3g}", flush=True)
    record["unet_scaling"] = unet_scaling(pipe, args.size, tuple(args.scaling_batches), args.scaling_reps)
    del pipe
    gc.collect()  # the servers below load their own copies
    for i, (label, replicas, max_batch, threads) in enumerate(SETTINGS):
        if args.only and i not in args.only:
            continue
        print(f"{label} ...", flush=True)
        result = run_setting(artifact, args, replicas, max_batch, threads)
        record["settings"].append(
            {"label": label, "replicas": replicas, "max_batch": max_batch, "threads_per_replica": threads, **result}
        )
    record["machine"]["loadavg_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(markdown(record))
    print(f"wrote {out}")


def markdown(record: dict) -> str:
    tol = record["tolerance"]
    lines = [
        f"# sdopt serve load: {record['model']} at {record['args']['size']}²",
        "",
        f"{record['args']['requests']} requests at concurrency {record['args']['concurrency']}, "
        f"{record['args']['steps']} steps, CFG 7.5, {record['machine']['cpus']} CPUs; load average at start "
        f"{record['machine']['loadavg_at_start'][0]:.1f} (shared machine: timings are noisy)",
        "",
        "| setting | images/s | p50 s | p90 s | p99 s | statuses | mean U-Net s per request | server start s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in record["settings"]:
        lat = s["latency_s"]
        lines.append(
            f"| {s['label']} | {s['images_per_s']:.3f} | {lat.get('p50', float('nan')):.2f} | "
            f"{lat.get('p90', float('nan')):.2f} | {lat.get('p99', float('nan')):.2f} | {s['statuses']} | "
            f"{s['server_timings_s'].get('unet', float('nan')):.2f} | {s['server_start_s']:.0f} |"
        )
    lines += [
        "",
        "U-Net call time by images stacked (guided: 2 rows per image), in-process, best of "
        f"{record['args']['scaling_reps']}:",
        "",
        "| images stacked | s per call | s per image-step |",
        "|---|---|---|",
    ]
    for n, v in record.get("unet_scaling", {}).items():
        lines.append(f"| {n} | {v['call_s']:.3f} | {v['per_image_step_s']:.3f} |")
    lines += [
        "",
        f"Batching tolerance: max |Δ| {tol['max_abs_diff']:.3g} on [0, 1] pixels between step-batched "
        f"images and `Pipeline` alone ({tol['images']} images, {tol['steps']} steps, {tol['note']}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
