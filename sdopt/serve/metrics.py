"""Prometheus metrics of one replica, served at GET /metrics.

Every replica keeps its own registry and labels nothing by replica: Prometheus adds the
scrape target. With several replicas behind one proxy a GET /metrics reaches one of them;
scrape each replica (or sum the `sdopt_*` series) for the cluster's totals.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    """Requests by status, queue depth, U-Net batch sizes, step latency, images/s and LoRA swaps."""

    def __init__(self, window_s: float = 60.0) -> None:
        """Args:
        window_s: Span of the sliding window behind the images/s gauge.
        """
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sdopt_requests", "HTTP requests to /v1/images/generations by status", ["status"], registry=r
        )
        self.request_seconds = Histogram(
            "sdopt_request_seconds", "Request latency (200s only)", buckets=SECONDS_BUCKETS, registry=r
        )
        self.waiting = Gauge("sdopt_queue_depth", "Requests waiting to join the batch on this replica", registry=r)
        self.active = Gauge("sdopt_active_requests", "Requests in the running batch on this replica", registry=r)
        self.batch_size = Histogram(
            "sdopt_unet_batch_images", "Images stacked into one U-Net call", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "sdopt_step_seconds",
            "Latency of one U-Net call (one denoising step of a batch)",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.images = Counter("sdopt_images", "Images generated", registry=r)
        self.images_per_s = Gauge(
            "sdopt_images_per_second", f"Images generated per second over the last {window_s:g} s", registry=r
        )
        self.images_per_s.set_function(self._rate)
        self.lora_swaps = Counter("sdopt_lora_swaps", "LoRA weight swaps (between batches)", registry=r)
        self.lora_swap_seconds = Histogram(
            "sdopt_lora_swap_seconds",
            "Time of one LoRA weight swap (the batch waits for it)",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self._window_s = window_s
        self._done: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    # -- engine hooks (sdopt.serve.engine.EngineObserver) --------------------------------------
    def unet_call(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.step_seconds.observe(seconds)

    def images_done(self, count: int) -> None:
        self.images.inc(count)
        with self._lock:
            self._done.append((time.monotonic(), count))

    def depth(self, waiting: int, active: int) -> None:
        self.waiting.set(waiting)
        self.active.set(active)

    def lora_swap(self, seconds: float) -> None:
        self.lora_swaps.inc()
        self.lora_swap_seconds.observe(seconds)

    # -- app hooks -----------------------------------------------------------------------------
    def request_done(self, status: int, seconds: float | None = None) -> None:
        """Count one answered generation request (and its latency when it succeeded)."""
        self.requests.labels(status=str(status)).inc()
        if status == 200 and seconds is not None:
            self.request_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - self._window_s:
                self._done.popleft()
            return sum(n for _, n in self._done) / self._window_s
