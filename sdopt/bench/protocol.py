"""MLPerf-style protocols: fixed generation settings, an accuracy window, and the Offline / Server scenarios.

`--protocol mlperf-sdxl` follows MLPerf Inference's SDXL text-to-image task: COCO-2014 captions,
one fixed latent for every caption, EulerDiscrete with 20 steps, guidance 8, MLPerf's fixed negative
prompt, 1024x1024; FID against the val2014 statistics must fall in [23.0109, 23.9501] and CLIP score
in [31.6863, 31.8133] (5,000 captions, CLIP ViT-bigG in MLPerf's reference; what `--clip-model`
names is recorded). The settings can be overridden by flags (e.g. a tiny model's size): the run is
then reported as not conformant, with the reasons.

Scenarios (measured on the generated set, not by MLPerf's LoadGen):
    Offline  every query at once: throughput = images / seconds, one backend at a time.
    Server   queries arrive as a Poisson process at --server-qps; each waits for the backend (one
             request at a time, first come first served); p99 of arrival-to-image latency is checked
             against --server-target-s (MLPerf SDXL: 20 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MLPERF_NEGATIVE_PROMPT = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"
PROTOCOLS = {
    "mlperf-sdxl": {
        "settings": {
            "scheduler": "euler",
            "steps": 20,
            "guidance": 8.0,
            "negative_prompt": MLPERF_NEGATIVE_PROMPT,
            "height": 1024,
            "width": 1024,
        },
        "samples": 5000,
        "fid_window": (23.0109, 23.9501),
        "clip_window": (31.6863, 31.8133),
        "server_target_s": 20.0,
        "family": "sdxl",
    },
}
SERVER_TRANSPORT = (
    "in-process: the Server scenario's Poisson arrivals are replayed against the backend's worker "
    "(one request at a time, first come first served), not through an HTTP server"
)


def protocol_settings(name: str) -> dict[str, Any]:
    """The BenchConfig fields a protocol fixes (flags given on the command line still win)."""
    if name not in PROTOCOLS:
        from sdopt.errors import SdoptError

        raise SdoptError(f"unknown protocol {name!r}", f"choose one of: {', '.join(PROTOCOLS)}")
    return dict(PROTOCOLS[name]["settings"])


def deviations(name: str, config: Any, family: str) -> list[str]:
    """Why this run is not the protocol as published (empty: conformant)."""
    spec = PROTOCOLS[name]
    out = [
        f"{key} {getattr(config, key)!r} instead of {want!r}"
        for key, want in spec["settings"].items()
        if getattr(config, key) != want
    ]
    if family != spec["family"]:
        out.append(f"model family {family} instead of {spec['family']}")
    if config.quality < spec["samples"]:
        out.append(f"{config.quality} captions instead of {spec['samples']}")
    if config.latents is None:
        out.append("no --latents: one seed per caption instead of MLPerf's fixed latent")
    if config.ref_stats is None:
        out.append("no --ref-stats: FID against the torch set, not against COCO val2014 statistics")
    return out


def window_check(name: str, fid: float | None, clip: float | None) -> dict[str, Any]:
    """FID and CLIP score against the protocol's accuracy window (None: not measured)."""
    spec = PROTOCOLS[name]

    def inside(value: float | None, window: tuple[float, float]) -> bool | None:
        return None if value is None else window[0] <= value <= window[1]

    return {
        "fid": fid,
        "fid_window": list(spec["fid_window"]),
        "fid_ok": inside(fid, spec["fid_window"]),
        "clip_score": clip,
        "clip_window": list(spec["clip_window"]),
        "clip_ok": inside(clip, spec["clip_window"]),
    }


@dataclass
class Offline:
    images: int
    seconds: float
    images_per_s: float


def offline(seconds_per_image: list[float]) -> Offline:
    """Offline scenario from the sequential generation of the whole set (batch 1, one backend at a time)."""
    total = float(sum(seconds_per_image))
    return Offline(len(seconds_per_image), total, len(seconds_per_image) / total if total > 0 else 0.0)


@dataclass
class Server:
    queries: int
    qps: float
    target_s: float
    latency_p50_s: float
    latency_p99_s: float
    met: bool
    transport: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def poisson_arrivals(n: int, qps: float, seed: int = 0) -> list[float]:
    """Arrival times (s from the start) of n queries at rate qps: cumulative exponential gaps."""
    gaps = np.random.default_rng(seed).exponential(1.0 / qps, size=n)
    return [float(t) for t in np.cumsum(gaps)]


def run_server(
    serve_one: Callable[[int], None],
    n: int,
    qps: float,
    target_s: float,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> Server:
    """Replay Poisson arrivals against `serve_one(i)` (which blocks until query i's image exists).

    Args:
        serve_one: generates the image of query i.
        n: number of queries.
        qps: arrival rate.
        target_s: p99 latency target.
        seed: seed of the arrival times.
        clock: seconds (monotonic).
        sleep: waits while no query has arrived yet.

    Returns:
        The Server scenario's latencies and whether p99 meets the target.
    """
    from sdopt.bench.stats import median, percentile

    arrivals = poisson_arrivals(n, qps, seed)
    start = clock()
    latencies = []
    for i, arrival in enumerate(arrivals):
        wait = arrival - (clock() - start)
        if wait > 0:
            sleep(wait)
        serve_one(i)
        latencies.append(clock() - start - arrival)
    p99 = percentile(latencies, 99.0)
    return Server(n, qps, target_s, median(latencies), p99, p99 <= target_s, SERVER_TRANSPORT)
