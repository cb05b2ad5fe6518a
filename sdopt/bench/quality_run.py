"""`sdopt bench --quality N`: generate the same N images on every backend, score them, gate on the scores.

generate_sets  while the workers live: N prompts x one seed each (or --latents), PNGs under
               <out>/quality/<backend>/
server_scenario  once the workers are gone, where asked for: MLPerf's Server scenario over HTTP
               through `sdopt serve` (sdopt.bench.server_scenario)
add_metrics    sdopt.bench.quality's scores into the results, the quality gate, the protocol's
               window, the image grids
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdopt.bench.config import REFERENCE, BenchConfig
from sdopt.bench.plan import Log
from sdopt.bench.records import BackendRun, Job

CHUNK = 8  # images per generate request (progress lines between them)


@dataclass
class QualityPlan:
    items: list[tuple[str, int]]  # (prompt, seed) per image
    folder: Path
    latents_path: str | None
    server: dict[str, Any] | None = None  # the Server scenario (sdopt.bench.server_scenario.run)


def generate_sets(runs: dict[str, BackendRun], config: BenchConfig, job: Job, out: Path, log: Log) -> QualityPlan:
    """Every running backend generates the N images, one backend after the other.

    Args:
        runs: the backends; the running ones get `quality_dir` and `quality_seconds` filled in.
        config: --quality N and its options.
        job: the benchmark job (size, steps, guidance, negative prompt).
        out: the results folder.
        log: progress lines.

    Returns:
        What `add_metrics` needs.
    """
    from sdopt.bench.quality_inputs import prompt_set

    plan = QualityPlan(
        prompt_set(config.prompts, config.quality, config.seed),
        out / "quality",
        str(Path(config.latents).expanduser()) if config.latents else None,
    )
    for name, r in runs.items():
        if r.status != "ok":
            continue
        folder = plan.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        r.quality_dir = str(folder)
        t0 = time.perf_counter()
        for start in range(0, len(plan.items), CHUNK):
            items = [
                {"prompt": p, "seed": s, "path": str(folder / f"{start + i:05d}.png")}
                for i, (p, s) in enumerate(plan.items[start : start + CHUNK])
            ]
            if not _generate(r, items, job, plan, f"quality {start + len(items)}/{len(plan.items)}", log):
                break
        else:
            log(f"{name}: {len(plan.items)} quality images in {time.perf_counter() - t0:.1f} s")
    return plan


def server_scenario(
    plan: QualityPlan, runs: dict[str, BackendRun], config: BenchConfig, artifact: Path, job: Job, log: Log
) -> None:
    """MLPerf's Server scenario over HTTP (where --protocol, --server-qps or --server-url ask for it), once
    the workers are gone: the local server then has the machine to itself."""
    from sdopt.bench import server_scenario

    if server_scenario.wanted(config):
        plan.server = server_scenario.run(plan.items, runs, config, artifact, job, plan.folder / "server", log)


def check_latents(path: str, job: Job) -> None:
    """--latents must hold one image's initial latents of the job's shape (MLPerf's latents, 1x4x128x128)."""
    import numpy as np

    from sdopt.errors import SdoptError

    want = (1, *job.latent_shape[1:])
    try:
        shape = tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError) as e:
        raise SdoptError(f"--latents {path} is not a readable .npy ({e})", "save it with numpy.save") from e
    if shape != want:
        raise SdoptError(
            f"--latents {path} has shape {shape}, but {job.height}x{job.width} needs {want}",
            f"pass latents of shape {want} (height / {job.height // job.latent_shape[2]} per side)",
        )


def _generate(r: BackendRun, items: list[dict[str, Any]], job: Job, plan: QualityPlan, label: str, log: Log) -> bool:
    from sdopt.bench.runner import close_worker, request

    reply = request(
        r, cmd="generate", items=items, negative_prompt=job.negative_prompt, latents_path=plan.latents_path
    )
    if not reply.get("ok"):
        r.fail("quality", reply.get("error", "unknown error"))
        log(f"{r.name}: FAILED in {label}: {r.error}")
        close_worker(r)
        return False
    r.absorb_memory(reply)
    r.quality_seconds.extend(reply["seconds"])
    log(f"{r.name}: {label}")
    return True


def add_metrics(
    results: dict[str, Any], runs: dict[str, BackendRun], plan: QualityPlan, config: BenchConfig, out: Path, log: Log
) -> None:
    """Score every backend's set, then add the scores, the gate and the protocol's window to `results`."""
    from sdopt.bench import quality, quality_inputs
    from sdopt.bench.protocol import offline
    from sdopt.bench.quality_report import write_grids

    sets = {
        b: quality_inputs.read_image_folder(r.quality_dir)
        for b, r in runs.items()
        if r.status == "ok" and r.quality_dir and len(r.quality_seconds) == len(plan.items)
    }
    log(f"scoring {len(sets)} image set(s) of {len(plan.items)} (InceptionV3 features, CLIP) ...")
    module, source = quality_inputs.load_inception(config.inception_weights)
    clip = quality_inputs.load_clip(config.clip_model) if config.clip_model else None
    size = (results["job"]["height"], results["job"]["width"])
    refs = quality.References(
        images=quality_inputs.read_image_folder(config.ref_images, size=size) if config.ref_images else None,
        stats=quality_inputs.read_ref_stats(config.ref_stats) if config.ref_stats else None,
    )
    prompts = [p for p, _ in plan.items]
    scores = quality.score_sets(
        sets, prompts, REFERENCE if REFERENCE in sets else None, quality.InceptionFeatures(module, source), clip, refs
    )
    for b in results["backends"]:
        r = runs[b["name"]]
        if b["name"] in scores:
            entry = scores[b["name"]].to_dict()
            entry["seconds_per_image"] = sum(r.quality_seconds) / len(r.quality_seconds)
            entry["offline"] = offline(r.quality_seconds).__dict__
            b["quality"] = entry
    results["quality"] = _summary(config, plan, source, refs, len(prompts))
    results["quality"]["server"] = plan.server
    results["quality"]["grids"] = write_grids(sets, out / "quality", prompts)
    results["quality"]["gate"] = gate(results, config)
    if config.protocol:
        results["quality"]["protocol"] = _protocol(results, config)


def _summary(config: BenchConfig, plan: QualityPlan, inception: str, refs: Any, n: int) -> dict[str, Any]:
    from sdopt.bench.quality import FID_UNBIASED_N, KID_NOTE, NO_CLIP, bias_note

    return {
        "n": n,
        "prompts": config.prompts or "built-in list (sdopt.bench.quality_inputs.BUILTIN_PROMPTS)",
        "seeds": f"{config.seed}..{config.seed + n - 1} (one per prompt)"
        if not plan.latents_path
        else f"fixed latents {plan.latents_path}",
        "reference": REFERENCE,
        "inception_weights": inception,
        "clip_model": config.clip_model,
        "clip_note": None if config.clip_model else NO_CLIP,
        "ref_images": config.ref_images,
        "ref_images_n": None if refs.images is None else len(refs.images),
        "ref_stats": config.ref_stats,
        "fid_unbiased_n": FID_UNBIASED_N,
        "fid_bias_note": bias_note(n),
        "kid_note": KID_NOTE,
        "images": str(plan.folder),
    }


def gate(results: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    """--max-fid-delta / --min-clip-score over every backend but the reference.

    The FID delta is the backend's FID against --ref-stats (else --ref-images) minus torch's; with
    neither, the FID of the backend's set against torch's set. A limit that cannot be checked (no
    CLIP weights, a backend without images) fails.
    """
    failures: list[str] = []
    if config.max_fid_delta is None and config.min_clip_score is None:
        return {"max_fid_delta": None, "min_clip_score": None, "failures": failures, "passed": True}
    by = {b["name"]: b for b in results["backends"]}
    key = "fid_vs_ref_stats" if config.ref_stats else "fid_vs_ref_images" if config.ref_images else "fid"
    ref_fid = ((by.get(REFERENCE) or {}).get("quality") or {}).get(key) if key != "fid" else 0.0
    for name, b in by.items():
        if name == REFERENCE or b["status"] == "skipped":
            continue
        q = b.get("quality")
        if not q:
            failures.append(f"{name}: no quality numbers ({b.get('error') or 'no images'})")
            continue
        if config.max_fid_delta is not None:
            value = q.get(key)
            delta = None if value is None or ref_fid is None else value - ref_fid
            if delta is None or delta > config.max_fid_delta:
                failures.append(f"{name}: FID delta {_fmt(delta)} > {config.max_fid_delta:g} ({key})")
        if config.min_clip_score is not None:
            clip = q.get("clip_score")
            if clip is None or clip < config.min_clip_score:
                failures.append(f"{name}: CLIP score {_fmt(clip)} < {config.min_clip_score:g}")
    return {
        "max_fid_delta": config.max_fid_delta,
        "min_clip_score": config.min_clip_score,
        "fid_key": key,
        "failures": failures,
        "passed": not failures,
    }


def _protocol(results: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    from sdopt.bench.protocol import deviations, window_check

    assert config.protocol is not None  # called only with --protocol
    reasons = deviations(config.protocol, config, results["artifact"].get("family", "?"))
    checks = {}
    for b in results["backends"]:
        q = b.get("quality") or {}
        fid = q.get("fid_vs_ref_stats") if config.ref_stats else None
        checks[b["name"]] = window_check(config.protocol, fid, q.get("clip_score"))
    conformant = not reasons
    if conformant:
        for name, c in checks.items():
            if c["fid_ok"] is False or c["clip_ok"] is False:
                results["quality"]["gate"]["failures"].append(f"{name}: outside the {config.protocol} window")
                results["quality"]["gate"]["passed"] = False
    return {"name": config.protocol, "conformant": conformant, "deviations": reasons, "window": checks}


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"
