"""The child side of the harness: one process per backend, driven by JSON lines.

    python -m sdopt.bench.workers

reads one JSON request per line on stdin and answers each with one JSON line on the
*original* stdout; everything else that libraries print goes to stderr (the parent keeps it
as the backend's log). Requests, in order:

    {"cmd": "load", "backend": ..., "artifact": ..., "job": {...}}   -> {"ok", "info"}
    {"cmd": "run"}                  (repeated)                       -> {"ok", "e2e_s", "stages", ...}
    {"cmd": "generate", "items": [{"prompt", "seed", "path"}, ...],
     "negative_prompt": ..., "latents_path": ...}  (--quality)      -> {"ok", "seconds": [...]}
    {"cmd": "finish", "image_path": ...}                             -> {"ok", "memory", "unet_flops", ...}

A failed request answers {"ok": false, "error": "..."} (and "skip": true where the backend is
not available on this machine). One process per backend keeps peak RSS per backend, and a
crash (segfault, OOM kill) ends one row of the table, not the benchmark.

Both sides time the same work: per stage, the time inside the component calls (text
encoder(s), every ControlNet call in a ControlNet job, every U-Net call, VAE decode); end to
end, the whole pipeline call from prompt to [0, 1] pixels. Both get the same initial latents,
so their images are comparable.

The backends live in worker_torch.py (diffusers) and worker_runtime.py (sdopt's runtime).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

_T_START = time.perf_counter()  # before any heavy import

from sdopt.bench.records import Job  # noqa: E402 - light; after the process clock starts
from sdopt.bench.worker_support import FaultInjected, describe, initial_latents, peak_rss_bytes  # noqa: E402


def _worker_class(backend: str) -> Any:
    if backend.startswith("torch"):
        from sdopt.bench.worker_torch import TorchWorker

        return TorchWorker
    from sdopt.bench.worker_runtime import RuntimeWorker

    return RuntimeWorker


class Session:
    """One worker process's state: the loaded backend, the job, the last images."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.job: Job | None = None
        self.images = None
        self.runs = 0
        self.device_peak: int | None = None

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        handlers = {
            "load": self.load,
            "run": lambda _msg: self.run(),
            "generate": self.generate,
            "finish": self.finish,
        }
        cmd = msg.get("cmd")
        if cmd not in handlers:
            return {"ok": False, "error": f"unknown request {cmd!r}"}
        return handlers[cmd](msg)

    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        backend = msg["backend"]
        self.job = Job.from_dict(msg["job"])
        try:
            self.worker = _worker_class(backend)(backend)
            if self.job.fault == "load":
                raise FaultInjected("injected fault at load (test)")
            info = self.worker.load(msg["artifact"], self.job)
        except Exception as e:  # noqa: BLE001 - reported, the parent decides
            skip = backend == "tensorrt" and _is_unavailable(e)
            return {"ok": False, "error": describe(e), "skip": skip, "traceback": traceback.format_exc()}
        info["process_s"] = time.perf_counter() - _T_START
        self._sample_device()
        return {"ok": True, "info": info, "rss_peak_bytes": peak_rss_bytes()}

    def run(self) -> dict[str, Any]:
        job = self.job
        try:
            if job.fault in ("run", "crash") and self.runs >= job.fault_after:
                if job.fault == "crash":
                    os._exit(3)  # a hard crash: no reply, as after a segfault or an OOM kill
                raise FaultInjected(f"injected fault in run {self.runs + 1} (test)")
            t0 = time.perf_counter()
            images, seconds, calls = self.worker.run()
            e2e = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "error": describe(e), "traceback": traceback.format_exc()}
        self.runs += 1
        self.images = images
        self._sample_device()
        return {
            "ok": True,
            "e2e_s": e2e,
            "stages": seconds,
            "calls": calls,
            "rss_peak_bytes": peak_rss_bytes(),
            "device_peak_bytes": self.device_peak,
        }

    def generate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """--quality: one image per item (its prompt, its seed's latents or the given latents), saved as PNG."""
        import numpy as np
        from PIL import Image

        seconds = []
        try:
            fixed = np.load(msg["latents_path"]).astype(np.float32) if msg.get("latents_path") else None
            for item in msg["items"]:
                latents = fixed if fixed is not None else initial_latents(self.job, seed=item["seed"], batch=1)
                t0 = time.perf_counter()
                images, _, _ = self.worker.generate(item["prompt"], msg.get("negative_prompt"), latents)
                seconds.append(time.perf_counter() - t0)
                pixels = (np.clip(np.asarray(images[0]), 0.0, 1.0) * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(item["path"])
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "error": describe(e), "traceback": traceback.format_exc()}
        self._sample_device()
        return {
            "ok": True,
            "seconds": seconds,
            "rss_peak_bytes": peak_rss_bytes(),
            "device_peak_bytes": self.device_peak,
        }

    def finish(self, msg: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        reply: dict[str, Any] = {"ok": True, "rss_peak_bytes": peak_rss_bytes(), "device_peak_bytes": self.device_peak}
        if self.images is not None and msg.get("image_path"):
            np.save(msg["image_path"], np.asarray(self.images, dtype=np.float32))
            reply["image_path"] = msg["image_path"]
        if msg.get("count_flops"):
            try:
                reply["unet_flops_per_call"] = self.worker.unet_flops()
            except Exception as e:  # noqa: BLE001 - optional figure
                reply["unet_flops_error"] = describe(e)
        return reply

    def _sample_device(self) -> None:
        try:
            value = self.worker.device_peak_bytes()
        except Exception:  # noqa: BLE001 - memory sampling is best effort
            value = None
        if value is not None:
            self.device_peak = max(self.device_peak or 0, value)


def _is_unavailable(e: BaseException) -> bool:
    """TensorRT missing on this machine (not installed, no GPU, backend absent), not a crash."""
    from sdopt.errors import SdoptError

    return isinstance(e, (SdoptError, ImportError))


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (ours, libraries', C code's) go to the log, not the protocol
    sys.stdout = sys.stderr
    session = Session()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("cmd") == "exit":
            break
        reply = session.handle(msg)
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
