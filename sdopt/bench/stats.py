"""Pure statistics: latency summaries, image parity and speedups. No I/O, no torch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def median(values: Sequence[float]) -> float:
    xs = sorted(values)
    if not xs:
        raise ValueError("median of no values")
    mid = len(xs) // 2
    return float(xs[mid]) if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default 'linear' method)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def p90(values: Sequence[float]) -> float:
    return percentile(values, 90.0)


def summarize(values: Iterable[float]) -> dict[str, float | int] | None:
    """{median, p90, min, max, mean, n} of latencies in seconds; None when there are none."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    return {
        "median": median(xs),
        "p90": p90(xs),
        "min": min(xs),
        "max": max(xs),
        "mean": sum(xs) / len(xs),
        "n": len(xs),
    }


def images_per_second(batch: int, seconds: float) -> float | None:
    return batch / seconds if seconds and seconds > 0 else None


def speedup(reference_seconds: float | None, seconds: float | None) -> float | None:
    """How many times faster than the reference (>1: faster). None when either is missing."""
    if not reference_seconds or not seconds or seconds <= 0:
        return None
    return reference_seconds / seconds


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _same_shape(a, b)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images on [0, peak]; inf for identical images."""
    a, b = _same_shape(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def parity(image: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Compare one backend's images with the reference's (NHWC floats on [0, 1])."""
    a, b = _same_shape(image, reference)
    return {"max_abs_diff": max_abs_diff(a, b), "mean_abs_diff": float(np.mean(np.abs(a - b))), "psnr_db": psnr(a, b)}


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def throughput_gflops(flops: float | None, seconds: float | None) -> float | None:
    if not flops or not seconds or seconds <= 0:
        return None
    return flops / seconds / 1e9


def finite_or_none(value: Any) -> Any:
    """JSON has no inf/nan: map them to None, recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
