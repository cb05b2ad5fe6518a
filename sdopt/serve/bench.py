"""`sdopt bench-serve URL`: N generation requests at concurrency C against a running server.

Loopback targets only (it is a load generator), bounded in time. Reports throughput in
images/s, latency percentiles of the successful requests, and counts by status.

The client pieces (`check_loopback`, `auth_headers`, `post_generation`, `read_ready`, `read_metrics`) are also the
HTTP side of `sdopt bench --quality`'s MLPerf Server scenario (sdopt.bench.server_scenario).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from sdopt.errors import SdoptError

GENERATIONS_PATH = "/v1/images/generations"


@dataclass(frozen=True)
class BenchServeOptions:
    """One load run."""

    url: str
    requests: int = 16
    concurrency: int = 4
    steps: int = 8
    size: str | None = None
    guidance: float = 7.5
    time_limit_s: float = 600.0
    api_key_env: str | None = None
    label: str = ""


@dataclass
class BenchServeResult:
    """What a load run measured (seconds, images/s)."""

    options: BenchServeOptions
    wall_s: float
    images: int
    images_per_s: float
    latency_s: dict[str, float]  # p50, p90, p99, mean, max of the 200s
    statuses: dict[str, int]  # "200", "503", ..., "timeout", "error", "unsent"
    server_timings_s: dict[str, float] = field(default_factory=dict)  # mean per stage, from the responses

    def summary(self) -> str:
        """One human-readable paragraph."""
        lat = self.latency_s
        lat_text = ", ".join(f"{k} {v:.2f} s" for k, v in lat.items()) if lat else "no successful request"
        return (
            f"{self.options.requests} requests at concurrency {self.options.concurrency}, "
            f"{self.options.steps} steps: {self.images} images in {self.wall_s:.1f} s = "
            f"{self.images_per_s:.3f} images/s; latency {lat_text}; status {self.statuses}"
        )


def check_loopback(url: str) -> None:
    """Raises SdoptError unless every address `url`'s host resolves to is loopback."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SdoptError(f"{url!r} is not an http(s) URL", "pass e.g. http://127.0.0.1:8000")
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 80)
    except socket.gaierror as e:
        raise SdoptError(f"cannot resolve {parsed.hostname}: {e}", "pass e.g. http://127.0.0.1:8000") from e
    if not all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos):
        raise SdoptError(
            f"{parsed.hostname} is not a loopback address: bench-serve only loads servers on this machine",
            "run it on the server's machine against http://127.0.0.1:PORT",
        )


def run_bench_serve(options: BenchServeOptions) -> BenchServeResult:
    """Send the requests and measure.

    Args:
        options: Target, load shape and time bound.

    Returns:
        The measured BenchServeResult.

    Raises:
        SdoptError: a non-loopback target, bad counts, or an unset API key variable.
    """
    check_loopback(options.url)
    if options.requests < 1 or options.concurrency < 1 or options.time_limit_s <= 0:
        raise SdoptError("--requests, --concurrency and --time-limit must be positive", "pass e.g. -n 16 -c 4")
    headers = auth_headers(options.api_key_env)
    endpoint = options.url.rstrip("/") + GENERATIONS_PATH
    deadline = time.monotonic() + options.time_limit_s
    lock = threading.Lock()
    outcomes: list[tuple[str, float, int, dict]] = []

    def one(i: int) -> None:
        outcome = _send(endpoint, headers, _body(options, i), deadline)
        with lock:
            outcomes.append(outcome)

    t0 = time.monotonic()
    with ThreadPoolExecutor(options.concurrency) as pool:
        list(pool.map(one, range(options.requests)))
    return _result(options, outcomes, time.monotonic() - t0)


def _body(options: BenchServeOptions, i: int) -> bytes:
    body = {
        "prompt": f"a watercolour lighthouse, variation {i}",
        "n": 1,
        "seed": i,
        "num_inference_steps": options.steps,
        "guidance_scale": options.guidance,
    }
    if options.size:
        body["size"] = options.size
    return json.dumps(body).encode()


def auth_headers(api_key_env: str | None) -> dict[str, str]:
    """JSON headers, plus 'Authorization: Bearer <key>' read from the named variable.

    Args:
        api_key_env: name of the environment variable holding the server's API key, or None.

    Returns:
        The request headers.

    Raises:
        SdoptError: the variable is named but not set.
    """
    headers = {"Content-Type": "application/json"}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise SdoptError(f"{api_key_env} is not set", f"export {api_key_env}=<key>")
        headers["Authorization"] = f"Bearer {key}"
    return headers


@dataclass
class Reply:
    """One generation request's outcome: status ("200", "503", "timeout", "error", "unsent"), seconds, body."""

    status: str
    seconds: float
    payload: dict[str, Any] | None = None  # the JSON body of a 200
    error: str | None = None  # the server's error message, or the client's exception


def post_generation(endpoint: str, headers: dict[str, str], body: bytes, deadline: float) -> Reply:
    """POST one request body and wait for the answer until `deadline` (time.monotonic()).

    Args:
        endpoint: the server's .../v1/images/generations URL.
        headers: from `auth_headers`.
        body: the JSON request (an ImagesRequest).
        deadline: time.monotonic() after which the request is not sent, or given up ("timeout").

    Returns:
        The Reply (never raises for HTTP or network errors).
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return Reply("unsent", 0.0)
    t0 = time.monotonic()
    request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=remaining) as response:
            return Reply(str(response.status), time.monotonic() - t0, json.loads(response.read()))
    except urllib.error.HTTPError as e:
        return Reply(str(e.code), time.monotonic() - t0, error=_error_message(e))
    except TimeoutError as e:
        return Reply("timeout", time.monotonic() - t0, error=str(e))
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        return Reply(("timeout" if "timed out" in str(e) else "error"), time.monotonic() - t0, error=str(e))


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's `error.message` (sdopt's error body), else the HTTP reason."""
    try:
        return str(json.loads(error.read())["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {error.code} {error.reason}"


def read_ready(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """GET URL/ready: what a running `sdopt serve` says about itself (ready, family, source, max_batch).

    Args:
        url: the server's base URL.
        timeout_s: how long to wait for the answer.

    Returns:
        The /ready JSON body.

    Raises:
        SdoptError: nothing answers there, or it is not an sdopt server that is ready.
    """
    fix = "start one with `sdopt serve ARTIFACT --port PORT` and pass its URL, or check host and port"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ready", timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise SdoptError(f"the server at {url} is not ready (HTTP {e.code} from /ready)", fix) from e
    except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise SdoptError(f"no sdopt server answers at {url} ({reason})", fix) from e
    if not isinstance(body, dict) or body.get("ready") is not True:
        raise SdoptError(f"{url}/ready did not answer like a ready sdopt server: {str(body)[:200]}", fix)
    return body


def read_metrics(url: str, names: tuple[str, ...], timeout_s: float = 10.0) -> dict[str, float] | None:
    """Sums of the named samples in URL/metrics (Prometheus text, e.g. "sdopt_unet_batch_images_count").

    Args:
        url: the server's base URL.
        names: sample names, each summed over its labels.
        timeout_s: how long to wait for the answer.

    Returns:
        name -> value (0.0 when absent); None when /metrics cannot be read. One replica answers.
    """
    try:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except (ImportError, urllib.error.URLError, ConnectionError, OSError, ValueError):
        return None
    return {name: float(sum(s.value for s in samples if s.name == name)) for name in names}


def _send(endpoint: str, headers: dict[str, str], body: bytes, deadline: float) -> tuple[str, float, int, dict]:
    """(status, seconds, images, server timings) of one request."""
    reply = post_generation(endpoint, headers, body, deadline)
    payload = reply.payload or {}
    return reply.status, reply.seconds, len(payload.get("data", [])), payload.get("timings", {})


def _result(options: BenchServeOptions, outcomes: list[tuple[str, float, int, dict]], wall: float) -> BenchServeResult:
    statuses: dict[str, int] = {}
    for status, *_ in outcomes:
        statuses[status] = statuses.get(status, 0) + 1
    ok = [(s, n, t) for status, s, n, t in outcomes if status == "200"]
    latencies = np.array([s for s, _, _ in ok])
    lat = {}
    if len(latencies):
        lat = {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)}
        lat.update(mean=float(latencies.mean()), max=float(latencies.max()))
    images = sum(n for _, n, _ in ok)
    stages = sorted({k for _, _, t in ok for k in t})
    server = {k: float(np.mean([t.get(k, 0.0) for _, _, t in ok])) for k in stages}
    return BenchServeResult(options, wall, images, images / wall if wall > 0 else 0.0, lat, statuses, server)


def write_result(result: BenchServeResult, path: Path) -> Path:
    """Write the result as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
    os.replace(tmp, path)
    return path
