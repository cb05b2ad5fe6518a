"""TensorRT: profiles, engine layout, the manifest's EngineEntry, compatibility checks and the fp16 ONNX
that strongly typed networks build from run on CPU; building and running engines needs a GPU (`pytest -m gpu`).

No test here pretends to be TensorRT: the CPU tests exercise the pure functions the builder and
the backend call before any TensorRT API, and the `gpu` tests run the real thing. The CUDA and
TensorRT call sequences that can run without a GPU are in test_tensorrt_cuda.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import FAMILY_PRESETS
from onnx import TensorProto

from sdopt.errors import EnginesMissingError, SdoptError
from sdopt.export.tensorrt_build import (
    BuildOptions,
    _record,
    build_engines,
    check_build_options,
    engine_dir,
    engine_profiles,
)
from sdopt.hardware import GpuFacts, gpu_facts, nvidia_device_present, parse_nvidia_smi
from sdopt.manifest import MANIFEST_NAME, EngineEntry, ShapeRange, load_manifest
from sdopt.runtime.backends.tensorrt import (
    TensorRTBackend,
    check_engine_compatible,
    check_host_code,
    check_shapes,
    import_tensorrt,
    numpy_dtype,
    select_engine,
)

INSTALL_HINTS = ("pip install 'sdopt[tensorrt-cu12]'", "'sdopt[tensorrt-cu13]'", "on PyPI")


# -- profiles ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_dynamic_profiles_are_the_manifest_ranges(family, tiny_artifact):
    m = load_manifest(tiny_artifact(FAMILY_PRESETS[family]))
    for name, comp in m.components.items():
        [profile] = engine_profiles(m, name)
        assert list(profile) == [t.name for t in comp.inputs]
        for spec in comp.inputs:
            lo, opt, hi = profile[spec.name]
            for i, d in enumerate(spec.shape):
                want = (d, d, d) if isinstance(d, int) else (comp.dims[d].min, comp.dims[d].opt, comp.dims[d].max)
                assert (lo[i], opt[i], hi[i]) == want, (name, spec.name, i)
    # The tiny presets: 64..256 px, VAE x8, at most 4 images per call (8 U-Net rows with guidance).
    assert engine_profiles(m, "unet")[0]["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))
    assert engine_profiles(m, "vae_decoder")[0]["latent_sample"] == ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 32, 32))
    assert engine_profiles(m, "vae_encoder")[0]["sample"] == ((1, 3, 64, 64), (1, 3, 128, 128), (4, 3, 256, 256))
    assert engine_profiles(m, "text_encoder")[0]["input_ids"] == ((1, 77), (2, 77), (8, 77))


def test_dynamic_profile_tunes_for_the_requested_size(tiny_artifact):
    m = load_manifest(tiny_artifact("tiny"))
    [p] = engine_profiles(m, "unet", height=192, width=64, batch=3)
    assert p["sample"] == ((1, 4, 8, 8), (6, 4, 24, 8), (8, 4, 32, 32))  # only opt moves


def test_static_profiles_fix_size_and_double_the_guided_batch(tiny_artifact):
    m = load_manifest(tiny_artifact("tiny"))
    [unet] = engine_profiles(m, "unet", static=True)  # defaults: 1 image at 128x128
    assert unet == {
        "sample": ((2, 4, 16, 16),) * 3,
        "timestep": ((2,),) * 3,
        "encoder_hidden_states": ((2, 77, 32),) * 3,
    }
    [dec] = engine_profiles(m, "vae_decoder", static=True, batch=2, height=64, width=192)
    assert dec == {"latent_sample": ((2, 4, 8, 24),) * 3}
    # The caller picks these batches (prompts per call, input images): a range up to the static batch.
    assert engine_profiles(m, "text_encoder", static=True, batch=2)[0] == {"input_ids": ((1, 77), (2, 77), (4, 77))}
    assert engine_profiles(m, "vae_encoder", static=True, batch=2, height=64, width=64)[0] == {
        "sample": ((1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 64, 64))
    }


def test_sdxl_static_profile_has_the_added_conditions(tiny_artifact):
    m = load_manifest(tiny_artifact("tiny-sdxl"))
    [p] = engine_profiles(m, "unet", static=True, batch=3, height=256, width=128)
    assert p["sample"] == ((6, 4, 32, 16),) * 3
    assert p["encoder_hidden_states"] == ((6, 77, 64),) * 3  # both encoders' states concatenated
    assert p["text_embeds"] == ((6, 32),) * 3 and p["time_ids"] == ((6, 6),) * 3
    assert engine_profiles(m, "text_encoder_2", static=True, batch=3)[0]["input_ids"] == ((1, 77), (3, 77), (6, 77))


@pytest.mark.parametrize(
    "kwargs, problem, fix",
    [  # ImageSpec.check's wording, with the CLI's flag names
        ({"height": 100}, "--height 100 is not a positive multiple of 8", "use e.g. 96"),
        ({"width": 520}, "--width 520 is not a positive multiple of 16", "use e.g. 512"),
        ({"width": 512}, "--width 512 is outside the exported range 64..256", "--min-size/--max-size"),
        ({"height": 32}, "--height 32 is outside the exported range 64..256", "use a size in range"),
        ({"batch": 5}, "5 images per call exceed the exported maximum batch 4", "--max-batch 5"),
        ({"batch": 0}, "images per call must be at least 1, got 0", "generate 1..4 at once"),
    ],
)
def test_sizes_outside_the_artifact_are_refused(kwargs, problem, fix, tiny_artifact):
    m = load_manifest(tiny_artifact("tiny"))
    for static in (True, False):
        with pytest.raises(SdoptError) as e:
            engine_profiles(m, "unet", static=static, **kwargs)
        assert e.value.problem.startswith(problem) and fix in e.value.fix


def test_unknown_component_and_bad_build_options(tiny_artifact):
    m = load_manifest(tiny_artifact("tiny"))
    with pytest.raises(SdoptError, match="has no text_encoder_2"):
        engine_profiles(m, "text_encoder_2")
    for options, message in [
        (BuildOptions(opt_level=6), "--opt-level 6 is not in 0..5"),
        (BuildOptions(workspace_gb=0), "--workspace-gb 0 must be positive"),
    ]:
        with pytest.raises(SdoptError, match=message):
            check_build_options(options)


def test_engine_dir_names_gpu_capability_and_version():
    assert engine_dir("10.7.0.23", "NVIDIA GeForce RTX 4090", "8.9") == (
        "engines/nvidia-geforce-rtx-4090_sm89_trt10.7.0.23"
    )
    assert engine_dir("11.0.0", "NVIDIA H100 80GB HBM3", "9.0") == "engines/nvidia-h100-80gb-hbm3_sm90_trt11.0.0"


def test_recording_engines_merges_and_rewrites_the_manifest(tiny_artifact, tmp_path):
    root = shutil.copytree(tiny_artifact("tiny"), tmp_path / "art")
    a = replace(ENTRY, path="engines/a/unet.plan")
    b = replace(ENTRY, path="engines/b/unet.plan")
    _record(root, [a, b])
    _record(root, [replace(a, sha256="new")])  # same path: replaced, the other engine kept
    engines = load_manifest(root).engines
    assert [(e.path, e.sha256) for e in engines] == [
        ("engines/b/unet.plan", ENTRY.sha256),
        ("engines/a/unet.plan", "new"),
    ]
    assert engines[1] == replace(a, sha256="new")  # typed round trip through the JSON
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_manifests_with_untyped_engine_dicts_still_load(tiny_artifact, tmp_path):
    """Manifests written before EngineEntry held plain dicts without `tf32`: they read as entries,
    tf32 defaulting to True, which is what those builds used (TensorRT's default)."""
    root = shutil.copytree(tiny_artifact("tiny"), tmp_path / "art")
    raw = json.loads((root / MANIFEST_NAME).read_text())
    raw["engines"] = [{**OLD_DICT_ENTRY, "unknown_future_key": 1}]
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    [entry] = load_manifest(root).engines
    assert entry == ENTRY and entry.flags.tf32 and entry.profiles[0]["sample"].max == [8, 4, 32, 32]


def _cli(*args: str) -> str:
    """`sdopt ARGS` in-process; its output with rich's box drawing and line wrapping undone."""
    from typer.testing import CliRunner

    from sdopt.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│┃╭╮╰╯─━┏┓┗┛┡┩└┘┌┐├┤┬┴┼]", " ", result.output).split())


def test_inspect_prints_the_engines(tiny_artifact, tmp_path, monkeypatch):
    from sdopt.cli.common import console

    monkeypatch.setattr(console, "width", 300)  # one table row per engine, nothing cut
    root = shutil.copytree(tiny_artifact("tiny"), tmp_path / "art")
    _record(root, [replace(ENTRY, flags=replace(ENTRY.flags, static=True, tf32=False))])
    out = _cli("inspect", str(root))
    assert "engines/nvidia-geforce-rtx-4090_sm89_trt10.7.0/unet.plan 10.7.0 NVIDIA GeForce RTX 4090 (8.9)" in out
    assert "static, no-tf32, opt 3" in out and "sample [1, 4, 8, 8]..[8, 4, 32, 32]" in out


def test_build_cli_has_no_lean_runtime_option_and_says_what_cuda_graph_captures():
    build = _cli("build", "--help")
    assert "--exclude-lean-runtime" not in build and "--no-tf32" in build and "known issue" in build
    graph_help = _cli("generate", "--help").split("--cuda-graph")[1].split("--allow-host-code")[0]
    assert "each component" in graph_help and "U-Net" not in graph_help
    assert not hasattr(BuildOptions(), "exclude_lean_runtime")


# -- compatibility checks -----------------------------------------------------------------------------
OLD_DICT_ENTRY = {
    "component": "unet",
    "path": "engines/nvidia-geforce-rtx-4090_sm89_trt10.7.0/unet.plan",
    "sha256": "0" * 64,
    "bytes": 1024,
    "tensorrt": "10.7.0",
    "gpu": "NVIDIA GeForce RTX 4090",
    "compute_capability": "8.9",
    "profiles": [
        {
            "sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [8, 4, 32, 32]},
            "timestep": {"min": [1], "opt": [2], "max": [8]},
        }
    ],
    "flags": {
        "static": False,
        "refittable": False,
        "version_compatible": False,
        "exclude_lean_runtime": False,
        "strongly_typed": True,
        "opt_level": 3,
        "workspace_gb": None,
    },
    "build_seconds": 1.5,
    "created": "2026-01-01T00:00:00+00:00",
}
ENTRY = EngineEntry.from_dict(OLD_DICT_ENTRY)
HERE = ("10.7.0", "NVIDIA GeForce RTX 4090", "8.9")
REBUILD = "sdopt build /art --force"


def _error(fn, *args, **kwargs) -> SdoptError:
    with pytest.raises(SdoptError) as e:
        fn(*args, **kwargs)
    return e.value


def _flags(entry: EngineEntry, **flags) -> EngineEntry:
    return replace(entry, flags=replace(entry.flags, **flags))


def test_engine_for_this_gpu_and_version_is_accepted():
    check_engine_compatible(ENTRY, *HERE, artifact="/art")


def test_tensorrt_version_mismatch_names_both_versions_and_the_rebuild():
    e = _error(check_engine_compatible, ENTRY, "10.8.0", "NVIDIA GeForce RTX 4090", "8.9", artifact="/art")
    assert "built with TensorRT 10.7.0, this host has TensorRT 10.8.0" in e.problem and REBUILD in e.fix


def test_compute_capability_and_gpu_model_mismatch():
    e = _error(check_engine_compatible, ENTRY, "10.7.0", "NVIDIA H100 80GB HBM3", "9.0", artifact="/art")
    assert "built for compute capability 8.9 (NVIDIA GeForce RTX 4090)" in e.problem and "is 9.0" in e.problem
    assert REBUILD in e.fix
    e = _error(check_engine_compatible, ENTRY, "10.7.0", "NVIDIA GeForce RTX 4080", "8.9", artifact="/art")
    assert "built on a NVIDIA GeForce RTX 4090, this GPU is a NVIDIA GeForce RTX 4080" in e.problem
    assert REBUILD in e.fix


def test_version_compatible_engines_load_only_across_the_documented_steps():
    """Defect 9: same major at a later version, or the next documented major (8 -> 10, 10 -> 11)."""
    vc = _flags(ENTRY, version_compatible=True)
    for host in ("10.7.0", "10.9.1", "10.16.1.11", "11.0.0", "11.4.0.106"):
        check_engine_compatible(vc, host, *HERE[1:])
    for host in ("10.6.0", "12.0.0", "9.0.0"):
        e = _error(check_engine_compatible, vc, host, *HERE[1:], artifact="/art")
        assert f"this host has {host}" in e.problem and "8 -> 10, 10 -> 11" in e.problem and REBUILD in e.fix
    trt8 = replace(vc, tensorrt="8.6.1")
    check_engine_compatible(trt8, "10.3.0", *HERE[1:])
    assert "this host has 11.0.0" in _error(check_engine_compatible, trt8, "11.0.0", *HERE[1:]).problem
    trt11 = replace(vc, tensorrt="11.1.0")
    assert "this host has 10.16.1" in _error(check_engine_compatible, trt11, "10.16.1", *HERE[1:]).problem
    # tensorrt_lean alone runs version-compatible engines only.
    check_engine_compatible(vc, *HERE, lean=True)
    assert "only tensorrt_lean" in _error(check_engine_compatible, ENTRY, *HERE, lean=True).problem


def test_engines_without_their_lean_runtime_are_refused_without_a_trust_prompt():
    """Defect 10: sdopt does not call IRuntime.load_runtime, so such engines get the rebuild message,
    and since they embed no host code, no --allow-host-code prompt comes first."""
    excluded = _flags(ENTRY, version_compatible=True, exclude_lean_runtime=True)
    e = _error(check_engine_compatible, excluded, *HERE, artifact="/art")
    assert "--exclude-lean-runtime" in e.problem and "lean runtime library" in e.problem and REBUILD in e.fix
    check_host_code(excluded, False)  # no trust switch asked


def test_host_code_needs_the_trust_switch():
    vc = _flags(ENTRY, version_compatible=True)
    e = _error(check_host_code, vc, False, "/art")
    assert "executes host code embedded in" in e.problem
    assert "allow_host_code=True" in e.fix and REBUILD in e.fix
    check_host_code(vc, True)
    check_host_code(ENTRY, False)


def test_select_engine_picks_this_gpu_or_raises_engines_missing(tiny_artifact):
    m = load_manifest(tiny_artifact("tiny"))
    with pytest.raises(EnginesMissingError) as e:
        select_engine(m, "unet", *HERE, artifact="/art")
    assert e.value.problem == "/art has no TensorRT engine for unet" and REBUILD in e.value.fix
    h100 = replace(ENTRY, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", path="engines/h100/unet.plan")
    old = replace(ENTRY, tensorrt="10.6.0", path="engines/old/unet.plan")
    m.engines = [h100, ENTRY, old]
    assert select_engine(m, "unet", *HERE) is ENTRY
    m.engines = [h100, old]
    with pytest.raises(EnginesMissingError) as e:  # the benchmark builds on this type, not on the text
        select_engine(m, "unet", *HERE, artifact="/art")
    assert "built with TensorRT 10.6.0, this host has TensorRT 10.7.0" in e.value.problem  # the closest engine's
    assert REBUILD in e.value.fix
    m.engines = [old]  # a single engine for another version is "missing" too: `sdopt build` fixes it
    assert isinstance(_error(select_engine, m, "unet", *HERE), EnginesMissingError)


def test_shapes_outside_the_profile_are_refused_before_running():
    check_shapes(ENTRY, {"sample": (8, 4, 32, 16), "timestep": (8,)})
    e = _error(check_shapes, ENTRY, {"sample": (2, 4, 40, 40), "timestep": (2,)}, "/art")
    assert (
        "input sample has shape [2, 4, 40, 40], outside the engine's profile [1, 4, 8, 8]..[8, 4, 32, 32]" in e.problem
    )
    assert REBUILD in e.fix
    assert "input timestep is missing" in _error(check_shapes, ENTRY, {"sample": (2, 4, 16, 16)}).problem
    static = replace(
        _flags(ENTRY, static=True), profiles=[{"sample": ShapeRange([2, 4, 16, 16], [2, 4, 16, 16], [2, 4, 16, 16])}]
    )
    e = _error(check_shapes, static, {"sample": (1, 4, 16, 16)}, "/art")
    assert "the engine is static" in e.fix and "--static" in e.fix and REBUILD in e.fix


def test_shapes_are_checked_against_the_profile_the_backend_runs():
    """Defect 11: the backend runs profile 0, so a shape that fits only a later profile is refused."""
    small = {"sample": ShapeRange([1, 4, 8, 8], [1, 4, 8, 8], [2, 4, 8, 8])}
    large = {"sample": ShapeRange([1, 4, 32, 32], [1, 4, 32, 32], [2, 4, 32, 32])}
    two = replace(ENTRY, profiles=[small, large])
    check_shapes(two, {"sample": (2, 4, 8, 8)})
    assert "outside the engine's profile" in _error(check_shapes, two, {"sample": (2, 4, 32, 32)}).problem


def test_dtype_and_nvidia_smi_parsing():
    assert numpy_dtype("DataType.HALF") == np.float16 and numpy_dtype("INT64") == np.int64
    with pytest.raises(SdoptError, match="BF16 has no numpy equivalent"):
        numpy_dtype("DataType.BF16")
    two_gpus = "NVIDIA H100 80GB HBM3, 9.0\nNVIDIA H100 80GB HBM3, 9.0\n"
    assert parse_nvidia_smi(two_gpus) == GpuFacts("NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(SdoptError, match="unexpected nvidia-smi output"):
        parse_nvidia_smi("")


# -- without TensorRT ---------------------------------------------------------------------------------
def test_importing_the_tensorrt_modules_imports_no_engine_library():
    code = (
        "import sys, sdopt.export.tensorrt_build, sdopt.runtime.backends.tensorrt, sdopt.hardware, "
        "sdopt.engines.trt, sdopt.engines.cuda, sdopt.engines.ort; "
        "print([m for m in ('tensorrt', 'tensorrt_lean', 'cuda.bindings', 'cuda.cudart', 'onnxruntime', 'torch') "
        "if m in sys.modules])"
    )  # not just 'cuda': cuda-bindings' .pth file registers that name at start-up
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_tensorrt_is_one_clear_error(tiny_artifact, monkeypatch):
    root = tiny_artifact("tiny")
    for module in ("tensorrt", "tensorrt_lean"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import tensorrt` raise ImportError
    from sdopt.runtime.backends import open_backend

    for call in (
        lambda: build_engines(root, BuildOptions()),
        lambda: TensorRTBackend(root, load_manifest(root)),
        lambda: open_backend("tensorrt", root, load_manifest(root), use_cuda_graph=True),
    ):
        e = _error(call)
        assert e.problem == "tensorrt is not installed" and all(h in e.fix for h in INSTALL_HINTS), e.fix
        assert "NVIDIA's index" not in e.fix  # defect 12: the wheels and their libraries are on PyPI
    assert load_manifest(root).engines == []  # nothing was written


# -- the fp16 ONNX a strongly typed network builds from ------------------------------------------------
def _graph(root: Path, component: str) -> onnx.GraphProto:
    return onnx.load(str(root / load_manifest(root).components[component].path)).graph


def test_fp16_onnx_types_are_what_strongly_typed_engines_get(tiny_artifact):
    root = tiny_artifact("tiny", "fp16")
    fp16, fp32 = TensorProto.FLOAT16, TensorProto.FLOAT

    unet = _graph(root, "unet")
    consumers = {(name, n.op_type, pos) for n in unet.node for pos, name in enumerate(n.input)}
    kinds = Counter(t.data_type for t in unet.initializer)
    assert kinds[fp16] > 50  # every weight
    for t in unet.initializer:  # fp32 only where ONNX demands it: Resize's scales
        if t.data_type == fp32:
            assert {(op, pos) for name, op, pos in consumers if name == t.name} == {("Resize", 2)}, t.name
    assert {v.type.tensor_type.elem_type for v in [*unet.input, *unet.output]} == {fp16}

    text = _graph(root, "text_encoder")
    producer = {o: n for n in text.node for o in n.output}
    inits = {t.name: t.data_type for t in text.initializer}
    norms = [n for n in text.node if n.op_type == "LayerNormalization"]  # opset 18 keeps the op whole
    assert norms and not [n for n in text.node if n.op_type == "ReduceMean"]
    for n in norms:
        x, scale, bias = n.input
        assert producer[x].op_type == "Cast" and producer[x].attribute[0].i == fp32
        assert inits[scale] == inits[bias] == fp32
        users = [u for u in text.node if n.output[0] in u.input]
        assert users and all(u.op_type == "Cast" and u.attribute[0].i == fp16 for u in users)
    assert Counter(inits.values())[fp16] > 0

    for vae in ("vae_decoder", "vae_encoder"):
        g = _graph(root, vae)
        assert {t.data_type for t in g.initializer} <= {fp32, TensorProto.INT64}, vae
        assert not [n for n in g.node if n.op_type == "Cast" and n.attribute[0].i == fp16], vae
        assert {v.type.tensor_type.elem_type for v in [*g.input, *g.output]} == {fp32}


# -- on a GPU ------------------------------------------------------------------------------------------
def gpu_test_problems() -> list[str]:
    """What keeps this host from running the TensorRT GPU tests (empty: nothing)."""
    problems = []
    for check in (import_tensorrt, lambda: gpu_facts(0)):
        try:
            check()
        except SdoptError as e:
            problems.append(f"{e.problem} ({e.fix})")
    return problems


# Defect 2: skip only where no NVIDIA device exists. A host with a device but without TensorRT,
# cuda-python or a new enough driver fails the GPU tests and says why, instead of passing them empty.
requires_device = pytest.mark.skipif(
    not nvidia_device_present(), reason="no NVIDIA device on this host (/dev/nvidia*): run `pytest -m gpu` on one"
)


@pytest.fixture
def trt_host():
    problems = gpu_test_problems()
    if problems:
        pytest.fail("this host has an NVIDIA device but cannot run TensorRT: " + "; ".join(problems))


def test_gpu_tests_skip_only_where_no_device_exists():
    """On this CPU host: no device, so the GPU tests skip, and gpu_facts says "no GPU" with NoGpuError;
    the problems the gate collects here are the ones a device host would fail with, not skip on."""
    from sdopt.errors import NoGpuError

    if nvidia_device_present():
        pytest.skip("this host has an NVIDIA device: the gpu tests themselves cover it")
    with pytest.raises(NoGpuError):
        gpu_facts(0)
    problems = gpu_test_problems()
    assert problems and any("no NVIDIA GPU usable" in p or "tensorrt is not installed" in p for p in problems)


CALL = dict(num_inference_steps=4, guidance_scale=7.5, height=128, width=128, seed=0, output_type="np")
# fp32 engines built with --no-tf32 against fp32 ONNX Runtime: both compute in full fp32 and differ only
# in kernel choice (TensorRT's Winograd/implicit-GEMM convolutions and fused attention sum in other orders
# than MLAS). One tolerance for every TensorRT comparison: ten times the 1e-4 that ONNX Runtime keeps
# against PyTorch on these 4-step tiny pipelines (pixels in [0, 1]), for TensorRT's other algorithms.
# It is an estimate: these tests have not run on a GPU yet (README, "What has and has not been executed").
TRT_TOL = 1e-3


def _built(tiny_artifact, tmp_path: Path, preset: str, **options) -> Path:
    """A private copy of the preset's export with engines (the shared export stays engine-free)."""
    root = shutil.copytree(tiny_artifact(preset), tmp_path / preset)
    entries = build_engines(root, BuildOptions(tf32=False, **options))
    assert sorted(e.component for e in entries) == sorted(options.get("components") or load_manifest(root).components)
    return root


def _images(root: Path, provider: str, **backend_options) -> np.ndarray:
    from sdopt.runtime import Pipeline

    pipe = Pipeline.load(root, provider=provider, **backend_options)
    return pipe("a photo of an astronaut", **CALL).images


@pytest.mark.gpu
@requires_device
@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_engines_generate_what_onnx_runtime_generates(family, tiny_artifact, tmp_path, trt_host):
    root = _built(tiny_artifact, tmp_path, FAMILY_PRESETS[family])
    m = load_manifest(root)
    for e in m.engines:
        assert (root / e.path).is_file() and e.gpu and e.flags.opt_level == 3 and not e.flags.tf32
        assert (root / e.path).parent.joinpath("timing.cache").is_file()  # one cache per engine folder
    trt, cpu = _images(root, "tensorrt"), _images(root, "cpu")
    assert trt.shape == cpu.shape == (1, 128, 128, 3)
    assert np.abs(trt - cpu).max() < TRT_TOL


@pytest.mark.gpu
@requires_device
def test_static_engines_cuda_graphs_and_profile_errors(tiny_artifact, tmp_path, trt_host):
    dynamic = _built(tiny_artifact, tmp_path / "dynamic", "tiny")
    static = _built(tiny_artifact, tmp_path / "static", "tiny", static=True, batch=1, height=128, width=128)
    assert all(e.flags.static for e in load_manifest(static).engines)
    plain = _images(static, "tensorrt")
    assert np.abs(plain - _images(dynamic, "tensorrt")).max() < TRT_TOL  # same math, other tactics per profile

    from sdopt.runtime import Pipeline

    graphed = Pipeline.load(static, provider="tensorrt", use_cuda_graph=True)
    first = graphed("a photo of an astronaut", **CALL).images  # captures
    again = graphed("a photo of an astronaut", **CALL).images  # replays
    # A graph replays the very kernels of the plain run on the same engine: only the launch differs.
    assert np.abs(first - plain).max() < 1e-5 and np.abs(again - plain).max() < 1e-5

    with pytest.raises(SdoptError) as e:  # the static U-Net was built for 128 px only
        graphed("a photo of an astronaut", **{**CALL, "height": 64, "width": 64})
    assert "outside the engine's profile" in e.value.problem and "sdopt build" in e.value.fix
    with pytest.raises(SdoptError, match="already has"):
        build_engines(static, BuildOptions(static=True))


@pytest.mark.gpu
@requires_device
def test_refit_replaces_weights_and_restores_them(tiny_artifact, tmp_path, trt_host):
    """Defect 8: `--refittable` engines are refitted for real (the LoRA path): zeroing the U-Net's last
    convolution changes the images, putting the ONNX weights back gives the plain result again."""
    from onnx import numpy_helper

    from sdopt.runtime import Pipeline

    root = _built(tiny_artifact, tmp_path, "tiny", refittable=True)
    pipe = Pipeline.load(root, provider="tensorrt")
    before = pipe("a photo of an astronaut", **CALL).images
    unet = onnx.load(str(root / load_manifest(root).components["unet"].path))
    weights = {t.name: numpy_helper.to_array(t) for t in unet.graph.initializer if "conv_out" in t.name}
    assert weights, "the tiny U-Net's conv_out initializers"
    pipe.sessions["unet"].refit({k: np.zeros_like(v) for k, v in weights.items()})
    assert np.abs(pipe("a photo of an astronaut", **CALL).images - before).max() > 1e-2
    pipe.sessions["unet"].refit(weights)
    assert np.abs(pipe("a photo of an astronaut", **CALL).images - before).max() < 1e-5  # same engine, same weights
