"""MLPerf's Server scenario through `sdopt serve`: Poisson-timed queries as real HTTP requests.

Where the queries go:
    --server-url URL  a running `sdopt serve` on this machine (loopback only, the rule of every sdopt
                      load generator: sdopt.serve.bench.check_loopback); its artifact, provider and
                      batching are its own, and what its /ready says is recorded.
    default           the bench starts `sdopt serve ARTIFACT` itself, as a user runs it (a local Ray
                      Serve instance on a free loopback port), once its workers have exited, and stops
                      it with Ctrl-C (SIGINT) when every query is answered.

A query is one of the first min(N, 64) captions of the quality set, sent as the serve schema's
ImagesRequest with the job's size, steps, guidance, scheduler and negative prompt, and the caption's
seed. The HTTP API takes a seed per image, not initial latents, so MLPerf's fixed latent does not
travel: accuracy (FID, CLIP score) is the Offline set's (which uses --latents), and the Server
scenario measures latency. Arrivals are open-loop, as in LoadGen's Server scenario: each query is
sent at its arrival time whether or not earlier ones were answered; latency = answer - arrival.

torch: not measured. `sdopt serve` serves the runtime; a Poisson replay into torch in-process
would measure something else (no HTTP, no step batching) under the same name.
"""

from __future__ import annotations

import base64
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sdopt.bench.config import BenchConfig
from sdopt.bench.plan import Log
from sdopt.bench.protocol import PROTOCOLS, Server, offline, poisson_arrivals, server_result
from sdopt.bench.records import BackendRun, Job
from sdopt.errors import SdoptError
from sdopt.serve import process as serve_process
from sdopt.serve.bench import GENERATIONS_PATH, auth_headers, post_generation, read_metrics, read_ready

MAX_QUERIES = 64
RUNTIME_BACKEND = "onnxruntime"  # the backend whose engine `sdopt serve` runs
START_TIMEOUT_S = 300.0  # a local Ray instance plus one replica loading the artifact
BATCH_METRICS = ("sdopt_unet_batch_images_count", "sdopt_unet_batch_images_sum")  # the server's step batcher
SEED_NOTE = (
    "one seed per query (the caption's): the HTTP API takes seeds, not latents, so MLPerf's fixed "
    "latent cannot travel; accuracy is measured on the Offline set"
)
TORCH_NOTE = "torch: not measured (sdopt serve serves the runtime; an in-process replay is not the Server scenario)"


def check_server_url(url: str, api_key_env: str | None = None) -> dict[str, Any]:
    """--server-url answers as a ready sdopt server and its key variable is set (before any worker starts).

    Args:
        url: --server-url.
        api_key_env: --server-api-key-env.

    Returns:
        The server's /ready body.

    Raises:
        SdoptError: nothing answers there, it is not ready, or the key variable is not set.
    """
    auth_headers(api_key_env)
    try:
        return read_ready(url)
    except SdoptError as e:
        fix = f"{e.fix}; or leave --server-url out: the bench starts one"
        raise SdoptError(f"--server-url: {e.problem}", fix) from e


def wanted(config: BenchConfig) -> bool:
    """Whether this run has a Server scenario: --protocol, --server-qps or --server-url."""
    return bool(config.protocol or config.server_qps or config.server_url)


def query_bodies(items: list[tuple[str, int]], job: Job) -> list[bytes]:
    """One serve-schema request body per (caption, seed): the job's settings, one image each.

    Args:
        items: (caption, seed) per query.
        job: the benchmark job (size, steps, guidance, scheduler, negative prompt).

    Returns:
        The JSON bodies, validated by sdopt.serve.schema.ImagesRequest.
    """
    try:
        from sdopt.serve.schema import ImagesRequest
    except ImportError as e:
        raise SdoptError(f"the Server scenario needs sdopt's serve schema ({e})", "pip install 'sdopt[serve]'") from e
    common = {
        "n": 1,
        "size": f"{job.width}x{job.height}",
        "negative_prompt": job.negative_prompt,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
        "scheduler": job.scheduler,
    }
    return [
        ImagesRequest.model_validate({**common, "prompt": prompt, "seed": seed % 2**32})
        .model_dump_json(exclude_none=True)
        .encode()
        for prompt, seed in items
    ]


def send_queries(
    url: str,
    bodies: list[bytes],
    qps: float,
    target_s: float,
    seed: int = 0,
    api_key_env: str | None = None,
    folder: Path | None = None,
    patience_s: float = 600.0,
) -> Server:
    """Send each body at its Poisson arrival time (open loop) and measure arrival-to-image latency.

    Args:
        url: base URL of a running `sdopt serve`.
        bodies: the request bodies, in arrival order.
        qps: the arrival rate.
        target_s: the p99 latency target.
        seed: seed of the arrival times.
        api_key_env: environment variable holding the server's API key.
        folder: where each answered query's PNG is written (NNNNN.png); None: not kept.
        patience_s: how long after the last arrival an unanswered query is given up ("timeout").

    Returns:
        The Server result (transport "HTTP POST <endpoint>").
    """
    headers = auth_headers(api_key_env)
    endpoint = url.rstrip("/") + GENERATIONS_PATH
    arrivals = poisson_arrivals(len(bodies), qps, seed)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = time.monotonic() + arrivals[-1] + patience_s

    def one(i: int) -> tuple[str, float | None, str | None]:
        wait = arrivals[i] - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        reply = post_generation(endpoint, headers, bodies[i], deadline)
        latency = time.perf_counter() - start - arrivals[i]
        if reply.status != "200" or reply.payload is None:
            return reply.status, None, reply.error or reply.status
        if folder is not None:
            (folder / f"{i:05d}.png").write_bytes(base64.b64decode(reply.payload["data"][0]["b64_json"]))
        return reply.status, latency, None

    with ThreadPoolExecutor(len(bodies)) as pool:  # open loop: one thread per query, at most MAX_QUERIES
        outcomes = list(pool.map(one, range(len(bodies))))
    errors = [e for _, _, e in outcomes if e]
    return server_result(
        [t for _, t, _ in outcomes],
        [s for s, _, _ in outcomes],
        qps,
        target_s,
        f"HTTP POST {endpoint}",
        errors[0] if errors else None,
    )


class LocalServer:
    """`sdopt serve ARTIFACT` in its own process (and process group) on a free loopback port."""

    def __init__(self, artifact: Path, job: Job, queries: int, provider: str, log_path: Path) -> None:
        self.artifact = artifact
        self.log_path = log_path
        self.port = serve_process.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            *("--threads", str(job.threads), "--provider", provider, "--max-steps", str(max(100, job.steps))),
            *("--max-size", str(max(1024, job.height, job.width)), "--max-queue", str(max(16, queries))),
        ]
        self.command = serve_process.command(artifact, self.port, self.args)
        self.proc: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}  # what the server's /ready said once it answered

    def __enter__(self) -> LocalServer:
        self.proc = serve_process.start(self.artifact, self.port, self.args, self.log_path)
        ready = serve_process.wait_ready(self.url, self.proc, START_TIMEOUT_S)
        if ready is not None:
            self.ready = ready
            return self
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        self.__exit__(None, None, None)
        raise SdoptError(
            f"the local `sdopt serve` did not become ready: {lines[-1] if lines else 'no output'}",
            f"see {self.log_path}; or start a server yourself and pass --server-url",
        )

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            serve_process.stop(self.proc)


def run(
    items: list[tuple[str, int]],
    runs: dict[str, BackendRun],
    config: BenchConfig,
    artifact: Path,
    job: Job,
    folder: Path,
    log: Log,
) -> dict[str, Any]:
    """The Server scenario of a `--quality` run (results.json: quality.server).

    Args:
        items: the quality set's (caption, seed) pairs; the first min(N, 64) become queries.
        runs: the backends (onnxruntime's Offline throughput sets the default rate, its provider the server's).
        config: --server-qps, --server-target-s, --server-url, --server-api-key-env, --protocol.
        artifact: the artifact a local server serves.
        job: the benchmark job.
        folder: <out>/quality/server (answered images, the local server's log).
        log: progress lines.

    Returns:
        The Server result as a dict plus where the queries went; {"error": ...} when it could not run.
    """
    rt = runs.get(RUNTIME_BACKEND)
    qps = config.server_qps
    if not qps and rt is not None and rt.status == "ok" and rt.quality_seconds:
        qps = offline(rt.quality_seconds).images_per_s / 2  # half the Offline throughput: a stable queue
    if not qps:
        return {"error": f"no {RUNTIME_BACKEND} Offline throughput to derive the rate from; pass --server-qps"}
    target = config.server_target_s or PROTOCOLS.get(config.protocol or "", {}).get("server_target_s", 20.0)
    queries = items[:MAX_QUERIES]
    extra: dict[str, Any] = {"seeds": SEED_NOTE, "torch": TORCH_NOTE}
    try:
        bodies = query_bodies(queries, job)
        if config.server_url:
            result = _to_url(config, bodies, qps, target, folder, extra)
        else:
            provider = (rt.info.get("provider") if rt is not None else None) or "cpu"
            log(f"Server scenario: starting `sdopt serve` ({provider}) for {len(queries)} queries at {qps:.3g} q/s")
            with LocalServer(artifact, job, len(queries), provider, folder / "serve.log") as server:
                extra.update(url=server.url, started_by="the bench: " + " ".join(server.command), ready=server.ready)
                before = read_metrics(server.url, BATCH_METRICS)
                result = send_queries(server.url, bodies, qps, target, config.seed, None, folder)
                extra["batching"] = batching(before, read_metrics(server.url, BATCH_METRICS))
    except SdoptError as e:
        log(f"Server scenario failed: {e.problem}")
        return {"error": e.problem, **extra}
    p99 = "-" if result.latency_p99_s is None else f"{result.latency_p99_s:.2f}"
    log(f"Server: {result.completed}/{result.queries} answered over HTTP, p99 {p99} s (target {target:g} s)")
    if not config.latents and not config.server_url and rt is not None and rt.quality_dir:
        extra["vs_offline"] = compare_with_offline(folder, Path(rt.quality_dir), len(queries))
    return {**result.to_dict(), **extra}


def compare_with_offline(server: Path, offline_dir: Path, n: int) -> dict[str, Any]:
    """The served images against the Offline set's image of the same caption and seed (one seed each,
    no --latents: the same initial latents), as the largest 8-bit difference; a check, not a gate.

    Args:
        server: the answered images (NNNNN.png).
        offline_dir: onnxruntime's Offline set (NNNNN.png).
        n: queries.

    Returns:
        {"compared": images found in both, "max_abs_diff_uint8": largest pixel difference, or None}.
    """
    import numpy as np
    from PIL import Image

    diffs = []
    for i in range(n):
        a, b = server / f"{i:05d}.png", offline_dir / f"{i:05d}.png"
        if a.is_file() and b.is_file():
            with Image.open(a) as x, Image.open(b) as y:
                pa, pb = np.asarray(x.convert("RGB"), np.int16), np.asarray(y.convert("RGB"), np.int16)
            diffs.append(int(np.abs(pa - pb).max()) if pa.shape == pb.shape else 255)
    return {"compared": len(diffs), "max_abs_diff_uint8": max(diffs) if diffs else None}


def _to_url(
    config: BenchConfig, bodies: list[bytes], qps: float, target: float, folder: Path, extra: dict[str, Any]
) -> Server:
    """The queries to --server-url (checked again: it may have gone since the run started)."""
    url = config.server_url or ""
    extra.update(url=url, started_by="--server-url", ready=read_ready(url))
    before = read_metrics(url, BATCH_METRICS)
    result = send_queries(url, bodies, qps, target, config.seed, config.server_api_key_env, folder)
    extra["batching"] = batching(before, read_metrics(url, BATCH_METRICS))
    return result


def batching(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """U-Net calls and images per call during the scenario, from the server's /metrics before and after.

    Args:
        before: read_metrics(url, BATCH_METRICS) before the first query.
        after: the same after the last answer.

    Returns:
        {"unet_calls", "unet_images" (image-steps), "images_per_unet_call_mean"} of the replica that
        answered /metrics (with one replica, the whole server); None when /metrics could not be read.
    """
    if before is None or after is None:
        return None
    calls = after[BATCH_METRICS[0]] - before[BATCH_METRICS[0]]
    images = after[BATCH_METRICS[1]] - before[BATCH_METRICS[1]]
    return {"unet_calls": calls, "unet_images": images, "images_per_unet_call_mean": images / calls if calls else 0.0}
