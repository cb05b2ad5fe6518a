"""LoRA: the torch-free reader, runtime hot-swap and export merge against diffusers.

Reference: diffusers' own `load_lora_weights` + `fuse_lora(lora_scale=...)` on a fresh copy
of the same seeded tiny pipeline, same prompt, same initial latents (`latents=` on both
sides; the models' own deterministic schedulers draw nothing else), images compared as
[0, 1] float pixels. Test LoRAs are built with peft on the tiny presets, with non-zero
lora_B (`tests/lora_files.py`), alpha only in the `lora_adapter_metadata` header.

Tolerance: 1e-3 max abs (the issue's bound). Both sides are fp32; the merged weights differ
by float rounding only (numpy vs torch GEMM for B @ A, ~1e-8), and the runtime's base parity
is ~1e-6 (test_runtime_parity.py), so observed differences are ~1e-6 and 1e-3 leaves wide
headroom while a LoRA applied wrongly (missing alpha/r = 2x, a missed module, a transposed
delta) moves pixels by > 1e-2 (asserted below: every LoRA moves the image by more than 1e-2).
Every measured number goes through `record_metric` (the session's "measured numbers" summary).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lora_files import make_peft_lora, peft_to_kohya  # noqa: E402

from sdopt.errors import SdoptError  # noqa: E402
from sdopt.export.synthetic import build_pipeline, load_preset  # noqa: E402
from sdopt.lora.files import LoraSpec, compute_deltas, parse_lora_arg, plan_deltas  # noqa: E402
from sdopt.lora.keys import _diffusers_module, split_role  # noqa: E402
from sdopt.runtime import Pipeline  # noqa: E402
from sdopt.runtime.lora_swap import manifest_targets  # noqa: E402

FAMILIES = {"sd1": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}
SIZE, STEPS, GUIDANCE = 64, 4, 7.5
PROMPT = "a watercolor fox in the snow"
TOL = 1e-3  # see the module docstring
MOVES = 1e-2  # a LoRA must change the image by more than this, or the test proves nothing
_recorder: list = []  # the current test's record_metric (set by the autouse fixture below)


@pytest.fixture(autouse=True)
def _parity_recorder(record_metric):
    _recorder[:] = [record_metric]
    yield
    _recorder.clear()


def parity(case: str, diff: float) -> None:
    """Record a measured max abs pixel difference for the session summary (order-independent)."""
    _recorder[0]("LoRA parity: max abs pixel diff", case, diff)


_files: dict[tuple[str, str], Path] = {}
_pipes: dict[str, Pipeline] = {}


def text_encoders(preset: str) -> tuple[str, ...]:
    return ("text_encoder", "text_encoder_2") if load_preset(preset)["family"] == "sdxl" else ("text_encoder",)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """lora_file(preset, kind): "full" = U-Net (attention, ff, proj, conv) + text encoder(s),
    rank 4, alpha 8; "unet" = U-Net attention/ff/proj only, rank 2, alpha 1; "kohya" = the
    full one renamed to kohya keys, fp16, alpha as tensors."""
    root = tmp_path_factory.mktemp("loras")

    def get(preset: str, kind: str = "full") -> Path:
        if (preset, kind) not in _files:
            path = root / f"{preset}-{kind}.safetensors"
            if kind == "full":
                make_peft_lora(preset, path, ("unet", *text_encoders(preset)), rank=4, alpha=8.0, seed=0, conv=True)
            elif kind == "unet":
                make_peft_lora(preset, path, ("unet",), rank=2, alpha=1.0, seed=1, std=0.2)
            elif kind == "kohya":
                sdxl = load_preset(preset)["family"] == "sdxl"
                lpb = load_preset(preset)["unet"]["layers_per_block"] if sdxl else None
                peft_to_kohya(get(preset, "full"), path, layers_per_block=lpb)
            _files[(preset, kind)] = path
        return _files[(preset, kind)]

    return get


@pytest.fixture(scope="module")
def runtime(tiny_artifact):
    def get(preset: str) -> Pipeline:
        if preset not in _pipes:
            _pipes[preset] = Pipeline.load(tiny_artifact(preset))
        return _pipes[preset]

    return get


def latents(preset: str) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def run(pipe: Pipeline, preset: str, **kw) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        latents=latents(preset),
        output_type="np",
        seed=0,
        **kw,
    ).images


def reference(preset: str, loras: list[tuple[Path, float]]) -> np.ndarray:
    """diffusers: load_lora_weights each file as its own adapter, weight it, fuse, generate."""
    pipe = build_pipeline(preset)
    names = [f"l{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(components=["unet", *text_encoders(preset)], lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        latents=torch.from_numpy(latents(preset)),
        output_type="np",
    )
    return out.images


def check(case: str, got: np.ndarray, want: np.ndarray, base: np.ndarray) -> None:
    diff = float(np.abs(got - want).max())
    parity(case, diff)
    assert diff <= TOL, f"{case}: max abs {diff:.2e} > {TOL}"
    assert float(np.abs(want - base).max()) > MOVES, f"{case}: the LoRA barely changes the image; the test is void"


# -- parity with diffusers ---------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_unet_and_text_encoder_lora_matches_diffusers(family, runtime, lora_file):
    preset = FAMILIES[family]
    pipe = runtime(preset)
    base = run(pipe, preset)
    pipe.set_loras([(lora_file(preset), 0.8)])
    try:
        check(f"{family} U-Net+TE x0.8", run(pipe, preset), reference(preset, [(lora_file(preset), 0.8)]), base)
        fast = run(pipe, preset, deepcache=2)  # unet_shallow carries the same LoRA (vs export merge below)
        assert np.abs(fast - run(pipe, preset)).max() > 0
    finally:
        pipe.set_loras([])


def test_unet_only_and_stacked_loras_match_diffusers(runtime, lora_file):
    preset = "tiny"
    pipe = runtime(preset)
    base = run(pipe, preset)
    try:
        pipe.set_loras([(lora_file(preset, "unet"), 0.5)])
        check("sd1 U-Net only x0.5", run(pipe, preset), reference(preset, [(lora_file(preset, "unet"), 0.5)]), base)
        stack = [(lora_file(preset), 0.8), (lora_file(preset, "unet"), 0.5)]
        pipe.set_loras(stack)
        check("sd1 two stacked (x0.8 + x0.5)", run(pipe, preset), reference(preset, stack), base)
    finally:
        pipe.set_loras([])


def test_restore_gives_identical_bytes(runtime, lora_file):
    pipe = runtime("tiny")
    before = run(pipe, "tiny")
    pipe.set_loras([(lora_file("tiny"), 1.0)])
    assert pipe.loras == [LoraSpec(lora_file("tiny"), 1.0)]
    pipe.set_loras([])
    after = run(pipe, "tiny")
    assert before.tobytes() == after.tobytes()  # same graphs, same weights: bit-identical
    assert pipe.loras == []


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_matches_peft_file(family, runtime, lora_file):
    """kohya keys (sgm block names and lora_te1/te2 on SDXL), fp16, alpha as tensors."""
    preset = FAMILIES[family]
    pipe = runtime(preset)
    try:
        pipe.set_loras([(lora_file(preset), 0.8)])
        peft_image = run(pipe, preset)
        pipe.set_loras([(lora_file(preset, "kohya"), 0.8)])
        # fp16 rounding of A and B (~5e-4 relative) moves pixels by ~1e-5 here.
        diff = float(np.abs(run(pipe, preset) - peft_image).max())
        parity(f"{family} kohya fp16 vs PEFT fp32", diff)
        assert diff <= TOL
    finally:
        pipe.set_loras([])


def test_kohya_sdxl_names_are_what_diffusers_converts_back(lora_file):
    """Our sgm (kohya SDXL) spelling, fed to diffusers' own converter, gives the module names back."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from safetensors.numpy import load_file

    preset = "tiny-sdxl"
    kohya = {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(str(lora_file(preset, "kohya"))).items()}
    peft = load_file(str(lora_file(preset)))
    pipe = build_pipeline(preset)
    renamed = _maybe_map_sgm_blocks_to_diffusers(kohya, pipe.unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(renamed)
    # diffusers converts to its older spellings (attn1.processor.to_q_lora.down.weight): normalise both.
    module = lambda key: _diffusers_module(split_role(key)[0])  # noqa: E731
    unet = lambda keys: {module(k) for k in keys if k.startswith("unet.")}  # noqa: E731
    assert unet(converted) == unet(peft)


def test_export_merge_equals_runtime_swap(tmp_path, runtime, lora_file):
    """`sdopt export --lora` and `set_loras` apply the same numbers (fast mode too)."""
    from sdopt.export.artifact import ExportOptions, export_artifact

    spec = LoraSpec(lora_file("tiny"), 0.8)
    merged = export_artifact("synthetic:tiny", tmp_path / "merged", ExportOptions(loras=[spec], ort_optimize=False))
    record = merged.manifest.loras[0]
    assert (record.file, record.scale) == (spec.path.name, 0.8) and len(record.sha256) == 64
    on_disk = json.loads((merged.out / "sdopt.json").read_text())["loras"][0]
    assert on_disk["sha256"] == record.sha256
    baked = Pipeline.load(merged.out)
    pipe = runtime("tiny")
    pipe.set_loras([spec])
    try:
        for deepcache in (1, 2):
            images = [run(p, "tiny", deepcache=deepcache) for p in (baked, pipe)]
            diff = float(np.abs(images[0] - images[1]).max())
            parity(f"sd1 export-merge vs runtime swap, deepcache={deepcache}", diff)
            # Same merged fp32 weights on both sides; only ORT's graph (optimised at load vs
            # from the saved optimised graph) and kernel order may differ.
            assert diff <= 1e-5
    finally:
        pipe.set_loras([])


def test_fp16_artifact_swaps_and_restores(tiny_artifact, runtime, lora_file):
    """An fp16 export: the weight map finds the fp16 initializers (cast as the fp16 converter
    casts), the merged weights go in as fp16, and restoring gives the base bytes again."""
    fp16 = Pipeline.load(tiny_artifact("tiny", "fp16"))
    assert all(r.initializer for r in fp16.manifest.components["unet"].weights.values())
    base16 = run(fp16, "tiny")
    spec = [(lora_file("tiny"), 0.8)]
    fp32 = runtime("tiny")
    fp16.set_loras(spec)
    fp32.set_loras(spec)
    try:
        diff = float(np.abs(run(fp16, "tiny") - run(fp32, "tiny")).max())
        parity("sd1 fp16 artifact + LoRA vs fp32 artifact + LoRA", diff)
        # fp16 weights and activations: the base images already differ by ~1e-3 here.
        assert diff <= 1e-2
    finally:
        fp32.set_loras([])
        fp16.set_loras([])
    assert run(fp16, "tiny").tobytes() == base16.tobytes()


def test_weight_map_covers_every_lora_target(tiny_artifact):
    for preset in FAMILIES.values():
        pipe = Pipeline.load(tiny_artifact(preset))
        for name in ("unet", *text_encoders(preset)):
            refs = pipe.manifest.components[name].weights
            assert refs and all(r.initializer for r in refs.values()), name
            assert any(r.transposed for r in refs.values())  # MatMul weights are stored transposed
        shallow = pipe.manifest.components["unet_shallow"].weights
        assert shallow and set(shallow) < set(pipe.manifest.components["unet"].weights)


def test_optimised_graph_and_original_graph_swaps_agree(runtime, lora_file):
    """The fast path (ORT's saved optimised graph, NCHWc-blocked conv filters under new names)
    and the original graph (optimised at session creation) give the same U-Net output."""
    from sdopt.runtime.lora_swap import build_overrides

    pipe = runtime("tiny")
    graph = "unet_deep" if "unet_deep" in pipe.manifest.components else "unet"  # what the runtime loads
    refs = pipe.manifest.components[graph].weights
    assert all(r.ort_cpu for r in refs.values()) and any(r.ort_cpu_layout for r in refs.values())
    deltas = plan_deltas([LoraSpec(lora_file("tiny"), 1.0)], manifest_targets(pipe.manifest))
    fast_over = build_overrides(pipe.root, pipe.manifest, deltas, pipe.backend.optimised_graph, [graph])[graph]
    slow_over = build_overrides(pipe.root, pipe.manifest, deltas, names=[graph])[graph]
    assert fast_over.optimised and not slow_over.optimised
    assert set(fast_over.initializers) != set(slow_over.initializers)  # NCHWc filters under other names
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.array([500.0, 20.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    fast = pipe.backend.load_with_initializers(graph, fast_over.initializers, True).run(feeds)
    slow = pipe.backend.load_with_initializers(graph, slow_over.initializers, False).run(feeds)
    base = pipe.backend.load(graph).run(feeds)
    # Same weights; the two graphs differ only in ORT's fused kernels (float rounding).
    assert np.abs(fast["out_sample"] - slow["out_sample"]).max() < 1e-5
    assert np.abs(fast["out_sample"] - base["out_sample"]).max() > MOVES


# -- the reader ----------------------------------------------------------------------------------
def test_alpha_from_metadata_header(lora_file, tmp_path, runtime):
    """alpha 8 / r 4 lives only in the header; ignoring it would halve every delta."""
    from safetensors.numpy import load_file, save_file

    src = lora_file("tiny")
    bare = tmp_path / "no-metadata.safetensors"
    save_file(load_file(str(src)), str(bare))
    targets = manifest_targets(runtime("tiny").manifest)
    with_meta = compute_deltas([LoraSpec(src)], targets)["unet"]
    without = compute_deltas([LoraSpec(bare)], targets)["unet"]
    name = next(iter(with_meta))
    np.testing.assert_allclose(with_meta[name], 2.0 * without[name], rtol=1e-6)


def test_parse_lora_arg():
    assert parse_lora_arg("a/b.safetensors:0.5") == LoraSpec(Path("a/b.safetensors"), 0.5)
    assert parse_lora_arg("a/b.safetensors") == LoraSpec(Path("a/b.safetensors"), 1.0)
    assert parse_lora_arg("c:/x.safetensors") == LoraSpec(Path("c:/x.safetensors"), 1.0)


# -- bad input: one error, weights untouched ----------------------------------------------------
def _refused(pipe: Pipeline, preset: str, loras, match: str, **kw) -> None:
    before, applied = run(pipe, preset), pipe.loras
    with pytest.raises(SdoptError, match=match) as info:
        pipe.set_loras(loras, **kw)
    assert "\n" not in str(info.value)
    assert pipe.loras == applied and run(pipe, preset).tobytes() == before.tobytes()


def test_lora_for_another_family_names_key_and_shapes(runtime, lora_file):
    pipe = runtime("tiny-sd2")
    pipe.set_loras([(lora_file("tiny-sd2", "unet"), 0.5)])  # a LoRA applied: a failed swap must keep it
    try:
        shapes = r"has shape \(.*\), but the model's .* of shape \(.*\) needs"
        _refused(pipe, "tiny-sd2", [(lora_file("tiny"), 1.0)], shapes)
    finally:
        pipe.set_loras([])


def test_unmatched_keys_listed_or_ignored(runtime, lora_file, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    src = lora_file("tiny", "unet")
    tensors = load_file(str(src))
    with safe_open(str(src), framework="np") as f:
        metadata = f.metadata()
    tensors["unet.not_a_block.to_q.lora_A.weight"] = np.ones((2, 32), np.float32)
    tensors["unet.not_a_block.to_q.lora_B.weight"] = np.ones((32, 2), np.float32)
    extra = tmp_path / "extra.safetensors"
    save_file(tensors, str(extra), metadata=metadata)
    pipe = runtime("tiny")
    _refused(pipe, "tiny", [(extra, 1.0)], r"2 of .* keys .* match no module.*unet\.not_a_block\.to_q\.lora_A")
    try:
        pipe.set_loras([(extra, 0.5)], ignore_unmatched=True)
        ignored = run(pipe, "tiny")
        pipe.set_loras([(src, 0.5)])
        assert ignored.tobytes() == run(pipe, "tiny").tobytes()
    finally:
        pipe.set_loras([])


def test_non_safetensors_refused(runtime, tmp_path, lora_file):
    pipe = runtime("tiny")
    pickle = tmp_path / "lora.bin"
    torch.save({"unet.x.lora_A.weight": torch.ones(2, 2)}, pickle)
    _refused(pipe, "tiny", [(pickle, 1.0)], "pickle checkpoint")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    _refused(pipe, "tiny", [(junk, 1.0)], "not a safetensors file")
    _refused(pipe, "tiny", [(tmp_path / "missing.safetensors", 1.0)], "does not exist")
    # A good file first and a bad one second: all or nothing.
    _refused(pipe, "tiny", [(lora_file("tiny"), 1.0), (junk, 1.0)], "not a safetensors file")


def test_cli_generate_with_lora(tiny_artifact, lora_file, tmp_path):
    from typer.testing import CliRunner

    from sdopt.cli import app

    out = tmp_path / "out.png"
    args = ["generate", str(tiny_artifact("tiny")), PROMPT, "--steps", "2", "--seed", "1", "-o", str(out)]
    ok = CliRunner().invoke(app, [*args, "--lora", f"{lora_file('tiny')}:0.7"])
    assert ok.exit_code == 0, ok.output
    assert out.is_file() and "tiny-full.safetensors x0.7" in ok.output
    bad = CliRunner().invoke(app, [*args, "--lora", str(tmp_path / "nope.safetensors")])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output


# -- threads -------------------------------------------------------------------------------------
def test_swap_waits_for_in_flight_call(runtime, lora_file):
    """A call that started with the base weights finishes with them; the swap waits for it."""
    pipe = runtime("tiny")
    base = run(pipe, "tiny")
    started, release = threading.Event(), threading.Event()
    result: dict[str, object] = {}

    def slow_step(done: int, total: int) -> None:
        started.set()
        release.wait(10)

    def call() -> None:
        result["image"] = run(pipe, "tiny", callback=slow_step)

    def swap() -> None:
        pipe.set_loras([(lora_file("tiny"), 1.0)])
        result["swapped_at"] = time.perf_counter()

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(30)
    swapper = threading.Thread(target=swap)
    swapper.start()
    time.sleep(1.0)  # the new sessions are ready well within this on the tiny model
    assert "swapped_at" not in result  # still waiting for the in-flight call
    released_at = time.perf_counter()
    release.set()
    caller.join(30)
    swapper.join(30)
    try:
        assert result["swapped_at"] >= released_at
        assert result["image"].tobytes() == base.tobytes()  # the whole call saw the base weights
        assert np.abs(run(pipe, "tiny") - base).max() > MOVES
    finally:
        pipe.set_loras([])


def test_runtime_lora_imports_no_torch():
    code = (
        "import sys; import sdopt.lora.files, sdopt.runtime.lora_swap, sdopt.lora.onnx_weights; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- TensorRT refit (GPU) --------------------------------------------------------------------------
def _trt_missing() -> bool:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return True
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return True
    return False


@pytest.mark.gpu
@pytest.mark.skipif(_trt_missing(), reason="needs tensorrt and an NVIDIA GPU: run `pytest -m gpu` on a GPU host")
def test_tensorrt_refit_matches_merged_build_and_refits_back(tiny_artifact, lora_file, tmp_path):
    """Refittable engines refitted with the LoRA give what engines built from the export-merged
    weights give; refitting back to base gives the base engine's image again."""
    import shutil

    from sdopt.export.artifact import ExportOptions, export_artifact
    from sdopt.export.tensorrt_build import BuildOptions, build_engines

    spec = LoraSpec(lora_file("tiny"), 0.8)
    refittable = shutil.copytree(tiny_artifact("tiny"), tmp_path / "refittable")
    build_engines(refittable, BuildOptions(refittable=True))
    merged = export_artifact("synthetic:tiny", tmp_path / "merged", ExportOptions(loras=[spec])).out
    build_engines(merged, BuildOptions(refittable=True))  # same flags: same kernels available on both sides

    pipe = Pipeline.load(refittable, provider="tensorrt")
    base = run(pipe, "tiny")
    pipe.set_loras([spec])
    refitted = run(pipe, "tiny")
    fresh = run(Pipeline.load(merged, provider="tensorrt"), "tiny")
    # Two builds may pick different tactics (and TF32 matmuls in fp32 engines), as ORT vs
    # TensorRT does in test_tensorrt.py; a LoRA not applied would differ by > MOVES.
    assert np.abs(refitted - fresh).max() < 1e-2 < np.abs(refitted - base).max()
    pipe.set_loras([])
    # The same engine with its base weights back bit for bit: only kernel non-determinism remains.
    assert np.abs(run(pipe, "tiny") - base).max() < 1e-5
    loaded = Pipeline.load(refittable, provider="tensorrt", loras=[spec])  # refit at load
    assert np.abs(run(loaded, "tiny") - refitted).max() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(_trt_missing(), reason="needs tensorrt and an NVIDIA GPU: run `pytest -m gpu` on a GPU host")
def test_tensorrt_refit_supplies_fused_partner_weights(tiny_artifact, lora_file, tmp_path):
    """A LoRA'd weight TensorRT fused with others (a GEMM's bias, a folded scale) is refused alone,
    naming the partners; with them read from model.onnx the refit goes through, and the swap
    and the swap back give the base engine's image again."""
    import shutil
    from functools import partial

    from sdopt.engines.trt import check_refit_array, refit_engine, trt_logger
    from sdopt.export.tensorrt_build import BuildOptions, build_engines
    from sdopt.runtime.lora_refit import base_values, partner_values

    spec = LoraSpec(lora_file("tiny"), 0.8)
    art = shutil.copytree(tiny_artifact("tiny"), tmp_path / "refittable")
    build_engines(art, BuildOptions(refittable=True))
    pipe = Pipeline.load(art, provider="tensorrt")
    base = run(pipe, "tiny")
    overrides = pipe.lora.overrides([spec])
    name = next(n for n in sorted(overrides) if n.startswith("unet"))
    session = pipe.sessions[pipe.lora.role(name)]
    session = getattr(session, "session", session)
    trt, engine = session.backend.trt, session.engine
    fused = {}  # LoRA'd weight -> what the refitter misses when only it is set
    for init, value in overrides[name].initializers.items():
        refitter = trt.Refitter(engine, trt_logger(trt))
        proto = refitter.get_weights_prototype(init)
        array = check_refit_array(init, value, int(proto.size), proto.dtype)  # alive while the refitter is
        refitter.set_named_weights(init, array)
        missing = [m for m in refitter.get_missing_weights() if m]
        if missing:
            fused[init] = missing
        del refitter, array  # nothing refitted: refit_cuda_engine was never called
    if not fused:
        pytest.skip(f"TensorRT {trt.__version__} fused none of the LoRA'd {name} weights: no partner to supply")
    init = next(iter(fused))
    one = {init: overrides[name].initializers[init]}
    with pytest.raises(SdoptError, match="also needs the weights"):
        refit_engine(trt, engine, one)  # refused before refit_cuda_engine: the engine is unchanged
    graph = art / pipe.manifest.components[name].path
    source = partial(partner_values, current=one, base=partial(base_values, graph))
    assert set(fused[init]) <= set(session.refit(one, source))
    back = dict(base_values(graph, {init}))
    session.refit(back, partial(partner_values, current=back, base=partial(base_values, graph)))
    assert np.abs(run(pipe, "tiny") - base).max() < 1e-5  # base weights and partners back: base image

    pipe.set_loras([spec])  # the pipeline path: every LoRA'd weight, partners from model.onnx
    assert pipe.lora.refit_partners.get(name), pipe.lora.refit_partners
    assert np.abs(run(pipe, "tiny") - base).max() > MOVES
    pipe.set_loras([])
    assert np.abs(run(pipe, "tiny") - base).max() < 1e-5
