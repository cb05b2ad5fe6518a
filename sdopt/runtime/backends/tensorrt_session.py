"""One TensorRT engine at run time: an execution context, a CUDA stream, pinned host buffers, CUDA graphs.

Written against TensorRT 10.x/11.x (`execute_async_v3`, tensor addresses) and cuda-python 12/13;
the capture sequence follows trtexec (samples/common/sampleInference.cpp, sampleDevice.h). Not
executed on a GPU in this repository: the CPU tests run `capture_graph`, `CudaGraphs` and
`release_binding` against the real cuda-python (which answers every call with an error there)
and `create_context` against a stand-in engine.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from sdopt.engines.cuda import cuda_check, error_name
from sdopt.engines.trt import PartnerSource, refit_engine
from sdopt.errors import SdoptError
from sdopt.runtime.backends.tensorrt_checks import numpy_dtype, rebuild_fix

if TYPE_CHECKING:
    from sdopt.runtime.backends.tensorrt import TensorRTBackend

Signature = tuple[tuple[str, tuple[int, ...]], ...]


class CudaGraphWarning(RuntimeWarning):
    """A CUDA graph could not be captured; that shape runs without one."""


def create_context(engine: Any, component: str, artifact: Any) -> Any:
    """`engine.create_execution_context()`, which answers None when it fails (e.g. out of GPU memory)."""
    context = engine.create_execution_context()
    if context is None:
        raise SdoptError(
            f"TensorRT could not create an execution context for the {component} engine (see its log "
            "above; usually the GPU is out of memory)",
            "free GPU memory (see `nvidia-smi`), or rebuild with a narrower range: "
            f"sdopt build {artifact} --force --static",
        )
    return context


@dataclass
class Binding:
    """Buffers of one input-shape signature, at fixed addresses (what CUDA graphs need)."""

    signature: Signature
    output_shapes: dict[str, tuple[int, ...]]
    device: dict[str, int] = field(default_factory=dict)  # tensor name -> device pointer
    host: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name -> view of pinned host memory
    host_pointers: dict[str, int] = field(default_factory=dict)
    graph_exec: Any = None  # cudaGraphExec_t once captured


def pinned_array(cudart: ModuleType, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """A numpy view of page-locked host memory (`cudaMallocHost`), so copies are truly asynchronous.

    Returns:
        (array, pointer); free the pointer with `cudaFreeHost`.
    """
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = max(1, count * dtype.itemsize)
    pointer = int(cuda_check(cudart, cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
    buffer = (ctypes.c_ubyte * nbytes).from_address(pointer)
    return np.frombuffer(memoryview(buffer), dtype=dtype, count=count).reshape(shape), pointer


def release_binding(cudart: ModuleType, b: Binding) -> list[str]:
    """Free every handle of `b`, each on its own: one failure never leaks the rest.

    Returns:
        One line per free that failed (empty when all succeeded).
    """
    problems: list[str] = []

    def free(result: Any, what: str) -> None:
        err = result[0] if isinstance(result, tuple) else result
        if err != cudart.cudaError_t.cudaSuccess:
            problems.append(f"{what}: {error_name(err)}")

    if b.graph_exec is not None:
        free(cudart.cudaGraphExecDestroy(b.graph_exec), "cudaGraphExecDestroy")
        b.graph_exec = None
    for name, pointer in b.device.items():
        free(cudart.cudaFree(pointer), f"cudaFree({name})")
    for name, pointer in b.host_pointers.items():
        free(cudart.cudaFreeHost(pointer), f"cudaFreeHost({name})")
    b.device, b.host, b.host_pointers = {}, {}, {}
    return problems


def capture_graph(cudart: ModuleType, execute: Callable[[], bool], stream: Any) -> tuple[Any, str]:
    """Capture one enqueue into an executable CUDA graph, trtexec's way.

    Args:
        cudart: cuda-python's runtime module.
        execute: enqueues the engine on `stream` (`context.execute_async_v3`), True on success.
        stream: the CUDA stream.
    Returns:
        (graph_exec, "") on success; (None, reason) when capture fails. On failure every handle made
        is destroyed and the CUDA error state is cleared (`cudaGetLastError`), so the stream stays usable.
    """
    ok = cudart.cudaError_t.cudaSuccess
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    err = cudart.cudaStreamBeginCapture(stream, mode)[0]
    if err != ok:
        cudart.cudaGetLastError()
        return None, f"cudaStreamBeginCapture: {error_name(err)}"
    enqueued = execute()
    err, graph = cudart.cudaStreamEndCapture(stream)  # always end, to leave the stream usable
    if not enqueued or err != ok:
        if err == ok and graph is not None:
            cudart.cudaGraphDestroy(graph)  # TensorRT failed, the capture did not: the graph is unusable
        cudart.cudaGetLastError()
        if err != ok:
            return None, f"cudaStreamEndCapture: {error_name(err)}"
        return None, "TensorRT could not enqueue under capture"
    err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
    cudart.cudaGraphDestroy(graph)  # the executable graph does not need it (trtexec destroys it too)
    if err != ok:
        cudart.cudaGetLastError()
        return None, f"cudaGraphInstantiate: {error_name(err)}"
    return graph_exec, ""


class CudaGraphs:
    """Runs one engine call, replaying a captured CUDA graph where one exists for the binding's shapes.

    The first call of a signature executes (TensorRT does deferred work on the first enqueue after a
    shape change), then captures the next enqueue for later calls to replay. When capture fails, that
    call's results stand (the warm-up computed them), one warning is given, and the signature runs
    without a graph from then on instead of retrying.
    """

    def __init__(self, cudart: ModuleType, component: str, enabled: bool, fix: str) -> None:
        self.cudart, self.component, self.enabled, self.fix = cudart, component, enabled, fix
        self.failed: set[Signature] = set()
        self.warned = False

    def enqueue(self, b: Binding, execute: Callable[[], bool], stream: Any) -> None:
        cudart = self.cudart
        if b.graph_exec is not None:
            cuda_check(cudart, cudart.cudaGraphLaunch(b.graph_exec, stream), "cudaGraphLaunch")
            return
        if not execute():
            raise SdoptError(f"TensorRT failed to run the {self.component} engine (see its log above)", self.fix)
        if not self.enabled or b.signature in self.failed:
            return
        graph_exec, reason = capture_graph(cudart, execute, stream)
        if graph_exec is not None:
            b.graph_exec = graph_exec
            return
        self.failed.add(b.signature)
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"the {self.component} engine cannot be captured in a CUDA graph ({reason}); it runs "
                "without one for these shapes",
                CudaGraphWarning,
                stacklevel=4,
            )


class TensorRTSession:
    """One engine, one execution context, one CUDA stream.

    `run` holds a lock for the whole call: an execution context carries the input shapes and
    tensor addresses of the inference in flight, so concurrent calls on one context would
    overwrite each other's. Threads that need parallel inference should load separate
    pipelines (TensorRT: one execution context per concurrent inference).

    Device and pinned host buffers are allocated once per input-shape signature and reused while
    the shapes stay the same; a new signature frees them with its CUDA graph (see CudaGraphs).
    """

    def __init__(self, backend: TensorRTBackend, component: str, engine: Any) -> None:
        trt, self.cudart = backend.trt, backend.cudart
        self.backend, self.component, self.engine = backend, component, engine
        self.fix = rebuild_fix(backend.root)
        self.context = create_context(engine, component, backend.root)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n)) for n in names}
        spec = backend.manifest.components[component]
        declared = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
        if (set(self.input_names), set(self.output_names)) != declared:
            raise SdoptError(f"the {component} engine's tensors {names} do not match the manifest", self.fix)
        self.stream: Any = cuda_check(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.graphs = CudaGraphs(self.cudart, component, backend.use_cuda_graph, self.fix)
        self._binding: Binding | None = None
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        self.backend.check_shapes(self.component, {n: a.shape for n, a in arrays.items()})
        cudart, stream = self.cudart, self.stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            # The current device is per host thread in CUDA: set it for whichever thread calls.
            cuda_check(cudart, cudart.cudaSetDevice(self.backend.device), "cudaSetDevice")
            b = self._bind(tuple((n, arrays[n].shape) for n in self.input_names))
            for n, a in arrays.items():
                np.copyto(b.host[n], a)
                cuda_check(
                    cudart,
                    cudart.cudaMemcpyAsync(b.device[n], b.host_pointers[n], a.nbytes, h2d, stream),
                    "copy to GPU",
                )
            self.graphs.enqueue(b, lambda: bool(self.context.execute_async_v3(int(stream))), stream)
            for n in self.output_names:
                cuda_check(
                    cudart,
                    cudart.cudaMemcpyAsync(b.host_pointers[n], b.device[n], b.host[n].nbytes, d2h, stream),
                    "copy to host",
                )
            cuda_check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            return {n: b.host[n].copy() for n in self.output_names}  # the pinned buffers are reused

    def refit(self, weights: dict[str, np.ndarray], partners: PartnerSource | None = None) -> list[str]:
        """Replace named weights of this (refittable) engine between calls; see `sdopt.engines.trt.refit_engine`.

        Args:
            weights: ONNX initializer name -> new values.
            partners: names -> current values, for weights TensorRT fused with the given ones.
        Returns:
            The partner weights set besides `weights`.
        """
        with self._lock:
            cuda_check(self.cudart, self.cudart.cudaSetDevice(self.backend.device), "cudaSetDevice")
            cuda_check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            supplied = refit_engine(self.backend.trt, self.engine, weights, partners)
            self._release(strict=True)  # captured graphs predate the refit: capture afresh
            return supplied

    def _bind(self, signature: Signature) -> Binding:
        if self._binding is not None and self._binding.signature == signature:
            return self._binding
        self._release(strict=True)
        ctx = self.context
        for name, shape in signature:
            if not ctx.set_input_shape(name, shape):
                raise SdoptError(f"TensorRT rejected {self.component} input {name} shape {list(shape)}", self.fix)
        shapes = dict(signature)
        for name in self.output_names:
            shapes[name] = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shapes[name]):
                raise SdoptError(f"{self.component} output {name} has no static shape {shapes[name]}", self.fix)
        b = self._binding = Binding(signature, {n: shapes[n] for n in self.output_names})
        try:
            for name, shape in shapes.items():
                nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize)
                b.device[name] = int(cuda_check(self.cudart, self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
                b.host[name], b.host_pointers[name] = pinned_array(self.cudart, shape, self.dtypes[name])
                if not ctx.set_tensor_address(name, b.device[name]):
                    raise SdoptError(f"TensorRT rejected the {self.component} buffer of {name}", self.fix)
        except BaseException:
            self._release(strict=False)  # never keep a half-bound signature; the first error is the one to see
            raise
        return b

    def _release(self, strict: bool) -> None:
        b, self._binding = self._binding, None
        problems = release_binding(self.cudart, b) if b is not None else []
        if problems and strict:
            raise SdoptError(
                f"freeing the {self.component} buffers failed: {'; '.join(problems)}",
                "check the GPU with `nvidia-smi`; reload the pipeline",
            )
        if problems:
            warnings.warn(
                f"freeing the {self.component} buffers failed: {'; '.join(problems)}", RuntimeWarning, stacklevel=3
            )

    def close(self) -> None:
        """Free the device and pinned buffers, graphs and stream (also done when the session is collected)."""
        with self._lock:
            try:
                self._release(strict=True)
            finally:
                if self.stream is not None:
                    stream, self.stream = self.stream, None
                    cuda_check(self.cudart, self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have unloaded CUDA already
            pass


__all__ = [
    "Binding",
    "CudaGraphWarning",
    "CudaGraphs",
    "TensorRTSession",
    "capture_graph",
    "create_context",
    "pinned_array",
    "release_binding",
]
