"""What every backend worker shares: stage timers, peak memory, the shared initial latents, error text.

Imported only inside worker processes (and by tests); light: no torch at import time.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from sdopt.bench.records import Job

# runtime component -> stage it counts towards
COMPONENT_STAGE = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
    "unet": "unet",
    "unet_shallow": "unet",
    "vae_decoder": "vae_decoder",
    "vae_encoder": "vae_encoder",
    "unet_control": "unet",  # ControlNet artifacts: the residual-taking U-Net
}


def stage_of(component: str) -> str:
    """The stage a runtime component's calls count towards ("controlnet.<name>": the ControlNet stage)."""
    return "controlnet" if component.startswith("controlnet.") else COMPONENT_STAGE.get(component, component)


class Timers:
    """Seconds and call counts per stage, reset before every run."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync or (lambda: None)
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
            self.calls[stage] = self.calls.get(stage, 0) + 1
            return out

        return timed


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux: VmHWM of /proc/self/status, because ru_maxrss
    carries over the parent's peak through fork + exec (a worker started by a parent that
    loaded torch would report the parent's RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def initial_latents(job: Job, seed: int | None = None, batch: int | None = None) -> np.ndarray:
    """The same noise for every backend: numpy's default_rng(seed), float32 (as sdopt's runtime draws it).

    Args:
        job: the benchmark job (latent shape and default seed).
        seed: another seed (--quality: one per prompt).
        batch: another batch size (--quality: one image per prompt).

    Returns:
        Latents of shape job.latent_shape, with `batch` images if given.
    """
    import numpy as np

    shape = list(job.latent_shape)
    if batch is not None:
        shape[0] = batch
    rng = np.random.default_rng(job.seed if seed is None else seed)
    return rng.standard_normal(tuple(shape), dtype=np.float32)


class FaultInjected(RuntimeError):
    """Raised where a test asked for a failure: job.fault = "load" | "run" | "crash" (exit without
    replying), at the run after job.fault_after good runs. Only `run_benchmark(faults=...)` sets it."""


def describe(e: BaseException) -> str:
    """One line for a failed row: an SdoptError's problem and fix, else the exception's first line."""
    from sdopt.errors import SdoptError

    if isinstance(e, SdoptError):
        return e.problem + (f" ({e.fix})" if e.fix else "")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400]}" if text else type(e).__name__
