"""Orchestrates one benchmark: checks, export/cache, per-backend workers, alternating runs, results.

Order of work (cheap before heavy, so bad input fails fast):
1. validate the config, find which backends this machine has, check size/batch against the
   model's preset or the artifact's manifest;
2. export the model (or reuse the cached export), measure the machine's matmul peak;
3. start one worker process per backend, one after another (cold start is timed on a quiet
   machine), then run warm-up and measured rounds with the backends interleaved run by run —
   ABAB... in even rounds, reversed in odd ones, so slow drift (thermals, other load) hits
   every backend alike;
4. collect images (parity against torch eager), memory and FLOPs, and build the results dict
   (see benchmarks/README.md for its schema).
A backend that fails at any point becomes a "failed" row with its error; the others go on.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sdopt import __version__
from sdopt.bench import stats
from sdopt.bench.config import DEFAULT_MODEL, REFERENCE, BenchConfig, benchmarks_dir, validate
from sdopt.bench.machine import has_gpu, machine_info, measure_matmul_peak, physical_cores
from sdopt.bench.process import WorkerDied, WorkerProcess
from sdopt.errors import SdoptError
from sdopt.manifest import MANIFEST_NAME, Manifest, load_manifest
from sdopt.optimum_layout import is_optimum_folder

SCHEMA_VERSION = 1
STAGE_NAMES = ("text_encoder", "unet", "vae_decoder")
STAGES_HELP = {
    "text_encoder": "seconds inside the text encoder call(s) (both encoders for SDXL; cond + uncond)",
    "unet": "seconds inside all U-Net calls of one image batch",
    "unet_per_step": "unet / number of U-Net calls (one per denoising step; PNDM makes steps + 1)",
    "vae_decoder": "seconds inside the VAE decode call",
    "other": "end to end minus the stages: tokenizing, scheduler math, CFG, pre/post-processing",
}
Log = Callable[[str], None]


# -- where the artifact comes from ---------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "sdopt" / "artifacts"


def is_artifact(path: str) -> bool:
    """An sdopt artifact, or a folder written by `optimum-cli export onnx` (read as one)."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / MANIFEST_NAME).is_file() or is_optimum_folder(p))


def export_settings(model: str, config: BenchConfig) -> dict[str, Any]:
    """What the cached export depends on: the model, the export options, the sdopt version."""
    if not model.startswith("synthetic:") and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {"model": model, "options": {"precision": config.precision, "max_batch": max(4, config.batch)},
            "sdopt": __version__}


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def preset_image_limits(model: str) -> dict[str, int] | None:
    """Size limits of a synthetic preset, known without building it (None for other models)."""
    if not model.startswith("synthetic:"):
        return None
    from sdopt.export.synthetic import load_preset

    preset = load_preset(model[len("synthetic:"):])
    lo, hi = preset["size_range"]
    multiple = 2 ** (len(preset["vae"]["block_out_channels"]) - 1) * 2 ** (len(preset["unet"]["block_out_channels"]) - 1)
    return {"min_size": lo, "max_size": hi, "multiple": multiple, "default": preset["default_size"]}


def check_image(config: BenchConfig, min_size: int | None, max_size: int | None, multiple: int, max_batch: int | None,
                where: str) -> None:
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is None:
            continue
        if value % multiple:
            raise SdoptError(f"--{name} {value} is not a multiple of {multiple}, which {where} needs",
                             f"use e.g. --{name} {max(multiple, round(value / multiple) * multiple)}")
        if min_size is not None and max_size is not None and not min_size <= value <= max_size:
            raise SdoptError(f"--{name} {value} is outside {where}'s range {min_size}..{max_size}",
                             f"use a size in {min_size}..{max_size}")
    if max_batch is not None and config.batch > max_batch:
        raise SdoptError(f"--batch {config.batch} exceeds {where}'s maximum batch {max_batch}",
                         f"use --batch {max_batch} or less, or benchmark the model id so the harness exports "
                         f"with --max-batch {config.batch}")


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run here (None if it may). Cheap: no heavy import."""
    def missing(*modules: str) -> list[str]:
        return [m for m in modules if importlib.util.find_spec(m) is None]

    if backend in ("torch", "torch-compile"):
        gone = missing("torch", "diffusers", "transformers")
        return f"{', '.join(gone)} not installed (pip install 'sdopt[bench]')" if gone else None
    if backend in ("onnxruntime", "onnxruntime-fast"):
        return None if not missing("onnxruntime") else "onnxruntime not installed (pip install onnxruntime)"
    if backend == "tensorrt":
        if missing("tensorrt"):
            return "tensorrt not installed (pip install 'sdopt[tensorrt]' on a host with an NVIDIA GPU)"
        if not has_gpu():
            return "no NVIDIA GPU found (nvidia-smi lists none)"
        return None
    return f"unknown backend {backend!r}"


@dataclass
class Plan:
    config: BenchConfig
    backends: list[str]
    skipped: dict[str, str]
    artifact: Path | None  # given artifact folder, or None: export/cache `model`
    model: str
    cache_dir: Path
    threads: int


def plan(config: BenchConfig, cache_dir: Path | None = None) -> Plan:
    """Every check that needs no model loaded and no export. Raises SdoptError."""
    validate(config)
    wanted = config.backend_list()
    skipped = {b: r for b in wanted if (r := unavailable_reason(b)) is not None}
    runnable = [b for b in wanted if b not in skipped]
    if not runnable:
        raise SdoptError("no requested backend can run here: " + "; ".join(f"{b}: {r}" for b, r in skipped.items()),
                         "install what is missing, or choose other --backends (e.g. torch,onnxruntime)")
    model = config.model or DEFAULT_MODEL
    artifact = None
    if is_artifact(model):
        artifact = Path(model).expanduser().resolve()
        m = load_manifest(artifact)
        check_image(config, m.image.min_size, m.image.max_size, m.image.multiple, m.image.max_batch,
                    f"the artifact {artifact.name}")
        if m.source.get("kind") == "optimum":  # no PyTorch weights to run the torch backends on
            for b in [b for b in runnable if b.startswith("torch")]:
                skipped[b] = "an Optimum ONNX export has no PyTorch weights (benchmark the diffusers model for torch)"
                runnable.remove(b)
            if not runnable:
                raise SdoptError("no requested backend can run an Optimum ONNX export",
                                 "use --backends onnxruntime (or tensorrt)")
        if config.precision != "fp32" and config.precision != m.precision:
            raise SdoptError(f"--precision {config.precision} but the artifact is {m.precision}",
                             "leave --precision out when benchmarking an artifact folder")
    else:
        if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "model_index.json").is_file():
            raise SdoptError(f"{model} is neither an sdopt artifact (no {MANIFEST_NAME}) nor a diffusers model folder",
                             "pass a folder written by `sdopt export`, a model id, or e.g. synthetic:tiny")
        limits = preset_image_limits(model)
        if limits:
            check_image(config, limits["min_size"], limits["max_size"], limits["multiple"], None, model)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return Plan(config, runnable, skipped, artifact, model, cache, config.threads or physical_cores())


def ensure_artifact(p: Plan, log: Log) -> tuple[Path, dict[str, Any]]:
    """The artifact folder to benchmark: the given one, the cached export, or a fresh export."""
    if p.artifact is not None:
        return p.artifact, {"path": str(p.artifact), "given": True, "cached": None, "cache_key": None}
    settings = export_settings(p.model, p.config)
    key = cache_key(settings)
    out = p.cache_dir / key
    info = {"path": str(out), "given": False, "cache_key": key, "export_settings": settings}
    if (out / MANIFEST_NAME).is_file():
        try:
            load_manifest(out)
            log(f"using cached export of {p.model}: {out}")
            return out, {**info, "cached": True, "export_seconds": None}
        except SdoptError as e:
            log(f"cached export {out} is unusable ({e.problem}); exporting again")
    log(f"exporting {p.model} ({p.config.precision}) to the cache {out} (once; later runs reuse it)")
    from sdopt.export.artifact import ExportOptions, export_artifact

    result = export_artifact(p.model, out, ExportOptions(precision=p.config.precision, max_batch=max(4, p.config.batch),
                                                         force=True))
    seconds = result.seconds
    del result
    gc.collect()
    log(f"exported in {seconds:.1f} s")
    return out, {**info, "cached": False, "export_seconds": seconds}


# -- one backend's measurements ------------------------------------------------------------------
@dataclass
class BackendRun:
    name: str
    status: str = "pending"  # ok | failed | skipped
    error: str | None = None
    failed_at: str | None = None  # load | warmup N | run N | finish
    info: dict[str, Any] = field(default_factory=dict)
    spawn_to_ready_s: float | None = None
    first_image_s: float | None = None
    warmup: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    rss_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    image_path: str | None = None
    unet_flops_per_call: int | None = None
    log: str | None = None
    worker: WorkerProcess | None = None

    def fail(self, where: str, error: str) -> None:
        self.status, self.failed_at, self.error = "failed", where, error

    def absorb_memory(self, reply: dict[str, Any]) -> None:
        for key in ("rss_peak_bytes", "device_peak_bytes"):
            if reply.get(key) is not None:
                setattr(self, key, max(getattr(self, key) or 0, int(reply[key])))


def _run_entry(reply: dict[str, Any]) -> dict[str, Any]:
    stages = {s: float(reply["stages"].get(s, 0.0)) for s in STAGE_NAMES}
    calls = int(reply.get("calls", {}).get("unet", 0))
    return {"e2e_s": float(reply["e2e_s"]), "stages_s": stages, "unet_calls": calls,
            "unet_per_step_s": stages["unet"] / calls if calls else None,
            "other_s": max(0.0, float(reply["e2e_s"]) - sum(stages.values()))}


# -- the benchmark -------------------------------------------------------------------------------
def run_benchmark(config: BenchConfig, out_dir: Path | None = None, cache_dir: Path | None = None,
                  log: Log | None = None, command: str | None = None,
                  faults: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its reports to `out_dir`; returns the results dict.

    `faults` (tests only) makes a backend's worker fail on purpose: {"onnxruntime": {"fault": "run"}}.
    """
    log = log or (lambda msg: None)
    p = plan(config, cache_dir)
    out = Path(out_dir) if out_dir else default_out_dir(config)
    artifact, artifact_info = ensure_artifact(p, log)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(artifact)
    if p.artifact is None:  # checks that needed the exported manifest (non-synthetic models)
        check_image(config, manifest.image.min_size, manifest.image.max_size, manifest.image.multiple,
                    manifest.image.max_batch, f"the export of {p.model}")
    job = make_job(config, manifest, artifact, p.threads)
    job["build_engines"] = p.artifact is None  # TensorRT engines: built on demand into the harness's cached export
    log(f"job: {job['height']}x{job['width']}, {job['steps']} steps, batch {job['batch']}, "
        f"scheduler {job['scheduler']}, guidance {job['guidance']}, {p.threads} threads")

    machine = machine_info(p.threads)
    log("measuring the fp32 matmul peak ...")
    machine["matmul_peak"] = measure_matmul_peak(p.threads, gpu=bool(machine["gpus"]))

    runs = {b: BackendRun(b) for b in config.backend_list()}
    for b, reason in p.skipped.items():
        runs[b].status, runs[b].error = "skipped", reason
    with tempfile.TemporaryDirectory(prefix="sdopt-bench-") as tmp:
        try:
            _load_all(p.backends, runs, artifact, job, out, faults or {}, log)
            _measure(runs, config, log)
            _finish_all(runs, Path(tmp), log)
        finally:
            for r in runs.values():
                if r.worker is not None:
                    r.worker.close()
                    r.worker = None
        images = _load_images(runs)
        results = build_results(config, job, manifest, artifact_info, machine, runs, images, command)
    from sdopt.bench import report

    report.write_all(results, out, images)
    results["_out"] = str(out)
    return results


def make_job(config: BenchConfig, manifest: Manifest, artifact: Path, threads: int) -> dict[str, Any]:
    from sdopt.runtime.pipeline import default_scheduler_name

    height = config.height or manifest.image.default_height
    width = config.width or manifest.image.default_width
    scheduler_config = json.loads((artifact / manifest.scheduler_config).read_text())
    scheduler = config.scheduler or default_scheduler_name(scheduler_config)
    scale = manifest.vae.scale
    return {"prompt": config.prompt, "negative_prompt": config.negative_prompt, "steps": config.steps,
            "guidance": float(config.guidance), "height": height, "width": width, "batch": config.batch,
            "seed": config.seed, "scheduler": scheduler, "threads": threads, "deepcache": config.deepcache,
            "latent_shape": [config.batch, manifest.vae.latent_channels, height // scale, width // scale]}


def _load_all(backends: list[str], runs: dict[str, BackendRun], artifact: Path, job: dict[str, Any], out: Path,
              faults: dict[str, dict[str, Any]], log: Log) -> None:
    """Start the workers one at a time, so each cold start is timed without the others' load."""
    for b in backends:
        r = runs[b]
        log(f"{b}: starting worker and loading ...")
        r.log = str(out / "logs" / f"{b}.log")
        try:
            r.worker = WorkerProcess(b, Path(r.log), job["threads"])
            reply = r.worker.request(cmd="load", backend=b, artifact=str(artifact), job={**job, **faults.get(b, {})})
        except WorkerDied as e:
            reply = {"ok": False, "error": str(e)}
        except OSError as e:
            reply = {"ok": False, "error": f"could not start the worker: {e}"}
        if r.worker is not None:
            r.spawn_to_ready_s = time.perf_counter() - r.worker.started
        if not reply.get("ok"):
            if reply.get("skip"):
                r.status, r.error = "skipped", reply["error"]
                log(f"{b}: skipped: {r.error}")
            else:
                r.fail("load", reply["error"])
                log(f"{b}: FAILED at load: {r.error}")
            if r.worker is not None:
                r.worker.close()
                r.worker = None
            continue
        r.status, r.info = "ok", reply["info"]
        r.absorb_memory(reply)
        log(f"{b}: ready in {r.spawn_to_ready_s:.1f} s ({r.info.get('provider')}, {r.info.get('precision')})")


def _measure(runs: dict[str, BackendRun], config: BenchConfig, log: Log) -> None:
    order = [b for b, r in runs.items() if r.status == "ok"]
    total = config.warmup + config.runs
    for i in range(total):
        warm = i < config.warmup
        label = f"warm-up {i + 1}/{config.warmup}" if warm else f"run {i - config.warmup + 1}/{config.runs}"
        for b in (order if i % 2 == 0 else order[::-1]):
            r = runs[b]
            if r.status != "ok":
                continue
            try:
                reply = r.worker.request(cmd="run")
            except WorkerDied as e:
                reply = {"ok": False, "error": str(e)}
            if not reply.get("ok"):
                r.fail(label, reply["error"])
                log(f"{b}: FAILED in {label}: {r.error}")
                r.worker.close()
                r.worker = None
                continue
            entry = _run_entry(reply)
            r.absorb_memory(reply)
            if r.first_image_s is None:
                r.first_image_s = entry["e2e_s"]
            (r.warmup if warm else r.runs).append(entry)
            log(f"{b}: {label}: {entry['e2e_s']:.3f} s")


def _finish_all(runs: dict[str, BackendRun], tmp: Path, log: Log) -> None:
    for b, r in runs.items():
        if r.status != "ok" or r.worker is None:
            continue
        try:
            reply = r.worker.request(cmd="finish", image_path=str(tmp / f"{b}.npy"), count_flops=b == REFERENCE)
        except WorkerDied as e:
            reply = {"ok": False, "error": str(e)}
        if not reply.get("ok"):
            r.fail("finish", reply.get("error", "unknown error"))
            continue
        r.absorb_memory(reply)
        r.image_path = reply.get("image_path")
        r.unet_flops_per_call = reply.get("unet_flops_per_call")
        if reply.get("unet_flops_error"):
            log(f"{b}: U-Net FLOP count unavailable: {reply['unet_flops_error']}")


def _load_images(runs: dict[str, BackendRun]) -> dict[str, Any]:
    import numpy as np

    return {b: np.load(r.image_path) for b, r in runs.items() if r.status == "ok" and r.image_path}


# -- results -------------------------------------------------------------------------------------
def build_results(config: BenchConfig, job: dict[str, Any], manifest: Manifest, artifact_info: dict[str, Any],
                  machine: dict[str, Any], runs: dict[str, BackendRun], images: dict[str, Any],
                  command: str | None = None) -> dict[str, Any]:
    reference = runs.get(REFERENCE)
    ref_ok = reference is not None and reference.status == "ok"
    flops = reference.unet_flops_per_call if ref_ok else None
    backends = [_backend_stats(r, job, machine, images, flops) for r in runs.values()]
    ref_stats = next((s for s in backends if s["name"] == REFERENCE and s["status"] == "ok"), None)
    for s in backends:
        s["speedup_vs_torch"] = _speedups(s, ref_stats)
    cfg = config.to_dict()
    return stats.finite_or_none({
        "schema_version": SCHEMA_VERSION,
        "kind": "sdopt-bench",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),  # API use: this process's
        "config": cfg,
        "job": {k: v for k, v in job.items()},
        "artifact": {**artifact_info, "family": manifest.family, "source": manifest.source,
                     "precision": manifest.precision, "opset": manifest.opset, "created": manifest.created},
        "machine": machine,
        "reference": REFERENCE,
        "unet": {"flops_per_call": flops, "calls_per_step": 1,
                 "batch": job["batch"] * (2 if job["guidance"] > 1.0 else 1),
                 "method": "torch.utils.flop_counter on one eager U-Net call (2 FLOPs per multiply-add, "
                           "attention via the math SDPA path)" if flops else None},
        "stages_help": STAGES_HELP,
        "backends": backends,
    })


def _backend_stats(r: BackendRun, job: dict[str, Any], machine: dict[str, Any], images: dict[str, Any],
                   flops: int | None) -> dict[str, Any]:
    ok = r.status == "ok"
    e2e = stats.summarize(x["e2e_s"] for x in r.runs) if ok else None
    stages: dict[str, Any] = {}
    if ok:
        for s in STAGE_NAMES:
            stages[s] = stats.summarize(x["stages_s"][s] for x in r.runs)
        stages["unet_per_step"] = stats.summarize(x["unet_per_step_s"] for x in r.runs if x["unet_per_step_s"])
        stages["other"] = stats.summarize(x["other_s"] for x in r.runs)
    cold: dict[str, Any] = {}
    if r.spawn_to_ready_s is not None:
        build_s = r.info.get("engine_build_s") or 0.0
        cold = {"spawn_to_ready_s": r.spawn_to_ready_s - build_s, "import_s": r.info.get("import_s"),
                "load_s": r.info.get("load_s"), "first_image_s": r.first_image_s,
                "total_s": r.spawn_to_ready_s - build_s + r.first_image_s if r.first_image_s is not None else None,
                "verify_hashes": False}
        if r.info.get("engine_build_s") is not None:
            cold["engine_build_s"] = build_s  # one-off, like the export: not part of the cold start
        if e2e and r.first_image_s is not None:
            overhead = max(0.0, r.first_image_s - e2e["median"])
            cold["first_image_overhead_s"] = overhead
            if r.name == "torch-compile":
                cold["compile_s"] = overhead
    parity = None
    if ok and r.name in images and REFERENCE in images:
        if r.name == REFERENCE:
            parity = {"reference": True, "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "psnr_db": None}
        else:
            try:
                parity = {"reference": False, **stats.parity(images[r.name], images[REFERENCE])}
            except ValueError as e:
                parity = {"error": str(e)}
            if job["scheduler"] in ("euler-a", "lcm"):
                parity["note"] = "stochastic scheduler: per-step noise differs between torch and numpy"
            if r.name == "onnxruntime-fast" and "onnxruntime" in images:  # the fast mode's own fidelity
                parity["vs_exact"] = stats.parity(images[r.name], images["onnxruntime"])
                parity["deepcache"] = job["deepcache"]
    peak = _matmul_peak_for(r, machine)
    unet_ps = stages.get("unet_per_step", {}) or {}
    gflops = stats.throughput_gflops(flops, unet_ps.get("median")) if ok else None
    return {
        "name": r.name,
        "status": r.status,
        "error": r.error,
        "failed_at": r.failed_at,
        "provider": r.info.get("provider"),
        "device": r.info.get("device"),
        "device_name": r.info.get("device_name"),
        "precision": r.info.get("precision"),
        "engine": r.info.get("engine"),
        "e2e_s": e2e,
        "stages_s": stages or None,
        "images_per_s": stats.images_per_second(job["batch"], e2e["median"]) if e2e else None,
        "cold_start": cold or None,
        "memory": {"peak_rss_bytes": r.rss_peak_bytes, "device_peak_bytes": r.device_peak_bytes,
                   "device_method": ("torch.cuda.max_memory_allocated" if r.name.startswith("torch")
                                     else "nvidia-smi per-process, sampled after load and each run")
                   if r.device_peak_bytes is not None else None},
        "parity": parity,
        "unet_throughput": {"gflops_per_s": gflops, "matmul_peak_gflops": peak,
                            "fraction_of_matmul_peak": gflops / peak if gflops and peak else None} if gflops else None,
        "runs": r.runs,
        "warmup_runs": r.warmup,
        "log": r.log,
    }


def _matmul_peak_for(r: BackendRun, machine: dict[str, Any]) -> float | None:
    peak = machine.get("matmul_peak") or {}
    if r.info.get("device") == "cuda":
        return peak.get("cuda_fp16_gflops" if r.info.get("precision") == "fp16" else "cuda_fp32_gflops")
    return peak.get("cpu_fp32_gflops")


def _speedups(s: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float | None] | None:
    if s["status"] != "ok" or ref is None:
        return None
    out = {"e2e": stats.speedup(ref["e2e_s"]["median"], s["e2e_s"]["median"])}
    for stage in ("text_encoder", "unet_per_step", "vae_decoder"):
        a, b = (ref["stages_s"] or {}).get(stage), (s["stages_s"] or {}).get(stage)
        out[stage] = stats.speedup(a["median"], b["median"]) if a and b else None
    return out


def default_out_dir(config: BenchConfig) -> Path:
    label = config.name or Path(config.model or DEFAULT_MODEL).name or "bench"
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "bench"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return benchmarks_dir() / "results" / f"{label}-{stamp}"
