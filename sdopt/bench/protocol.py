"""MLPerf-style protocols: fixed generation settings, an accuracy window, and the Offline / Server scenarios.

`--protocol mlperf-sdxl` follows MLPerf Inference's SDXL text-to-image task: COCO-2014 captions,
one fixed latent for every caption, EulerDiscrete with 20 steps, guidance 8, MLPerf's fixed negative
prompt, 1024x1024; FID against the val2014 statistics must fall in [23.0109, 23.9501] and CLIP score
in [31.6863, 31.8133] (5,000 captions, CLIP ViT-bigG in MLPerf's reference; what `--clip-model`
names is recorded). The settings can be overridden by flags (e.g. a tiny model's size): the run is
then reported as not conformant, with the reasons.

Scenarios (measured on the generated set, not by MLPerf's LoadGen):
    Offline  every query at once: throughput = images / seconds, one backend at a time.
    Server   queries arrive as a Poisson process at --server-qps and are sent as real HTTP requests
             to `sdopt serve` (one the bench starts on loopback for the artifact, or --server-url);
             p99 of arrival-to-image latency is checked against --server-target-s (MLPerf SDXL: 20 s).
             The HTTP API takes a seed per image, not latents: each query carries its caption's seed,
             and accuracy (FID, CLIP) stays the Offline run's. See sdopt.bench.server_scenario.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MLPERF_NEGATIVE_PROMPT = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"
PROTOCOLS: dict[str, dict[str, Any]] = {
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
    """The Server scenario's result (results.json: quality.server)."""

    queries: int  # issued
    completed: int  # answered 200
    qps: float
    target_s: float
    latency_p50_s: float | None  # arrival-to-image, over the completed queries
    latency_p99_s: float | None
    met: bool  # every query completed and p99 <= target
    transport: str  # "HTTP POST <url>/v1/images/generations"
    statuses: dict[str, int] = field(default_factory=dict)  # "200", "503", "timeout", "error", ...
    first_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def poisson_arrivals(n: int, qps: float, seed: int = 0) -> list[float]:
    """Arrival times (s from the start) of n queries at rate qps: cumulative exponential gaps."""
    gaps = np.random.default_rng(seed).exponential(1.0 / qps, size=n)
    return [float(t) for t in np.cumsum(gaps)]


def server_result(
    latencies: list[float | None],
    statuses: list[str],
    qps: float,
    target_s: float,
    transport: str,
    first_error: str | None = None,
) -> Server:
    """The Server scenario from each query's latency (None: not completed) and status.

    Args:
        latencies: arrival-to-image seconds per query, None where it did not complete.
        statuses: per query: "200", an HTTP status, "timeout", "error" or "unsent".
        qps: the arrival rate.
        target_s: the p99 latency target.
        transport: how the queries travelled, e.g. "HTTP POST http://127.0.0.1:8000/v1/images/generations".
        first_error: the first failed query's error message.

    Returns:
        The Server result; `met` needs every query completed and p99 <= target_s.
    """
    from sdopt.bench.stats import median, percentile

    done = [t for t in latencies if t is not None]
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    p50 = median(done) if done else None
    p99 = percentile(done, 99.0) if done else None
    met = len(done) == len(latencies) and p99 is not None and p99 <= target_s
    return Server(len(latencies), len(done), qps, target_s, p50, p99, met, transport, counts, first_error)
