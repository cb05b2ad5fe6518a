"""Measure the CPU levers of issue "CPU speed" one by one on an artifact's U-Net.

    python benchmarks/levers.py ARTIFACT [--size 256] [--repeats 3] [--out benchmarks/results/levers-...]

Each lever is a variant of the ONNX Runtime session (or of the graph) timed on the same
U-Net call the sampling loop makes (batch 2 for guidance, latent size/8), one variant at a
time (each session holds a full copy of the weights); the median per call is reported with the session-creation time,
and, for graph changes, the max abs difference of the output against the exact session.
Results go to levers.json and levers.md. Not a test: timings are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdopt.engines.ort import session_options
from sdopt.hardware import physical_cores
from sdopt.manifest import load_manifest


def session(
    path: Path, threads: int, level: ort.GraphOptimizationLevel, parallel: bool = False, arena: bool = True
) -> tuple[ort.InferenceSession, float]:
    o = session_options(threads, level, parallel=parallel, mem_arena=arena)
    t0 = time.perf_counter()
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return s, time.perf_counter() - t0


def feeds(manifest, latent: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    unet = manifest.components["unet"]
    values = {"batch": 2, "latent_height": latent, "latent_width": latent}
    out = {}
    for t in unet.inputs:
        shape = unet.concrete_shape(t, values)
        out[t.name] = (
            np.full(shape, 500, np.float32) if t.name == "timestep" else rng.standard_normal(shape).astype(t.dtype)
        )
    return out


def io_binding_runner(s: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: dict[str, tuple]):
    """Inputs bound once, outputs preallocated: the loop copies nothing it need not."""
    binding = s.io_binding()
    for name, a in feed.items():
        binding.bind_cpu_input(name, a)
    for name, shape in outputs.items():
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(np.empty(shape, np.float32)))
    return lambda: s.run_with_iobinding(binding)


def quantized_unet(src: Path, folder: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = folder / "unet-int8.onnx"
    quantize_dynamic(
        str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, use_external_data_format=True
    )
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also try dynamic int8 quantization of the U-Net's MatMuls")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    m = load_manifest(args.artifact)
    unet = m.components["unet"]
    plain, optimized = args.artifact / unet.path, args.artifact / (unet.ort_cpu_path or unet.path)
    feed = feeds(m, args.size // m.vae.scale)
    cores = physical_cores()
    all_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # name -> (graph, session options); sessions are made one at a time (each holds the weights).
    variants: dict[str, tuple[Path, dict]] = {
        "default (saved optimised graph, ALL, threads=cores, sequential, arena)": (optimized, {}),
        "original graph, ORT_ENABLE_ALL at load": (plain, {}),
        "original graph, ORT_ENABLE_EXTENDED (no NCHWc layouts)": (
            plain,
            {"level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
        ),
        "original graph, ORT_ENABLE_BASIC": (plain, {"level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}),
        "threads=1": (optimized, {"threads": 1}),
        "threads=2x cores (oversubscribed)": (optimized, {"threads": 2 * cores}),
        "parallel execution mode": (optimized, {"parallel": True}),
        "memory arena off": (optimized, {"arena": False}),
        "IO binding, preallocated outputs": (optimized, {"io_binding": True}),
    }
    if args.int8:
        tmp = Path(tempfile.mkdtemp(prefix="sdopt-levers-"))
        variants["int8 dynamic quantization of MatMul (fast-mode candidate)"] = (quantized_unet(plain, tmp), {})
    values = {"batch": 2, "latent_height": args.size // m.vae.scale, "latent_width": args.size // m.vae.scale}
    out_shapes = {t.name: unet.concrete_shape(t, values) for t in unet.outputs}
    base_name = next(iter(variants))
    times: dict[str, list[float]] = {}
    diffs: dict[str, float] = {}
    creates: dict[str, float] = {}
    reference = None
    for name, (path, opts) in variants.items():
        s, creates[name] = session(
            path,
            opts.get("threads", cores),
            opts.get("level", all_level),
            opts.get("parallel", False),
            opts.get("arena", True),
        )
        run = io_binding_runner(s, feed, out_shapes) if opts.get("io_binding") else (lambda s=s: s.run(None, feed))
        out = s.run(["out_sample"], feed)[0]  # warm-up and output check
        reference = out if reference is None else reference
        diffs[name] = float(np.abs(out - reference).max())
        times[name] = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        print(f"{name}: {statistics.median(times[name]):.3f} s/call", flush=True)
        del s, run
    base = statistics.median(times[base_name])
    rows = []
    for name in variants:
        med = statistics.median(times[name])
        create = creates[name]
        rows.append(
            {
                "lever": name,
                "median_s_per_call": med,
                "vs_default": base / med,
                "session_create_s": create,
                "max_abs_diff_vs_default": diffs.get(name),
            }
        )
    result = {
        "artifact": str(args.artifact),
        "source": m.source,
        "size": args.size,
        "batch": 2,
        "repeats": args.repeats,
        "threads_default": cores,
        "onnxruntime": ort.__version__,
        "rows": rows,
    }
    lines = [
        f"U-Net call (batch 2, {args.size}x{args.size} image), median of {args.repeats}, onnxruntime "
        f"{ort.__version__}, {cores} physical cores",
        "",
        "| lever | s/call | speed vs default | session create s | max abs diff |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        create = "—" if r["session_create_s"] is None else f"{r['session_create_s']:.1f}"
        diff = "—" if r["max_abs_diff_vs_default"] is None else f"{r['max_abs_diff_vs_default']:.2e}"
        lines.append(f"| {r['lever']} | {r['median_s_per_call']:.3f} | {r['vs_default']:.2f}x | {create} | {diff} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "levers.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "levers.md").write_text(text)


if __name__ == "__main__":
    main()
