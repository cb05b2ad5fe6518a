"""Orchestrates one benchmark: checks, export cache, per-backend workers, alternating runs, results.

Order of work (cheap before heavy, so bad input fails fast):
1. `plan`: validate the config, find which backends this machine has, check size/batch against the
   model's preset or the artifact's manifest;
2. export the model (or reuse the cached export; with --controlnet, its ControlNets too: see
   sdopt.bench.control), measure the machine's matmul peak;
3. start one worker process per backend, one after another (cold start is timed on a quiet
   machine), then run warm-up and measured rounds with the backends interleaved run by run —
   ABAB... in even rounds, reversed in odd ones, so slow drift (thermals, other load) hits
   every backend alike;
4. with `--quality N`: every backend generates the same N prompts with the same seeds
   (sdopt.bench.quality_run), and the metrics are computed once the workers are gone;
5. collect images (parity against torch eager), memory and FLOPs, and build the results dict
   (sdopt.bench.results; see benchmarks/README.md for its schema).
A backend that fails at any point becomes a "failed" row with its error; the others go on.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from sdopt.bench import control
from sdopt.bench.config import REFERENCE, BenchConfig
from sdopt.bench.machine import machine_info, measure_matmul_peak
from sdopt.bench.plan import Log, Plan, check_image, default_out_dir, ensure_artifact, plan
from sdopt.bench.process import WorkerDied, WorkerProcess
from sdopt.bench.records import BackendRun, Job, make_job, run_entry
from sdopt.manifest import Manifest, load_manifest


def run_benchmark(
    config: BenchConfig,
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    log: Log | None = None,
    command: str | None = None,
    faults: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and write its reports to `out_dir`.

    Args:
        config: what to run (validated again here).
        out_dir: results folder (default benchmarks/results/<label>-<date>/).
        cache_dir: where exports of model ids are cached.
        log: receives one line per step (default: silent).
        command: the command line to record in the results.
        faults: tests only: make a backend's worker fail on purpose, {"onnxruntime": {"fault": "run"}}.

    Returns:
        The results dict (also written as results.json); "_out" holds the results folder.
    """
    log = log or (lambda msg: None)
    p = plan(config, cache_dir)
    out = Path(out_dir) if out_dir else default_out_dir(config)
    artifact, artifact_info = ensure_artifact(p, log)
    manifest = load_manifest(artifact)
    job, machine = _prepare(p, config, manifest, artifact, out, log)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: bad input leaves no empty results folder
    control.write_control_image(config, job, out)
    runs = _backend_runs(config, p)
    quality_plan = None
    with tempfile.TemporaryDirectory(prefix="sdopt-bench-") as tmp:
        try:
            _load_all(p.backends, runs, artifact, job, out, faults or {}, log)
            _measure(runs, config, control.stage_names(job), log)
            if config.quality:
                from sdopt.bench import quality_run

                quality_plan = quality_run.generate_sets(runs, config, job, out, log)
            _finish_all(runs, Path(tmp), log)
        finally:
            for r in runs.values():
                if r.worker is not None:
                    r.worker.close()
                    r.worker = None
        images = _load_images(runs)
        from sdopt.bench.results import build_results

        results = build_results(config, job, manifest, artifact_info, machine, runs, images, command)
    if quality_plan is not None:
        from sdopt.bench import quality_run

        quality_run.server_scenario(quality_plan, runs, config, artifact, job, log)
        quality_run.add_metrics(results, runs, quality_plan, config, out, log)
    from sdopt.bench import report

    report.write_all(results, out, images)
    results["_out"] = str(out)
    return results


def _backend_runs(config: BenchConfig, p: Plan) -> dict[str, BackendRun]:
    """One record per requested backend, in table order; those this machine cannot run already skipped."""
    runs = {b: BackendRun(b) for b in config.backend_list()}
    for b, reason in p.skipped.items():
        runs[b].status, runs[b].error = "skipped", reason
    return runs


def _prepare(
    p: Plan, config: BenchConfig, manifest: Manifest, artifact: Path, out: Path, log: Log
) -> tuple[Job, dict]:
    """The job (checked against the exported manifest; a ControlNet job's control image written to `out`)
    and the machine facts, matmul peak included."""
    if p.artifact is None:  # checks that needed the exported manifest (non-synthetic models)
        check_image(config, manifest.image, f"the export of {p.model}'s")
    job = make_job(config, manifest, artifact, p.threads)
    job.build_engines = p.artifact is None  # TensorRT engines: built on demand into the harness's cached export
    if config.controlnet:  # its control image is checked here, written once the results folder exists
        control.prepare_job(job, config, manifest, out, f"the artifact {artifact.name}")
    if config.quality and config.server_url:  # before any worker starts: a server that is not there fails fast
        from sdopt.bench.server_scenario import check_server_url

        check_server_url(config.server_url, config.server_api_key_env)
    if config.quality and config.latents:
        from sdopt.bench.quality_run import check_latents

        check_latents(config.latents, job)  # before any worker starts
    log(
        f"job: {job.height}x{job.width}, {job.steps} steps, batch {job.batch}, "
        f"scheduler {job.scheduler}, guidance {job.guidance}, {p.threads} threads"
    )
    machine = machine_info(p.threads)
    log("measuring the fp32 matmul peak ...")
    machine["matmul_peak"] = measure_matmul_peak(p.threads, gpu=bool(machine["gpus"]))
    return job, machine


def _load_all(
    backends: list[str],
    runs: dict[str, BackendRun],
    artifact: Path,
    job: Job,
    out: Path,
    faults: dict[str, dict[str, Any]],
    log: Log,
) -> None:
    """Start the workers one at a time, so each cold start is timed without the others' load."""
    for b in backends:
        r = runs[b]
        log(f"{b}: starting worker and loading ...")
        r.log = str(out / "logs" / f"{b}.log")
        try:
            r.worker = WorkerProcess(b, Path(r.log), job.threads)
            reply = r.worker.request(
                cmd="load", backend=b, artifact=str(artifact), job={**job.to_dict(), **faults.get(b, {})}
            )
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
            close_worker(r)
            continue
        r.status, r.info = "ok", reply["info"]
        r.absorb_memory(reply)
        log(f"{b}: ready in {r.spawn_to_ready_s:.1f} s ({r.info.get('provider')}, {r.info.get('precision')})")


def close_worker(r: BackendRun) -> None:
    if r.worker is not None:
        r.worker.close()
        r.worker = None


def request(r: BackendRun, **msg: Any) -> dict[str, Any]:
    """One request to a backend's worker; a dead worker answers {"ok": False, "error": ...}."""
    if r.worker is None:
        return {"ok": False, "error": "worker not running"}
    try:
        return r.worker.request(**msg)
    except WorkerDied as e:
        return {"ok": False, "error": str(e)}


def _measure(runs: dict[str, BackendRun], config: BenchConfig, stage_names: tuple[str, ...], log: Log) -> None:
    order = [b for b, r in runs.items() if r.status == "ok"]
    total = config.warmup + config.runs
    for i in range(total):
        warm = i < config.warmup
        label = f"warm-up {i + 1}/{config.warmup}" if warm else f"run {i - config.warmup + 1}/{config.runs}"
        for b in order if i % 2 == 0 else order[::-1]:
            r = runs[b]
            if r.status != "ok":
                continue
            reply = request(r, cmd="run")
            if not reply.get("ok"):
                r.fail(label, reply["error"])
                log(f"{b}: FAILED in {label}: {r.error}")
                close_worker(r)
                continue
            entry = run_entry(reply, stage_names)
            r.absorb_memory(reply)
            if r.first_image_s is None:
                r.first_image_s = entry["e2e_s"]
            (r.warmup if warm else r.runs).append(entry)
            log(f"{b}: {label}: {entry['e2e_s']:.3f} s")


def _finish_all(runs: dict[str, BackendRun], tmp: Path, log: Log) -> None:
    for b, r in runs.items():
        if r.status != "ok" or r.worker is None:
            continue
        reply = request(r, cmd="finish", image_path=str(tmp / f"{b}.npy"), count_flops=b == REFERENCE)
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
