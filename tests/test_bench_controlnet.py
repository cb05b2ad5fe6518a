"""`sdopt bench --controlnet` (issue 15): the ControlNet job through the real harness on the tiny model,
its bad input, its export cache key and its control image. Never asserts timings (only that they exist).

Parity bound: 1e-4 max abs on [0, 1] pixels, the harness's own bound for the tiny model
(tests/test_bench.py): torch (diffusers' StableDiffusionControlNetPipeline) and the runtime are both fp32
from the same latents, weights and control image, so only kernel rounding differs (observed ~3e-6);
a missing or misscaled residual moves pixels by far more (checked against the plain image below).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from bench_cli import invoke
from PIL import Image

from sdopt.bench.config import BenchConfig, make_config
from sdopt.bench.control import artifact_controlnets, edge_map, render_control_image, torch_sources
from sdopt.bench.plan import cache_key, export_settings
from sdopt.errors import SdoptError
from sdopt.manifest import load_manifest

TOL = 1e-4  # see the module docstring


@pytest.fixture(scope="module")
def cn_artifact(tmp_path_factory):
    """The tiny model exported with one synthetic ControlNet (only what the job loads, no saved ORT graphs)."""
    from sdopt.export.artifact import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("bench-cn") / "tiny-cn"
    comps = ["text_encoder", "unet", "vae_decoder"]
    options = ExportOptions(components=comps, controlnets=["synthetic"], ort_optimize=False)
    export_artifact("synthetic:tiny", out, options)
    return out


def test_bench_controlnet_job_end_to_end(cn_artifact, tmp_path):
    out = tmp_path / "results"
    args = ["--controlnet", "synthetic", "--backends", "torch,onnxruntime", "--runs", "1", "--warmup", "0"]
    result = invoke(str(cn_artifact), *args, "--steps", "2", "--prompt", "a red cube", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "ControlNet stage (median)" in result.output
    data = json.loads((out / "results.json").read_text())
    job = data["job"]
    assert job["controlnet"] == ["synthetic"] and job["control_sources"] == ["synthetic=synthetic:0"]
    assert job["control_image"] == "control.png" and (out / "control.png").is_file()
    by = {b["name"]: b for b in data["backends"]}
    for b in by.values():
        assert b["status"] == "ok", b
        assert list(b["stages_s"]) == ["text_encoder", "controlnet", "unet", "vae_decoder", "unet_per_step", "other"]
        assert b["stages_s"]["controlnet"]["median"] > 0 and b["runs"][0]["stages_s"]["controlnet"] > 0
        assert b["runs"][0]["unet_calls"] >= 2
    ort = by["onnxruntime"]
    assert ort["parity"]["max_abs_diff"] < TOL, ort["parity"]  # TOL: see the module docstring
    assert ort["speedup_vs_torch"]["controlnet"] > 0
    md = (out / "results.md").read_text()
    assert "ControlNet job: synthetic=synthetic:0" in md and "| controlnet |" in md
    # The ControlNet shaped the image: the same latents without it give another image (by >> TOL).
    from sdopt.runtime import Pipeline

    latents = np.random.default_rng(0).standard_normal(job["latent_shape"], dtype=np.float32)
    plain = Pipeline.load(cn_artifact)("a red cube", num_inference_steps=2, latents=latents, output_type="np").images
    bench = np.asarray(Image.open(out / "images" / "onnxruntime.png"), np.float32) / 255
    assert np.abs(plain[0] - bench).max() > 0.05


def test_bench_sdxl_two_controlnets(tmp_path_factory):
    """SDXL (StableDiffusionXLControlNetPipeline), two ControlNets summed (MultiControlNetModel), scale 0.7."""
    from sdopt.export.artifact import ExportOptions, export_artifact

    art = tmp_path_factory.mktemp("bench-cn-xl") / "tiny-sdxl-cn"
    comps = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    nets = ["a=synthetic:1", "b=synthetic:2"]
    export_artifact("synthetic:tiny-sdxl", art, ExportOptions(components=comps, controlnets=nets, ort_optimize=False))
    out = tmp_path_factory.mktemp("bench-cn-xl-out")
    args = ["--controlnet", ",".join(nets), "--control-scale", "0.7", "--guidance", "5", "--steps", "2"]
    result = invoke(str(art), *args, "--runs", "1", "--warmup", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["job"]["controlnet"] == ["a", "b"] and data["job"]["control_scale"] == 0.7
    assert data["job"]["control_sources"] == ["a=synthetic:1", "b=synthetic:2"]
    by = {b["name"]: b for b in data["backends"]}
    assert all(b["status"] == "ok" and b["stages_s"]["controlnet"]["median"] > 0 for b in by.values())
    assert by["onnxruntime"]["parity"]["max_abs_diff"] < TOL, by["onnxruntime"]["parity"]  # see the module docstring


@pytest.mark.parametrize(
    "args,message",
    [
        (["--controlnet", "synthetic", "--fast"], "onnxruntime-fast cannot run a ControlNet job"),
        (["--controlnet", "synthetic", "--backends", "onnxruntime-fast"], "onnxruntime-fast cannot run"),
        (["--control-scale", "0.5"], "only apply with --controlnet"),
        (["--controlnet", "synthetic", "--control-scale", "-1"], "--control-scale must be a number >= 0"),
        (["--controlnet", "synthetic", "--control-image", "/no/such.png"], "no such file"),
        (["--controlnet", "synthetic", "--quality", "2"], "--quality does not combine with --controlnet"),
    ],
)
def test_bench_controlnet_bad_input_fails_before_heavy_work(tmp_path, args, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    t0 = time.perf_counter()
    result = invoke("synthetic:tiny", *args, "--out", str(out), "--cache-dir", str(cache))
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not out.exists() and not cache.exists()
    assert time.perf_counter() - t0 < 10


def test_bench_controlnet_artifact_must_hold_it(tiny_artifact, cn_artifact, tmp_path):
    out = tmp_path / "out"
    result = invoke(str(tiny_artifact()), "--controlnet", "synthetic", "--out", str(out))
    assert result.exit_code == 2 and "exported without a ControlNet" in " ".join(result.output.split())
    result = invoke(str(cn_artifact), "--controlnet", "canny", "--out", str(out))
    assert result.exit_code == 2 and "has no ControlNet 'canny' (it has: synthetic)" in " ".join(result.output.split())
    assert not out.exists()


def test_plain_job_on_a_controlnet_artifact(cn_artifact, tmp_path):
    """Without --controlnet the job on a ControlNet artifact is plain: no ControlNet stage, no control image."""
    out = tmp_path / "out"
    result = invoke(
        str(cn_artifact),
        "--backends",
        "onnxruntime",
        "--steps",
        "1",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["job"]["controlnet"] == [] and data["job"]["control_image"] is None
    assert (
        "controlnet" not in data["backends"][0]["stages_s"] and data["backends"][0]["stages_s"]["unet"]["median"] > 0
    )
    assert not (out / "control.png").exists()


def test_controlnets_matched_by_name_or_source(cn_artifact):
    m = load_manifest(cn_artifact)
    for spec in ("synthetic", "synthetic=anything", "x=synthetic"):
        if spec.startswith("x="):
            with pytest.raises(SdoptError, match="no ControlNet 'x=synthetic'"):
                artifact_controlnets([spec], m, "it")
        else:
            assert artifact_controlnets([spec], m, "it") == ["synthetic"]
    assert torch_sources(m, ["synthetic"]) == ["synthetic=synthetic:0"]


def test_cache_key_covers_controlnet_sources():
    plain = export_settings("synthetic:tiny", BenchConfig())
    assert "controlnets" not in plain["options"]  # exports without a ControlNet keep their cache keys
    one = export_settings("synthetic:tiny", make_config(model="synthetic:tiny", controlnet="synthetic"))
    two = export_settings("synthetic:tiny", make_config(model="synthetic:tiny", controlnet="synthetic,b=synthetic:1"))
    assert one["options"]["controlnets"] == ["synthetic"]
    assert len({cache_key(plain), cache_key(one), cache_key(two)}) == 3


def test_control_image_is_the_job_size(tmp_path):
    a = edge_map(64, 96, 0)
    assert a.shape == (64, 96, 3) and a.dtype == np.uint8 and 0 < (a > 0).mean() < 0.5
    assert np.array_equal(a, edge_map(64, 96, 0)) and not np.array_equal(a, edge_map(64, 96, 1))
    Image.fromarray(edge_map(40, 30, 3)).save(tmp_path / "given.png")
    config = make_config(model="synthetic:tiny", controlnet="synthetic", control_image=str(tmp_path / "given.png"))
    assert render_control_image(config, 64, 96).size == (96, 64)
    (tmp_path / "text.png").write_text("not an image")
    config.control_image = str(tmp_path / "text.png")
    with pytest.raises(SdoptError, match="is not a readable image"):
        render_control_image(config, 64, 96)
