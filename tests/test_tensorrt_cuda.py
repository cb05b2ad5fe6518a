"""The CUDA and TensorRT call sequences of the builder and the backend, run without a GPU.

cuda-python is real here: it imports on a host without a driver and answers every call with
`cudaErrorInsufficientDriver` (and `cudaDriverGetVersion` with 0), so sdopt's driver checks,
error handling, CUDA-graph fallback and buffer release run against the real package. TensorRT
objects cannot exist without TensorRT; where a test needs one (an engine, a builder config, a
refitter), it uses a small stand-in class named Fake*, which only records what sdopt asks of it.
Nothing here claims that TensorRT itself behaves so: the `gpu` tests in test_tensorrt.py do that.
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sdopt.engines.cuda import EXTRA_FOR_CUDA, INSTALL_FIX, check_driver, cuda_check, cuda_versions, import_cudart
from sdopt.engines.trt import check_refit_array, refit_engine, version_compatible_loads
from sdopt.errors import NoGpuError, SdoptError
from sdopt.export.tensorrt_build import BuildOptions, add_profiles, configure, engine_dir, timing_cache_path
from sdopt.hardware import gpu_facts, nvidia_device_present
from sdopt.runtime.backends.tensorrt_session import (
    Binding,
    CudaGraphs,
    CudaGraphWarning,
    capture_graph,
    create_context,
    pinned_array,
    release_binding,
)

ROOT = Path(__file__).resolve().parents[1]
needs_no_device = pytest.mark.skipif(nvidia_device_present(), reason="asserts what cuda-python answers without a GPU")


class RecordingCudart:
    """The real cuda-python runtime module, with the name of every `cuda*` call recorded (a spy, not a stand-in)."""

    def __init__(self) -> None:
        self.real, self.calls = import_cudart(), []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not name.startswith("cuda") or isinstance(attr, type) or not callable(attr):
            return attr

        def call(*args: Any) -> Any:
            self.calls.append(name)
            return attr(*args)

        return call


# -- defect 15: the real cuda-python on a host without a driver ----------------------------------------
def test_cuda_python_is_the_real_package():
    cudart = import_cudart()
    assert cudart.__name__ in ("cuda.bindings.runtime", "cuda.cudart")
    driver, runtime = cuda_versions(cudart)
    assert runtime >= 12000  # the CUDA that this cuda-python was built for


@needs_no_device
def test_cuda_check_names_the_error_the_driver_less_host_gives():
    cudart = import_cudart()
    with pytest.raises(SdoptError) as e:
        cuda_check(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    assert e.value.problem == "CUDA cudaGetDeviceCount failed: cudaErrorInsufficientDriver"
    assert "nvidia-smi" in e.value.fix
    assert cuda_check(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion") >= 12000  # one value back
    assert cuda_versions(cudart)[0] == 0  # no driver loaded


@needs_no_device
def test_gpu_facts_without_a_driver_is_no_gpu():
    with pytest.raises(NoGpuError) as e:
        gpu_facts(0)
    assert "no NVIDIA driver is loaded" in e.value.problem and "nvidia-smi" in e.value.fix


# -- defect 12: an old driver is named as such -----------------------------------------------------------
def test_driver_older_than_the_wheels_cuda_is_named_as_a_driver_problem():
    check_driver(12040, 12090)  # CUDA minor-version compatibility: a 12.4 driver runs the 12.9 runtime
    check_driver(13000, 12090)
    with pytest.raises(SdoptError) as e:
        check_driver(12040, 13040)
    assert not isinstance(e.value, NoGpuError)
    assert e.value.problem == (
        "the NVIDIA driver is too old for the installed CUDA 13.4 wheels: it supports CUDA 12.4"
    )
    assert "580 or newer" in e.value.fix and "pip install 'sdopt[tensorrt-cu12]'" in e.value.fix
    with pytest.raises(NoGpuError, match="no NVIDIA driver"):
        check_driver(0, 12090)


# -- defect 1: one extra per CUDA major ----------------------------------------------------------------
def test_extras_pin_tensorrt_and_cuda_python_to_one_cuda_major():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "tensorrt" not in extras  # unpinned, it resolves to the newest CUDA whatever the driver
    for major, name in EXTRA_FOR_CUDA.items():
        deps = extras[name]
        trt = next(d for d in deps if d.startswith(f"tensorrt-cu{major}"))
        cuda = next(d for d in deps if d.startswith("cuda-python"))
        assert ">=10" in trt and "<12" in trt, trt  # TensorRT 10 and 11, the majors sdopt is written for
        assert f"<{major + 1}" in cuda and (f">={major}" in cuda), cuda
        assert f"'sdopt[{name}]'" in INSTALL_FIX
    assert any(d.startswith("cuda-python") for d in extras["test"])  # the CPU tests above need it


# -- defects 3 and 4: CUDA graphs and buffers on the real cuda-python ------------------------------------
def _binding(**shapes: tuple[int, ...]) -> Binding:
    return Binding(signature=tuple(shapes.items()), output_shapes={})


@needs_no_device
def test_failed_capture_keeps_the_result_warns_once_and_is_not_retried_for_that_shape():
    """Defect 3: capture fails here at cudaStreamBeginCapture (no driver); the call still succeeds."""
    cudart = RecordingCudart()
    graphs = CudaGraphs(cudart, "unet", enabled=True, fix="rebuild")
    runs = []
    execute = lambda: runs.append(1) or True  # noqa: E731 - stands in for context.execute_async_v3
    small, large = _binding(sample=(2, 4, 8, 8)), _binding(sample=(2, 4, 16, 16))
    with pytest.warns(CudaGraphWarning, match="unet engine cannot be captured .*cudaErrorInsufficientDriver"):
        graphs.enqueue(small, execute, stream=0)
    assert len(runs) == 1 and small.graph_exec is None  # the warm-up ran the call; nothing to replay
    assert cudart.calls == ["cudaStreamBeginCapture", "cudaGetLastError"]  # error state cleared, as trtexec
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per session, not per call
        graphs.enqueue(small, execute, stream=0)
        assert cudart.calls.count("cudaStreamBeginCapture") == 1  # that shape runs plainly from now on
        graphs.enqueue(large, execute, stream=0)  # a new shape tries once, silently
    assert cudart.calls.count("cudaStreamBeginCapture") == 2 and len(runs) == 3
    graphs.enabled = False
    graphs.enqueue(_binding(sample=(1, 4, 8, 8)), execute, stream=0)
    assert cudart.calls.count("cudaStreamBeginCapture") == 2


def test_failed_enqueue_is_an_error_not_a_fallback():
    graphs = CudaGraphs(RecordingCudart(), "vae_decoder", enabled=True, fix="sdopt build A --force")
    with pytest.raises(SdoptError, match="TensorRT failed to run the vae_decoder engine"):
        graphs.enqueue(_binding(latent_sample=(1, 4, 8, 8)), lambda: False, stream=0)


@needs_no_device
def test_capture_graph_reports_the_failing_call():
    cudart = RecordingCudart()
    graph_exec, reason = capture_graph(cudart, lambda: True, stream=0)
    assert graph_exec is None and reason == "cudaStreamBeginCapture: cudaErrorInsufficientDriver"


@needs_no_device
def test_every_handle_is_freed_even_when_frees_fail():
    """Defect 4: each free is tried on its own; the failures come back, none stops the rest."""
    cudart = RecordingCudart()
    b = _binding(sample=(1,))
    b.graph_exec, b.device, b.host_pointers = 11, {"sample": 12, "out": 13}, {"sample": 14, "out": 15}
    problems = release_binding(cudart, b)
    assert cudart.calls == ["cudaGraphExecDestroy", "cudaFree", "cudaFree", "cudaFreeHost", "cudaFreeHost"]
    assert len(problems) == 5 and problems[1] == "cudaFree(sample): cudaErrorInsufficientDriver"
    assert b.graph_exec is None and not b.device and not b.host_pointers  # never freed twice
    assert release_binding(cudart, b) == []


@needs_no_device
def test_host_buffers_are_pinned():
    """Defect 13: host staging buffers come from cudaMallocHost (page-locked), so copies are asynchronous."""
    cudart = RecordingCudart()
    with pytest.raises(SdoptError, match="CUDA cudaMallocHost failed: cudaErrorInsufficientDriver"):
        pinned_array(cudart, (2, 4), np.dtype(np.float16))
    assert cudart.calls == ["cudaMallocHost"]


# -- defect 5: no execution context -----------------------------------------------------------------------
class FakeEngine:
    """Stands in for an ICudaEngine whose create_execution_context() answers None (out of GPU memory)."""

    def create_execution_context(self) -> None:
        return None


def test_missing_execution_context_is_one_error():
    with pytest.raises(SdoptError) as e:
        create_context(FakeEngine(), "unet", "/art")
    assert "could not create an execution context for the unet engine" in e.value.problem
    assert "out of memory" in e.value.problem and "sdopt build /art --force --static" in e.value.fix


# -- defect 6: an invalid profile -------------------------------------------------------------------------
class FakeProfile:
    """Stands in for an IOptimizationProfile: records set_shape."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
        self.shapes[name] = (lo, opt, hi)


class FakeConfig:
    """Stands in for an IBuilderConfig: records flags and profiles; add_optimization_profile answers `index`."""

    def __init__(self, index: int = 0) -> None:
        self.index, self.profiles, self.set, self.cleared = index, [], [], []
        self.builder_optimization_level = None

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return self.index

    def set_flag(self, flag: str) -> None:
        self.set.append(flag)

    def clear_flag(self, flag: str) -> None:
        self.cleared.append(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.set.append(f"{pool}={size}")


FAKE_TRT = SimpleNamespace(
    BuilderFlag=SimpleNamespace(
        **{n: n for n in ("REFIT", "REFIT_IDENTICAL", "VERSION_COMPATIBLE", "TF32", "DISABLE_COMPILATION_CACHE")}
    ),
    MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
)
PROFILE = {"sample": ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32)), "timestep": ((1,), (1,), (1,))}


def _network() -> SimpleNamespace:
    """Stands in for an INetworkDefinition with a dynamic `sample` and a static `timestep` input."""
    inputs = [SimpleNamespace(name="sample", shape=(-1, 4, -1, -1)), SimpleNamespace(name="timestep", shape=(1,))]
    return SimpleNamespace(num_inputs=2, get_input=inputs.__getitem__)


def test_profiles_are_added_and_a_rejected_one_is_raised_with_its_shapes():
    builder = SimpleNamespace(create_optimization_profile=FakeProfile)
    config = FakeConfig(index=0)
    add_profiles(builder, config, _network(), [PROFILE], "unet/model.onnx")
    assert config.profiles[0].shapes == {"sample": PROFILE["sample"]}  # static inputs take no profile
    with pytest.raises(SdoptError) as e:
        add_profiles(builder, FakeConfig(index=-1), _network(), [PROFILE], "unet/model.onnx")
    assert e.value.problem.startswith(
        "TensorRT rejected the optimization profile of unet/model.onnx: sample min "
        "[1, 4, 8, 8] opt [2, 4, 16, 16] max [8, 4, 32, 32]"
    )


# -- defects 7, 8, 14: builder configuration ------------------------------------------------------------
def test_builder_flags_refit_tf32_and_the_compilation_cache():
    config = FakeConfig()
    configure(FAKE_TRT, config, BuildOptions())
    assert config.set == ["DISABLE_COMPILATION_CACHE"] and config.cleared == []  # TF32 stays TensorRT's default
    config = FakeConfig()
    configure(FAKE_TRT, config, BuildOptions(refittable=True, tf32=False, workspace_gb=1, opt_level=5))
    assert config.set == [f"WORKSPACE={2**30}", "REFIT", "DISABLE_COMPILATION_CACHE"]  # REFIT: weights change
    assert config.cleared == ["TF32"] and config.builder_optimization_level == 5


def test_one_timing_cache_per_engine_folder(tmp_path):
    """Defect 7: two GPUs (or TensorRT versions) building into one artifact keep separate caches."""
    a = timing_cache_path(tmp_path, engine_dir("10.7.0", "NVIDIA GeForce RTX 4090", "8.9"), BuildOptions())
    b = timing_cache_path(tmp_path, engine_dir("10.7.0", "NVIDIA H100 80GB HBM3", "9.0"), BuildOptions())
    assert a == tmp_path / "engines/nvidia-geforce-rtx-4090_sm89_trt10.7.0/timing.cache" and a != b
    assert timing_cache_path(tmp_path, "engines/x", BuildOptions(timing_cache=tmp_path / "c")) == tmp_path / "c"


# -- defect 8: refitting --------------------------------------------------------------------------------
class FakeRefitter:
    """Stands in for trt.Refitter over an engine with two refittable fp16 weights, conv.weight (8 values)
    and conv.bias (2), which TensorRT fused: refitting one requires the other."""

    made: list[FakeRefitter] = []

    def __init__(self, engine: Any, logger: Any) -> None:
        self.given: dict[str, np.ndarray] = {}
        self.refitted = False
        FakeRefitter.made.append(self)

    def get_all_weights(self) -> list[str]:
        return ["conv.weight", "conv.bias"]

    def get_weights_prototype(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=8 if name == "conv.weight" else 2, dtype="DataType.HALF")

    def set_named_weights(self, name: str, array: np.ndarray) -> bool:
        self.given[name] = array
        return True

    def get_missing_weights(self) -> list[str]:
        return [n for n in self.get_all_weights() if n not in self.given]

    def refit_cuda_engine(self) -> bool:
        self.refitted = True
        return True


def test_refit_engine_sets_named_weights_in_the_engines_types():
    fake_logger = type("FakeLogger", (), {"WARNING": 0, "__init__": lambda self, level: None})
    trt = SimpleNamespace(__name__="fake_tensorrt", Refitter=FakeRefitter, Logger=fake_logger)
    engine = SimpleNamespace(refittable=True)
    weights = {"conv.weight": np.ones((2, 4), np.float32), "conv.bias": np.zeros(2, np.float16)}
    refit_engine(trt, engine, weights)
    made = FakeRefitter.made[-1]
    assert made.refitted and made.given["conv.weight"].dtype == np.float16  # cast to the prototype's type
    with pytest.raises(SdoptError, match="also needs the weights conv.bias"):
        refit_engine(trt, engine, {"conv.weight": weights["conv.weight"]})
    with pytest.raises(SdoptError, match="no refittable weights named up.weight"):
        refit_engine(trt, engine, {"up.weight": weights["conv.bias"]})
    with pytest.raises(SdoptError, match="was not built refittable") as e:
        refit_engine(trt, SimpleNamespace(refittable=False), weights)
    assert "--refittable" in e.value.fix


def test_refit_arrays_must_match_the_prototype():
    assert check_refit_array("w", np.ones(4), 4, "FLOAT").dtype == np.float32
    with pytest.raises(SdoptError, match="w have 3 values, the engine's have 4"):
        check_refit_array("w", np.ones(3, np.float32), 4, "FLOAT")
    with pytest.raises(SdoptError, match="w are int64, the engine's are float16"):
        check_refit_array("w", np.ones(4, np.int64), 4, "DataType.HALF")
    with pytest.raises(SdoptError, match="BF16 in the engine"):
        check_refit_array("w", np.ones(4), 4, "BF16")


def test_version_rule_is_same_major_or_the_documented_next():
    assert version_compatible_loads("10.7.0", "10.7.0") and version_compatible_loads("10.7.0", "11.4.0.106")
    assert version_compatible_loads("8.6.1", "10.0.1") and not version_compatible_loads("8.6.1", "11.0.0")
    assert not version_compatible_loads("10.7.0", "10.6.9") and not version_compatible_loads("11.0.0", "10.16.1")
    assert not version_compatible_loads("10.7.0", "12.0.0") and not version_compatible_loads("", "10.7.0")
