"""Interop with Hugging Face Optimum, both ways, with the real Optimum in its own venv.

Optimum (optimum-onnx) pins transformers 4.x; sdopt's venv has transformers 5, so Optimum runs in
`.venv-optimum` (scripts/setup_optimum.sh, which .ci/run calls) through tests/optimum_worker.py,
one subprocess for all of this module's Optimum work. Without that venv the module is skipped
locally and fails in CI (CI=true), where it must run.

1. Optimum reads sdopt's artifacts: ORTStableDiffusionPipeline (tiny, SD 1.x) and
   ORTStableDiffusionXLPipeline (tiny-sdxl) load the folders `sdopt export` wrote and generate
   from given latents; each image must match sdopt's own image from the same latents.
2. sdopt reads Optimum's exports: a tiny diffusers folder exported by Optimum's ONNX exporter
   (no sdopt.json) is generated from by `Pipeline.load` / `sdopt generate` / `sdopt bench`, shown
   by `sdopt inspect`, and must match diffusers in PyTorch from the same latents.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import FAMILY_PRESETS

from sdopt.manifest import load_manifest

REPO = Path(__file__).resolve().parent.parent
OPTIMUM_PY = Path(os.environ.get("SDOPT_OPTIMUM_VENV", REPO / ".venv-optimum")) / "bin" / "python"
PRESETS = {family: FAMILY_PRESETS[family] for family in ("sd1", "sdxl")}  # Optimum has no SD 2.x specifics
PROMPT = "a photo of an astronaut riding a horse on mars"
STEPS, GUIDANCE, SIZE = 4, 7.5, 128
# Both sides run the same fp32 ONNX graphs (or the same fp32 weights) from the same latents; what
# differs is float32 rounding: torch vs numpy scheduler arithmetic, ONNX Runtime's optimised vs
# plain graphs (fused kernels sum in another order), torch vs ORT kernels. That is ~1e-6 on these
# tiny models (measured 1e-6 .. 3e-6); 1e-4 of the [0, 1] pixel range is far below one 8-bit step
# (3.9e-3) yet ~30x that float32 noise, and any real mismatch (a wrong output taken by position,
# another scheduler, missing weights) is > 1e-2.
TOL = 1e-4


def _latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _diffusers_folder(pipe, out: Path) -> Path:
    """save_pretrained, readable by transformers 4.x too (the Optimum venv): tokenizer folders with
    vocab.json/merges.txt, and CLIP text weights under 4.x's `text_model.` key prefix (5.x saves
    CLIPTextModel without it and reads both)."""
    from safetensors.numpy import load_file, save_file

    from sdopt.export.tokenizer_files import save_tokenizer

    pipe.save_pretrained(out)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            save_tokenizer(getattr(pipe, name), out / name)
    for weights in out.glob("text_encoder*/model.safetensors"):
        state = load_file(weights)
        legacy = {
            k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()
        }
        save_file(legacy, weights, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def optimum(tiny_artifact, reference_pipeline, tmp_path_factory) -> dict[str, Path]:
    """Runs every Optimum job once; returns the paths of its results."""
    if not OPTIMUM_PY.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{OPTIMUM_PY} is missing: .ci/run must run scripts/setup_optimum.sh")
        pytest.skip("no Optimum venv: run `bash scripts/setup_optimum.sh` (creates .venv-optimum, ~2 min)")
    work = tmp_path_factory.mktemp("optimum")
    jobs: dict[str, list] = {"export": [], "generate": []}
    paths: dict[str, Path] = {}
    for family, preset in PRESETS.items():
        np.save(work / f"latents-{family}.npy", _latents(len(paths)))
        paths[f"diffusers-{family}"] = _diffusers_folder(reference_pipeline(preset), work / f"diffusers-{family}")
        paths[f"export-{family}"] = work / f"optimum-export-{family}"
        paths[f"images-{family}"] = work / f"optimum-images-{family}.npz"
        jobs["export"].append({"model": str(paths[f"diffusers-{family}"]), "out": str(paths[f"export-{family}"])})
        jobs["generate"].append(
            {
                "artifact": str(tiny_artifact(preset)),
                "latents": str(work / f"latents-{family}.npy"),
                "out": str(paths[f"images-{family}"]),
                "prompt": PROMPT,
                "steps": STEPS,
                "guidance": GUIDANCE,
            }
        )
        paths[f"latents-{family}"] = work / f"latents-{family}.npy"
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [str(OPTIMUM_PY), str(REPO / "tests" / "optimum_worker.py"), str(work / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return paths


def _sdopt_images(root: Path, latents: np.ndarray) -> np.ndarray:
    from sdopt.runtime import Pipeline

    pipe = Pipeline.load(root)
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        latents=latents,
        output_type="np",
    ).images


def _check(record_metric, case: str, ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, (case, ours.shape, ref.shape)
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    record_metric("optimum interop: max abs pixel diff", case, err)
    assert err <= TOL, f"{case}: max abs pixel diff {err:.3e} > {TOL:.0e}"


# -- 1. Optimum reads sdopt's artifacts --------------------------------------------------------
@pytest.mark.parametrize("family", list(PRESETS))
def test_optimum_generates_from_sdopt_artifact_like_sdopt(family, optimum, tiny_artifact, record_metric):
    got = np.load(optimum[f"images-{family}"])
    assert str(got["pipeline"]) == (
        "ORTStableDiffusionXLPipeline" if family == "sdxl" else "ORTStableDiffusionPipeline"
    )
    ours = _sdopt_images(tiny_artifact(PRESETS[family]), np.load(optimum[f"latents-{family}"]))
    _check(record_metric, f"{family}: Optimum on the sdopt artifact vs sdopt", got["images"], ours)


def test_unet_has_optimums_interface_and_fast_mode_shares_its_weights(tiny_artifact):
    import onnx

    root = tiny_artifact("tiny-sdxl")
    m = load_manifest(root)
    plain = onnx.load(str(root / "unet" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in plain.input] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [o.name for o in plain.output] == ["out_sample"]
    deep = onnx.load(str(root / m.components["unet_deep"].path), load_external_data=False).graph
    assert [o.name for o in deep.output] == ["out_sample", "deep_feature"]
    # One weights file, referenced by both graphs at the same offsets: no second copy on disk.
    where = lambda g: {t.name: tuple((e.key, e.value) for e in t.external_data) for t in g.initializer}  # noqa: E731
    external = [dict(v) for v in where(plain).values() if v]  # (tensors under 1 KB stay inline)
    assert where(plain) == where(deep) and external and {e["location"] for e in external} == {"model.onnx.data"}
    # (ONNX Runtime's saved optimised CPU graph of the deep graph holds re-laid-out weights of its own.)
    assert sorted(p.name for p in (root / "unet").glob("*.data")) == [
        "model.onnx.data",
        "model_deep.ort-cpu.onnx.data",
    ]
    # ... and one in memory: the runtime loads the deep graph only.
    assert m.runtime_components().count("unet") == 0 and "unet_deep" in m.runtime_components()


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_tokenizer_folders_carry_transformers_4_and_5_files(preset, tiny_artifact):
    root = tiny_artifact(preset)
    for name in load_manifest(root).tokenizers:
        files = {p.name for p in (root / name).iterdir()}
        assert {
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
        } <= files


# -- 2. sdopt reads Optimum's exports ----------------------------------------------------------
@pytest.mark.parametrize("family", list(PRESETS))
def test_sdopt_generates_from_optimum_export_like_diffusers(family, optimum, reference_pipeline, record_metric):
    import torch

    latents = np.load(optimum[f"latents-{family}"])
    ours = _sdopt_images(optimum[f"export-{family}"], latents)
    ref = reference_pipeline(PRESETS[family])(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SIZE,
        width=SIZE,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    _check(record_metric, f"{family}: sdopt on the Optimum export vs diffusers", ours, ref)


def test_optimum_export_manifest_shows_sdopt_only_figures_as_absent(optimum):
    root = optimum["export-sdxl"]
    assert not (root / "sdopt.json").exists()
    m = load_manifest(root)
    assert m.family == "sdxl" and m.source["kind"] == "optimum" and m.exporter == "optimum"
    assert sorted(m.components) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    for c in m.components.values():
        assert c.verification is None and c.files == {} and c.dims == {}, c.name
    assert m.image.min_size is None and m.image.max_size is None and m.image.max_batch is None
    assert m.components["text_encoder_2"].aliases == {
        "pooled": "text_embeds",
        "penultimate_hidden_state": "hidden_states.2",
    }
    assert m.components["unet"].input("timestep").shape == []  # Optimum's scalar timestep


def test_scalar_timestep_unet_takes_a_batch_at_mixed_steps(optimum):
    """Optimum's U-Net takes one timestep per call; the runtime feeds one per batch item (requests
    at different steps share a call): the adapter runs one call per distinct timestep."""
    from sdopt.runtime import Pipeline

    pipe = Pipeline.load(optimum["export-sd1"])
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((4, 4, 16, 16), dtype=np.float32),
        "timestep": np.array([999, 501, 999, 1], np.float32),
        "encoder_hidden_states": rng.standard_normal((4, 77, 32), dtype=np.float32),
    }
    whole, _ = pipe.unet("unet", feeds)
    for i in range(4):
        alone, _ = pipe.unet("unet", {k: v[i : i + 1] for k, v in feeds.items()})
        # Same graph and inputs; only the batch size differs, which can change ONNX Runtime's
        # kernel blocking and so float32 summation order: ~1e-6 on values of magnitude ~1.
        np.testing.assert_allclose(whole[i : i + 1], alone, atol=1e-5)


def test_cli_inspect_generate_and_bench_accept_an_optimum_export(optimum, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from sdopt.cli import app

    root = str(optimum["export-sd1"])
    shown = CliRunner().invoke(app, ["inspect", root, "--verify"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "optimum" in shown.output and "not recorded" in shown.output and "—" in shown.output
    made = CliRunner().invoke(
        app, ["generate", root, PROMPT, "--steps", "2", "--seed", "1", "--out", str(tmp_path / "o.png")]
    )
    assert made.exit_code == 0, made.output
    assert Image.open(tmp_path / "o.png").size == (SIZE, SIZE)
    out = tmp_path / "bench"
    ran = CliRunner().invoke(
        app,
        [
            "bench",
            root,
            "--backends",
            "torch,onnxruntime",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert ran.exit_code == 0, ran.output
    by = {b["name"]: b for b in json.loads((out / "results.json").read_text())["backends"]}
    assert by["onnxruntime"]["status"] == "ok" and by["torch"]["status"] == "skipped", by
