"""TensorRT backend: serialized engines (`sdopt build`) run through one execution context each.

Written against the documented Python APIs of TensorRT 10.x/11.x and cuda-python; it has not
been executed on a GPU in this repository's CI (the CPU tests cover the pure checks below).

Nothing here touches TensorRT before the manifest says an engine fits: `select_engine`,
`check_engine_compatible`, `check_host_code` and `check_shapes` are pure functions over a
manifest `engines` entry and the detected (TensorRT version, GPU), so a mismatch is one
readable `SdoptError` naming the rebuild command instead of a deserialization failure.

Engine entries (written by `sdopt.export.tensorrt_build`) look like:
    {"component": "unet", "path": "engines/<gpu>_sm89_trt10.7.0/unet.plan", "sha256": ...,
     "tensorrt": "10.7.0", "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9",
     "profiles": [{"sample": {"min": [...], "opt": [...], "max": [...]}, ...}],
     "flags": {"static": false, "refittable": false, "version_compatible": false,
               "exclude_lean_runtime": false, "opt_level": 3, "workspace_gb": null}, ...}
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.manifest import Manifest, sha256_file

INSTALL_FIX = "pip install 'sdopt[tensorrt]' on a host with an NVIDIA GPU (TensorRT wheels come from NVIDIA's index)"

# TensorRT DataType member name -> numpy dtype (types numpy lacks, BF16/FP8/INT4/FP4, are unsupported).
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8,
                "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


# -- imports and device facts -----------------------------------------------------------------
def import_tensorrt(lean_ok: bool = False) -> ModuleType:
    """`tensorrt`, else (when `lean_ok`) `tensorrt_lean`, which runs version-compatible engines only."""
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        if lean_ok:
            try:
                import tensorrt_lean

                return tensorrt_lean
            except ImportError:
                pass
    raise SdoptError("tensorrt is not installed", INSTALL_FIX)


def import_cudart() -> ModuleType:
    """cuda-python's runtime bindings (module path moved in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise SdoptError("cuda-python is not installed", INSTALL_FIX) from None
    return cudart


def cuda_check(cudart: ModuleType, result: Any, what: str) -> Any:
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise SdoptError(f"CUDA {what} failed: {getattr(err, 'name', err)}",
                         "check the GPU with `nvidia-smi` (driver, memory in use)")
    return values[0] if len(values) == 1 else tuple(values) or None


_LOGGERS: dict[str, Any] = {}


def trt_logger(trt: ModuleType) -> Any:
    """One logger per TensorRT module for the whole process: builder and runtime share it."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt.__name__]


@dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: str  # "8.9"


def parse_nvidia_smi(text: str) -> GpuFacts:
    """First line of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines or "," not in lines[0]:
        raise SdoptError(f"unexpected nvidia-smi output {text.strip()[:80]!r}", "update the NVIDIA driver")
    name, cc = (part.strip() for part in lines[0].rsplit(",", 1))
    return GpuFacts(name, cc)


def gpu_facts(device: int = 0) -> GpuFacts:
    """Name and compute capability of CUDA device `device`: cuda-python, else nvidia-smi."""
    try:
        cudart = import_cudart()
    except SdoptError:
        cudart = None
    if cudart is not None:
        try:
            prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        except SdoptError as e:
            raise SdoptError(f"no NVIDIA GPU {device} is usable ({e.problem})",
                             "run on a host with an NVIDIA GPU and driver") from None
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return GpuFacts(name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise SdoptError("no NVIDIA GPU found (no cuda-python and no nvidia-smi)",
                         "run on a host with an NVIDIA GPU and driver")
    # nvidia-smi ignores CUDA_VISIBLE_DEVICES, so ask for the physical GPU that CUDA calls `device`.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ident = visible[device] if device < len(visible) else str(device)
    proc = subprocess.run([smi, "-i", ident, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SdoptError(f"nvidia-smi found no GPU {ident}: {proc.stderr.strip()[:200]}", "run on a host with an NVIDIA GPU")
    return parse_nvidia_smi(proc.stdout)


# -- pure compatibility checks ----------------------------------------------------------------
def rebuild_fix(artifact: str | Path) -> str:
    return f"rebuild the engines on this machine: sdopt build {artifact} --force"


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def check_engine_compatible(entry: dict[str, Any], trt_version: str, gpu_name: str, compute_capability: str,
                            artifact: str | Path = "ARTIFACT", lean: bool = False) -> None:
    """Raise unless this GPU and TensorRT can deserialize the engine of `entry`.

    Engines are specific to the compute capability and tuned per GPU model, and by default load
    only in the exact TensorRT version that built them. Version-compatible engines load in the
    same or a later TensorRT (TensorRT docs, "Version Compatibility"); if built without their
    lean runtime, this backend still asks for the building version (it does not load lean
    runtimes from elsewhere). `lean`: only `tensorrt_lean` is installed.
    """
    what, fix = f"the {entry['component']} engine", rebuild_fix(artifact)
    if entry["compute_capability"] != compute_capability:
        raise SdoptError(f"{what} was built for compute capability {entry['compute_capability']} ({entry['gpu']}), "
                         f"this GPU ({gpu_name}) is {compute_capability}", fix)
    if entry["gpu"] != gpu_name:
        raise SdoptError(f"{what} was built on a {entry['gpu']}, this GPU is a {gpu_name} "
                         "(TensorRT tunes engines per GPU model)", fix)
    flags = entry.get("flags", {})
    portable = flags.get("version_compatible", False) and not flags.get("exclude_lean_runtime", False)
    if lean and not flags.get("version_compatible", False):
        raise SdoptError(f"{what} is not version-compatible, and only tensorrt_lean (which runs version-compatible "
                         "engines only) is installed",
                         f"install the full runtime ({INSTALL_FIX}), or {fix} --version-compatible")
    if portable:
        if version_tuple(trt_version) < version_tuple(entry["tensorrt"]):
            raise SdoptError(f"{what} was built with TensorRT {entry['tensorrt']}; version-compatible engines load in "
                             f"that or a later TensorRT, and this host has {trt_version}", fix)
    elif entry["tensorrt"] != trt_version:
        raise SdoptError(f"{what} was built with TensorRT {entry['tensorrt']}, this host has TensorRT {trt_version} "
                         "(engines load only in the TensorRT version that built them)", fix)


def check_host_code(entry: dict[str, Any], allow_host_code: bool, artifact: str | Path = "ARTIFACT") -> None:
    """Version-compatible engines embed host code (a lean runtime) that TensorRT would execute:
    loading one runs code from the artifact, so it takes an explicit trust switch."""
    if entry.get("flags", {}).get("version_compatible", False) and not allow_host_code:
        raise SdoptError(
            f"the {entry['component']} engine is version-compatible: loading it executes host code embedded in "
            f"{entry['path']}, which sdopt does not do by default",
            "if you trust this artifact, load it with allow_host_code=True (CLI: --allow-host-code); "
            f"otherwise {rebuild_fix(artifact)} (without --version-compatible)")


def select_engine(manifest: Manifest, component: str, trt_version: str, gpu_name: str, compute_capability: str,
                  artifact: str | Path = "ARTIFACT", lean: bool = False) -> dict[str, Any]:
    """The newest engine of `component` this GPU + TensorRT can load, else the closest one's error."""
    entries = [e for e in manifest.engines if e.get("component") == component]
    if not entries:
        raise SdoptError(f"{artifact} has no TensorRT engine for {component}", f"build them: sdopt build {artifact} --force")
    errors: list[tuple[tuple[bool, bool], SdoptError]] = []
    for entry in reversed(entries):
        try:
            check_engine_compatible(entry, trt_version, gpu_name, compute_capability, artifact, lean)
            return entry
        except SdoptError as e:
            errors.append(((entry["compute_capability"] == compute_capability, entry["gpu"] == gpu_name), e))
    best = max(errors, key=lambda t: t[0])[1]  # prefer the error of an engine for this very GPU
    if len(entries) > 1:
        raise SdoptError(f"none of the {len(entries)} {component} engines fits this host; closest: {best.problem}", best.fix)
    raise best


def check_shapes(entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], artifact: str | Path = "ARTIFACT") -> None:
    """Raise unless every input shape lies inside one of the engine's optimization profiles."""
    static = entry.get("flags", {}).get("static", False)
    problem = ""
    for profile in entry["profiles"]:
        problem = _outside(profile, shapes)
        if not problem:
            return
    how = ("the engine is static: generate at its batch and size, or rebuild for this one: "
           f"sdopt build {artifact} --force --static --batch B --height H --width W") if static else (
        f"rebuild with this shape in range: sdopt build {artifact} --force (re-export with --min-size/--max-size/"
        "--max-batch first if it is outside the artifact's range)")
    raise SdoptError(f"the {entry['component']} engine cannot run this call: {problem}", how)


def _outside(profile: dict[str, dict[str, list[int]]], shapes: dict[str, tuple[int, ...]]) -> str:
    for name, r in profile.items():
        shape = tuple(shapes.get(name, ()))
        if name not in shapes:
            return f"input {name} is missing"
        if len(shape) != len(r["min"]) or any(not lo <= s <= hi for s, lo, hi in zip(shape, r["min"], r["max"])):
            return f"input {name} has shape {list(shape)}, outside the engine's profile {r['min']}..{r['max']}"
    return ""


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT DataType (by member name, which tensorrt and tensorrt_lean share)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in NUMPY_DTYPES:
        raise SdoptError(f"engine tensor type {name} has no numpy equivalent", "re-export with fp32 or fp16 graph inputs")
    return np.dtype(NUMPY_DTYPES[name])


# -- backend and sessions ---------------------------------------------------------------------
class TensorRTBackend:
    """Loads each component's engine for this GPU; `use_cuda_graph` replays captured enqueues."""

    name = "tensorrt"

    def __init__(self, root: Path, manifest: Manifest, use_cuda_graph: bool = False, allow_host_code: bool = False,
                 device: int = 0) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.use_cuda_graph = use_cuda_graph
        self.allow_host_code = allow_host_code
        self.device = device
        self.trt = import_tensorrt(lean_ok=True)
        self.lean = self.trt.__name__ == "tensorrt_lean"
        self.cudart = import_cudart()
        cuda_check(self.cudart, self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self.gpu = gpu_facts(device)
        self.trt_version = self.trt.__version__
        self.runtime = self.trt.Runtime(trt_logger(self.trt))
        self.entries: dict[str, dict[str, Any]] = {}

    def check_shapes(self, component: str, feeds_shapes: dict[str, tuple[int, ...]]) -> None:
        check_shapes(self.entries[component], feeds_shapes, self.root)

    def load(self, component: str) -> TensorRTSession:
        if component not in self.manifest.components:
            raise SdoptError(f"the artifact has no {component}", "re-export with that component included")
        entry = select_engine(self.manifest, component, self.trt_version, self.gpu.name, self.gpu.compute_capability,
                              self.root, self.lean)
        check_host_code(entry, self.allow_host_code, self.root)
        path = self.root / entry["path"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise SdoptError(f"{path} is missing or does not match its sha256 in the manifest", rebuild_fix(self.root))
        if entry.get("flags", {}).get("version_compatible", False):
            self.runtime.engine_host_code_allowed = True  # trusted by the caller (check_host_code)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise SdoptError(f"TensorRT {self.trt_version} could not deserialize {path} (see its log above)",
                             rebuild_fix(self.root))
        self.entries[component] = entry
        return TensorRTSession(self, component, engine)


@dataclass
class _Binding:
    """Device buffers of one input-shape signature, at fixed addresses (what CUDA graphs need)."""

    signature: tuple[tuple[str, tuple[int, ...]], ...]
    pointers: dict[str, int]
    output_shapes: dict[str, tuple[int, ...]]
    graph: Any = None  # (cudaGraph_t, cudaGraphExec_t) once captured


class TensorRTSession:
    """One engine, one execution context, one CUDA stream.

    `run` holds a lock for the whole call: an execution context carries the input shapes and
    tensor addresses of the inference in flight, so concurrent calls on one context would
    overwrite each other's. Threads that need parallel inference should load separate
    pipelines (TensorRT: one execution context per concurrent inference).

    Device buffers are allocated once per input-shape signature and reused while the shapes
    stay the same. With `use_cuda_graph`, the first call of a signature executes once (TensorRT
    does deferred work on the first enqueue after a shape change), then captures the enqueue
    into a CUDA graph that later calls replay. A graph bakes in the buffer addresses and the
    context's shapes, so it lives only as long as that signature's buffers: a new signature
    frees both. Static engines therefore capture once and replay for the session's lifetime.
    """

    def __init__(self, backend: TensorRTBackend, component: str, engine: Any) -> None:
        trt, self.cudart = backend.trt, backend.cudart
        self.backend, self.component, self.engine = backend, component, engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n)) for n in names}
        spec = backend.manifest.components[component]
        declared = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
        if (set(self.input_names), set(self.output_names)) != declared:
            raise SdoptError(f"the {component} engine's tensors {names} do not match the manifest",
                             rebuild_fix(backend.root))
        self.stream = self._cuda(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._binding: _Binding | None = None
        self._lock = threading.Lock()

    def _cuda(self, result: Any, what: str) -> Any:
        return cuda_check(self.cudart, result, what)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        self.backend.check_shapes(self.component, {n: a.shape for n, a in arrays.items()})
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            # The current device is per host thread in CUDA: set it for whichever thread calls.
            self._cuda(cudart.cudaSetDevice(self.backend.device), "cudaSetDevice")
            b = self._bind(tuple((n, arrays[n].shape) for n in self.input_names))
            for n, a in arrays.items():
                self._cuda(cudart.cudaMemcpyAsync(b.pointers[n], a.ctypes.data, a.nbytes, h2d, self.stream),
                           "copy to GPU")
            self._enqueue(b)
            outputs = {n: np.empty(b.output_shapes[n], self.dtypes[n]) for n in self.output_names}
            for n, out in outputs.items():
                self._cuda(cudart.cudaMemcpyAsync(out.ctypes.data, b.pointers[n], out.nbytes, d2h, self.stream),
                           "copy to host")
            self._cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def _bind(self, signature: tuple[tuple[str, tuple[int, ...]], ...]) -> _Binding:
        if self._binding is not None and self._binding.signature == signature:
            return self._binding
        self._release()
        ctx = self.context
        for name, shape in signature:
            if not ctx.set_input_shape(name, shape):
                raise SdoptError(f"TensorRT rejected {self.component} input {name} shape {list(shape)}",
                                 rebuild_fix(self.backend.root))
        shapes = dict(signature)
        for name in self.output_names:
            shapes[name] = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shapes[name]):
                raise SdoptError(f"{self.component} output {name} has no static shape {shapes[name]}",
                                 rebuild_fix(self.backend.root))
        b = self._binding = _Binding(signature, {}, {n: shapes[n] for n in self.output_names})
        try:
            for name, shape in shapes.items():
                nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize)
                b.pointers[name] = self._cuda(self.cudart.cudaMalloc(nbytes), "cudaMalloc")
                if not ctx.set_tensor_address(name, b.pointers[name]):
                    raise SdoptError(f"TensorRT rejected the {self.component} buffer of {name}",
                                     rebuild_fix(self.backend.root))
        except BaseException:
            self._release()  # never keep a half-bound signature
            raise
        return b

    def _enqueue(self, b: _Binding) -> None:
        cudart, stream = self.cudart, self.stream
        if b.graph is not None:
            self._cuda(cudart.cudaGraphLaunch(b.graph[1], stream), "cudaGraphLaunch")
            return
        if not self.context.execute_async_v3(int(stream)):
            raise SdoptError(f"TensorRT failed to run the {self.component} engine (see its log above)",
                             rebuild_fix(self.backend.root))
        if not self.backend.use_cuda_graph:
            return
        # The warm-up enqueue above ran the call; capture the next one for later calls to replay.
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._cuda(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        enqueued = self.context.execute_async_v3(int(stream))
        err, graph = cudart.cudaStreamEndCapture(stream)  # always end, to leave the stream usable
        if not enqueued or err != cudart.cudaError_t.cudaSuccess:
            if err == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(graph)
            raise SdoptError(f"the {self.component} engine cannot be captured in a CUDA graph "
                             f"({getattr(err, 'name', err)})",
                             "load the pipeline with use_cuda_graph=False")
        b.graph = (graph, self._cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"))

    def _release(self) -> None:
        b, self._binding = self._binding, None
        if b is None:
            return
        if b.graph is not None:
            self._cuda(self.cudart.cudaGraphExecDestroy(b.graph[1]), "cudaGraphExecDestroy")
            self._cuda(self.cudart.cudaGraphDestroy(b.graph[0]), "cudaGraphDestroy")
        for pointer in b.pointers.values():
            self._cuda(self.cudart.cudaFree(pointer), "cudaFree")

    def close(self) -> None:
        """Free the device buffers, graphs and stream (also done when the session is collected)."""
        with self._lock:
            self._release()
            if self.stream is not None:
                self._cuda(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
                self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have unloaded CUDA already
            pass
