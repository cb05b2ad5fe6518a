"""From raw measurements to the results dict that results.json, results.md and the table show.

The schema is documented in benchmarks/README.md; `SCHEMA_VERSION` changes whenever it does.
Version 2 added the optional per-backend "quality" block and the top-level "quality" summary
(`sdopt bench --quality N`).
"""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdopt.bench import stats
from sdopt.bench.config import REFERENCE, BenchConfig
from sdopt.bench.control import stage_names
from sdopt.bench.records import BackendRun, BackendStats, Job

if TYPE_CHECKING:
    from sdopt.manifest import Manifest

SCHEMA_VERSION = 2
STAGES_HELP = {
    "text_encoder": "seconds inside the text encoder call(s) (both encoders for SDXL; cond + uncond)",
    "controlnet": "ControlNet jobs: seconds inside all ControlNet calls of one image batch (not in unet)",
    "unet": "seconds inside all U-Net calls of one image batch",
    "unet_per_step": "unet / number of U-Net calls (one per denoising step; PNDM makes steps + 1)",
    "vae_decoder": "seconds inside the VAE decode call",
    "other": "end to end minus the stages: tokenizing, scheduler math, CFG, pre/post-processing",
}


def _artifact_facts(manifest: Manifest) -> dict[str, Any]:
    return {k: getattr(manifest, k) for k in ("family", "source", "precision", "opset", "created")}


def _unet_facts(job: Job, flops: int | None) -> dict[str, Any]:
    """What the U-Net FLOPs (and so the matmul-peak fraction) were measured on."""
    return {
        "flops_per_call": flops,
        "calls_per_step": 1,
        "batch": job.batch * (2 if job.guidance > 1.0 else 1),
        "method": "torch.utils.flop_counter on one eager U-Net call (2 FLOPs per multiply-add, "
        "attention via the math SDPA path)"
        if flops
        else None,
    }


def build_results(
    config: BenchConfig,
    job: Job,
    manifest: Manifest,
    artifact_info: dict[str, Any],
    machine: dict[str, Any],
    runs: dict[str, BackendRun],
    images: dict[str, Any],
    command: str | None = None,
) -> dict[str, Any]:
    """The results dict (JSON-ready: no inf/nan) of one benchmark.

    Args:
        config: the benchmark's config.
        job: the job every backend ran.
        manifest: the benchmarked artifact's manifest.
        artifact_info: where the artifact came from (path, cache key, export time).
        machine: `machine_info` plus the measured matmul peak.
        runs: every backend's raw measurements, in table order.
        images: each successful backend's last image batch (NHWC floats on [0, 1]).
        command: the command line to record (default: this process's).

    Returns:
        The results dict; its "backends" list holds one `BackendStats.to_dict()` per backend.
    """
    reference = runs.get(REFERENCE)
    ref_ok = reference is not None and reference.status == "ok"
    flops = reference.unet_flops_per_call if ref_ok else None
    backends = [backend_stats(r, job, machine, images, flops) for r in runs.values()]
    ref_stats = next((s for s in backends if s.name == REFERENCE and s.status == "ok"), None)
    for s in backends:
        s.speedup_vs_torch = _speedups(s, ref_stats)
    return stats.finite_or_none(
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "sdopt-bench",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),  # API use: this process's
            "config": config.to_dict(),
            "job": job.record(),
            "artifact": {**artifact_info, **_artifact_facts(manifest)},
            "machine": machine,
            "reference": REFERENCE,
            "unet": _unet_facts(job, flops),
            "stages_help": STAGES_HELP,
            "backends": [s.to_dict() for s in backends],
        }
    )


def backend_stats(
    r: BackendRun, job: Job, machine: dict[str, Any], images: dict[str, Any], flops: int | None
) -> BackendStats:
    """One backend's summary row (speedups are added by `build_results`, which knows the reference)."""
    ok = r.status == "ok"
    e2e = stats.summarize(x["e2e_s"] for x in r.runs) if ok else None
    stages = _stage_summaries(r, stage_names(job)) if ok else {}
    peak = _matmul_peak_for(r, machine)
    unet_ps = stages.get("unet_per_step", {}) or {}
    gflops = stats.throughput_gflops(flops, unet_ps.get("median")) if ok else None
    device_method = None
    if r.device_peak_bytes is not None:
        device_method = (
            "torch.cuda.max_memory_allocated"
            if r.name.startswith("torch")
            else "nvidia-smi per-process, sampled after load and each run"
        )
    return BackendStats(
        name=r.name,
        status=r.status,
        error=r.error,
        failed_at=r.failed_at,
        provider=r.info.get("provider"),
        device=r.info.get("device"),
        device_name=r.info.get("device_name"),
        precision=r.info.get("precision"),
        engine=r.info.get("engine"),
        e2e_s=e2e,
        stages_s=stages or None,
        images_per_s=stats.images_per_second(job.batch, e2e["median"]) if e2e else None,
        cold_start=_cold_start(r, e2e) or None,
        memory={
            "peak_rss_bytes": r.rss_peak_bytes,
            "device_peak_bytes": r.device_peak_bytes,
            "device_method": device_method,
        },
        parity=_parity(r, job, images) if ok else None,
        unet_throughput={
            "gflops_per_s": gflops,
            "matmul_peak_gflops": peak,
            "fraction_of_matmul_peak": gflops / peak if gflops and peak else None,
        }
        if gflops
        else None,
        runs=r.runs,
        warmup_runs=r.warmup,
        log=r.log,
    )


def _stage_summaries(r: BackendRun, names: tuple[str, ...]) -> dict[str, Any]:
    stages: dict[str, Any] = {s: stats.summarize(x["stages_s"][s] for x in r.runs) for s in names}
    stages["unet_per_step"] = stats.summarize(x["unet_per_step_s"] for x in r.runs if x["unet_per_step_s"])
    stages["other"] = stats.summarize(x["other_s"] for x in r.runs)
    return stages


def _cold_start(r: BackendRun, e2e: dict[str, Any] | None) -> dict[str, Any]:
    if r.spawn_to_ready_s is None:
        return {}
    build_s = r.info.get("engine_build_s") or 0.0
    ready = r.spawn_to_ready_s - build_s
    cold = {
        "spawn_to_ready_s": ready,
        "import_s": r.info.get("import_s"),
        "load_s": r.info.get("load_s"),
        "first_image_s": r.first_image_s,
        "total_s": ready + r.first_image_s if r.first_image_s is not None else None,
        "verify_hashes": False,
    }
    if r.info.get("engine_build_s") is not None:
        cold["engine_build_s"] = build_s  # one-off, like the export: not part of the cold start
    if e2e and r.first_image_s is not None:
        overhead = max(0.0, r.first_image_s - e2e["median"])
        cold["first_image_overhead_s"] = overhead
        if r.name == "torch-compile":
            cold["compile_s"] = overhead
    return cold


def _parity(r: BackendRun, job: Job, images: dict[str, Any]) -> dict[str, Any] | None:
    if r.name not in images or REFERENCE not in images:
        return None
    if r.name == REFERENCE:
        return {"reference": True, "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "psnr_db": None}
    parity: dict[str, Any]
    try:
        parity = {"reference": False, **stats.parity(images[r.name], images[REFERENCE])}
    except ValueError as e:
        parity = {"error": str(e)}
    if job.scheduler in ("euler-a", "lcm"):
        parity["note"] = "stochastic scheduler: per-step noise differs between torch and numpy"
    if r.name == "onnxruntime-fast" and "onnxruntime" in images:  # the fast mode's own fidelity
        parity["vs_exact"] = stats.parity(images[r.name], images["onnxruntime"])
        parity["deepcache"] = job.deepcache
    return parity


def _matmul_peak_for(r: BackendRun, machine: dict[str, Any]) -> float | None:
    peak = machine.get("matmul_peak") or {}
    if r.info.get("device") == "cuda":
        return peak.get("cuda_fp16_gflops" if r.info.get("precision") == "fp16" else "cuda_fp32_gflops")
    return peak.get("cpu_fp32_gflops")


def _speedups(s: BackendStats, ref: BackendStats | None) -> dict[str, float | None] | None:
    if s.status != "ok" or ref is None or not s.e2e_s or not ref.e2e_s:
        return None
    out = {"e2e": stats.speedup(ref.e2e_s["median"], s.e2e_s["median"])}
    for stage in ("text_encoder", "controlnet", "unet_per_step", "vae_decoder"):
        if stage not in (ref.stages_s or {}):
            continue  # "controlnet": ControlNet jobs only
        a, b = (ref.stages_s or {}).get(stage), (s.stages_s or {}).get(stage)
        out[stage] = stats.speedup(a["median"], b["median"]) if a and b else None
    return out
