"""The child side of the harness: one process per backend, driven by JSON lines.

    python -m sdopt.bench.workers

reads one JSON request per line on stdin and answers each with one JSON line on the
*original* stdout; everything else that libraries print goes to stderr (the parent keeps it
as the backend's log). Requests, in order:

    {"cmd": "load", "backend": ..., "artifact": ..., "job": {...}}   -> {"ok", "info"}
    {"cmd": "run"}                  (repeated)                       -> {"ok", "e2e_s", "stages", ...}
    {"cmd": "finish", "image_path": ...}                             -> {"ok", "memory", "unet_flops", ...}

A failed request answers {"ok": false, "error": "..."} (and "skip": true where the backend is
not available on this machine). One process per backend keeps peak RSS per backend, and a
crash (segfault, OOM kill) ends one row of the table, not the benchmark.

Both sides time the same work: per stage, the time inside the component calls (text
encoder(s), every U-Net call, VAE decode); end to end, the whole pipeline call from prompt to
[0, 1] pixels. Both get the same initial latents, so their images are comparable.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from typing import Any, Callable

_T_START = time.perf_counter()  # before any heavy import

STAGES = ("text_encoder", "unet", "vae_decoder")
# runtime component -> stage it counts towards
COMPONENT_STAGE = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "unet": "unet",
                   "unet_shallow": "unet", "vae_decoder": "vae_decoder", "vae_encoder": "vae_encoder"}


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


def initial_latents(job: dict[str, Any]):
    """The same noise for every backend: numpy's default_rng(seed), float32 (as sdopt's runtime draws it)."""
    import numpy as np

    return np.random.default_rng(job["seed"]).standard_normal(tuple(job["latent_shape"]), dtype=np.float32)


class FaultInjected(RuntimeError):
    """Raised where a test asked for a failure: job["fault"] = "load" | "run" | "crash" (exit without
    replying), at the run after job["fault_after"] good runs. Only `run_benchmark(faults=...)` sets it."""


# -- backends -----------------------------------------------------------------------------------
class TorchWorker:
    """diffusers, eager (the reference) or with torch.compile on the U-Net and VAE decoder."""

    def __init__(self, backend: str) -> None:
        self.compile = backend == "torch-compile"
        self.unet_args: tuple[tuple, dict] | None = None

    def load(self, artifact: str, job: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        import diffusers
        import torch

        from sdopt.export.sources import load_model
        from sdopt.manifest import load_manifest
        from sdopt.runtime.schedulers import DIFFUSERS_CLASS_NAMES, scheduler_overrides

        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.set_num_threads(job["threads"])
        self.torch = torch
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        manifest = load_manifest(artifact)
        source = manifest.source
        model = load_model(source["id"], seed=int(source.get("seed", 0)))
        pipe = model.pipe
        # fp16 artifacts are compared with fp16 torch on the GPU; the CPU has no fast fp16, so fp32 there.
        self.dtype = torch.float16 if cuda and manifest.precision == "fp16" else torch.float32
        pipe.to(self.device, self.dtype)
        name = job["scheduler"]
        pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASS_NAMES[name]).from_config(
            pipe.scheduler.config, **scheduler_overrides(name))
        self.timers = Timers(torch.cuda.synchronize if cuda else None)
        unet, decode = pipe.unet, pipe.vae.decode
        if self.compile:
            unet = torch.compile(unet)
            decode = torch.compile(decode)
        self.unet_module = pipe.unet  # the eager module (FLOP counting)
        # Proxies time each call; object.__setattr__ keeps diffusers from re-registering components.
        for attr in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, attr, None) is not None:
                object.__setattr__(pipe, attr, _TimedModule(getattr(pipe, attr), self.timers.wrap("text_encoder",
                                                                                                   getattr(pipe, attr))))
        object.__setattr__(pipe, "unet", _TimedModule(pipe.unet, self.timers.wrap("unet", self._record_unet(unet))))
        pipe.vae.decode = self.timers.wrap("vae_decoder", decode)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.latents = torch.from_numpy(initial_latents(job)).to(self.device, self.dtype)
        self.job = job
        return {"import_s": import_s, "load_s": time.perf_counter() - t0, "device": self.device,
                "precision": "fp16" if self.dtype == torch.float16 else "fp32",
                "provider": f"torch-{self.device}" + ("+inductor" if self.compile else ""),
                "engine": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
                "device_name": torch.cuda.get_device_name() if cuda else None}

    def _record_unet(self, unet: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.unet_args is None:
                self.unet_args = (args, kwargs)
            return unet(*args, **kwargs)

        return call

    def run(self) -> tuple[Any, dict[str, float], dict[str, int]]:
        job = self.job
        self.timers.reset()
        out = self.pipe(job["prompt"], negative_prompt=job["negative_prompt"], num_inference_steps=job["steps"],
                        guidance_scale=job["guidance"], height=job["height"], width=job["width"],
                        num_images_per_prompt=job["batch"], latents=self.latents, output_type="np")
        return out.images, dict(self.timers.seconds), dict(self.timers.calls)

    def device_peak_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        return int(self.torch.cuda.max_memory_allocated())

    def unet_flops(self) -> int | None:
        """FLOPs of one U-Net call as the pipeline made it (2 per multiply-add; attention
        counted through the math SDPA path). Eager torch only."""
        if self.compile or self.unet_args is None:
            return None
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        args, kwargs = self.unet_args
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            self.unet_module(*args, **kwargs)
        return int(counter.get_total_flops())


class _TimedModule:
    """Stands in for a pipeline component: calls go through the timer, attributes to the module."""

    def __init__(self, module: Any, call: Callable) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class RuntimeWorker:
    """sdopt's numpy pipeline over ONNX Runtime (CPU, or CUDA where onnxruntime-gpu has a GPU) or TensorRT."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def load(self, artifact: str, job: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        from sdopt.errors import SdoptError
        from sdopt.runtime.pipeline import Pipeline

        if self.backend.startswith("onnxruntime"):
            import onnxruntime as ort

            provider = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_visible() else "cpu"
            options: dict[str, Any] = {"threads": job["threads"]}
            engine = f"onnxruntime {ort.__version__}"
        else:
            provider, options, engine = "tensorrt", {}, "tensorrt"
        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # Hash verification (Pipeline.load's default, ~1 s/GB) is left out of the cold start.
        build_s = None
        try:
            self.pipe = Pipeline.load(artifact, provider=provider, verify_hashes=False, **options)
        except SdoptError as e:
            if not (provider == "tensorrt" and job.get("build_engines") and _needs_engines(e)):
                raise
            build_s = _build_engines(artifact, job)  # the harness's own cached export: build once, like the export
            t0 = time.perf_counter()
            self.pipe = Pipeline.load(artifact, provider=provider, verify_hashes=False, **options)
        self.timers = Timers()
        for name, session in list(self.pipe.sessions.items()):
            self.pipe.sessions[name] = _TimedSession(session, self.timers.wrap(COMPONENT_STAGE.get(name, name),
                                                                                session.run))
        self.latents = initial_latents(job)
        self.job = job
        self.provider = provider
        if provider == "tensorrt":
            try:
                import tensorrt

                engine = f"tensorrt {tensorrt.__version__}"
            except ImportError:  # pragma: no cover - the load above would have failed
                pass
        return {"import_s": import_s, "load_s": time.perf_counter() - t0, "device": "cpu" if provider == "cpu" else "cuda",
                "precision": self.pipe.manifest.precision, "provider": provider, "engine": engine, "device_name": None,
                "engine_build_s": build_s}

    def run(self) -> tuple[Any, dict[str, float], dict[str, int]]:
        job = self.job
        self.timers.reset()
        out = self.pipe(job["prompt"], negative_prompt=job["negative_prompt"], num_inference_steps=job["steps"],
                        guidance_scale=job["guidance"], height=job["height"], width=job["width"],
                        num_images_per_prompt=job["batch"], seed=job["seed"], scheduler=job["scheduler"],
                        latents=self.latents, output_type="np",
                        deepcache=job["deepcache"] if self.backend == "onnxruntime-fast" else 1)
        return out.images, dict(self.timers.seconds), dict(self.timers.calls)

    def device_peak_bytes(self) -> int | None:
        if self.provider == "cpu":
            return None
        from sdopt.bench.machine import gpu_process_memory

        return gpu_process_memory(os.getpid())

    def unet_flops(self) -> int | None:
        return None


class EngineBuildFailed(RuntimeError):
    """Building TensorRT engines failed: a failed row, not a skipped one."""


def _needs_engines(e: Exception) -> bool:
    """The artifact lacks engines for this GPU/TensorRT: `sdopt build` would fix it."""
    from sdopt.errors import EnginesMissingError

    return isinstance(e, EnginesMissingError)


def _build_engines(artifact: str, job: dict[str, Any]) -> float:
    """`sdopt build` for the benchmark's shape (dynamic profiles with opt = the job's batch and size)."""
    t0 = time.perf_counter()
    try:
        from sdopt.export.tensorrt_build import BuildOptions, build_engines

        build_engines(artifact, BuildOptions(batch=job["batch"], height=job["height"], width=job["width"]))
    except Exception as e:  # noqa: BLE001
        raise EngineBuildFailed(f"building TensorRT engines failed: {describe(e)}") from None
    return time.perf_counter() - t0


class _TimedSession:
    def __init__(self, session: Any, run: Callable) -> None:
        self.session = session
        self.run = run
        self.input_names = session.input_names
        self.output_names = session.output_names


def _gpu_visible() -> bool:
    from sdopt.bench.machine import has_gpu

    return has_gpu()


WORKERS = {"torch": TorchWorker, "torch-compile": TorchWorker, "onnxruntime": RuntimeWorker,
           "onnxruntime-fast": RuntimeWorker, "tensorrt": RuntimeWorker}


# -- the request loop ---------------------------------------------------------------------------
class Session:
    def __init__(self) -> None:
        self.worker: Any = None
        self.job: dict[str, Any] = {}
        self.images = None
        self.runs = 0
        self.device_peak: int | None = None

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg.get("cmd")
        if cmd == "load":
            return self.load(msg)
        if cmd == "run":
            return self.run()
        if cmd == "finish":
            return self.finish(msg)
        return {"ok": False, "error": f"unknown request {cmd!r}"}

    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        backend = msg["backend"]
        self.job = msg["job"]
        self.worker = WORKERS[backend](backend)
        try:
            if self.job.get("fault") == "load":
                raise FaultInjected("injected fault at load (test)")
            info = self.worker.load(msg["artifact"], self.job)
        except Exception as e:  # noqa: BLE001 - reported, the parent decides
            skip = backend == "tensorrt" and _is_unavailable(e)
            return {"ok": False, "error": describe(e), "skip": skip, "traceback": traceback.format_exc()}
        info["process_s"] = time.perf_counter() - _T_START
        self._sample_device()
        return {"ok": True, "info": info, "rss_peak_bytes": peak_rss_bytes()}

    def run(self) -> dict[str, Any]:
        try:
            if self.job.get("fault") in ("run", "crash") and self.runs >= int(self.job.get("fault_after", 0)):
                if self.job["fault"] == "crash":
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
        return {"ok": True, "e2e_s": e2e, "stages": seconds, "calls": calls, "rss_peak_bytes": peak_rss_bytes(),
                "device_peak_bytes": self.device_peak}

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


def describe(e: BaseException) -> str:
    from sdopt.errors import SdoptError

    if isinstance(e, SdoptError):
        return e.problem + (f" ({e.fix})" if e.fix else "")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400]}" if text else type(e).__name__


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
