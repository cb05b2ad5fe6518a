"""The benchmark harness's own logic: statistics, reports, configs, bad input, failure isolation,
and one real end-to-end `sdopt bench` on the tiny model. Never asserts timings."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from bench_cli import invoke

from sdopt.bench import report, stats
from sdopt.bench.config import BenchConfig, make_config, named_configs, validate
from sdopt.bench.plan import cache_key, ensure_artifact, export_settings, plan, unavailable_reason
from sdopt.bench.records import BackendRun, Job
from sdopt.bench.results import SCHEMA_VERSION, build_results
from sdopt.bench.runner import run_benchmark
from sdopt.errors import SdoptError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TENSORRT_HERE = unavailable_reason("tensorrt") is None


# -- statistics ----------------------------------------------------------------------------------
def test_median_p90_min_on_known_numbers():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    ten = [float(i) for i in range(1, 11)]
    assert stats.p90(ten) == pytest.approx(9.1)
    assert stats.p90(ten) == pytest.approx(float(np.percentile(ten, 90)))
    assert stats.percentile([5.0], 90) == 5.0
    s = stats.summarize([0.3, 0.1, 0.2])
    assert s == {"median": 0.2, "p90": pytest.approx(0.28), "min": 0.1, "max": 0.3, "mean": pytest.approx(0.2), "n": 3}
    assert stats.summarize([]) is None
    with pytest.raises(ValueError):
        stats.median([])


def test_speedup_and_throughput():
    assert stats.speedup(2.0, 0.5) == 4.0
    assert stats.speedup(1.0, 2.0) == 0.5
    assert stats.speedup(None, 1.0) is None and stats.speedup(1.0, 0.0) is None
    assert stats.images_per_second(4, 2.0) == 2.0
    assert stats.throughput_gflops(2e9, 0.5) == 4.0
    assert stats.throughput_gflops(None, 0.5) is None


def test_psnr_and_max_abs_diff():
    a = np.zeros((1, 4, 4, 3), np.float32)
    b = np.full_like(a, 0.1)
    assert stats.psnr(a, b) == pytest.approx(20.0)  # mse 0.01 on a peak of 1
    assert stats.max_abs_diff(a, b) == pytest.approx(0.1)
    assert stats.psnr(a, a) == math.inf
    c = a.copy()
    c[0, 0, 0, 0] = 0.5
    p = stats.parity(c, a)
    assert p["max_abs_diff"] == pytest.approx(0.5)
    assert p["psnr_db"] == pytest.approx(10 * math.log10(1 / (0.25 / a.size)))
    with pytest.raises(ValueError, match="shape"):
        stats.parity(a, a[:, :2])
    assert stats.finite_or_none({"x": [math.inf, 1.0, math.nan]}) == {"x": [None, 1.0, None]}


# -- configs -------------------------------------------------------------------------------------
def test_named_configs_load_and_validate():
    names = set(named_configs())
    assert {"tiny-cpu", "sd15-256-cpu", "sd15-512-gpu", "sdxl-1024-gpu"} <= names
    for name in names:
        make_config(name)  # validates
    tiny = make_config("tiny-cpu")
    got = (tiny.model, tiny.height, tiny.width, tiny.steps, tiny.runs, tiny.warmup)
    assert got == ("synthetic:tiny", 128, 128, 10, 3, 1)
    sd15 = make_config("sd15-256-cpu")
    assert sd15.backend_list() == ["torch", "torch-compile", "onnxruntime", "onnxruntime-fast"]
    assert make_config("tiny-cpu", fast=True, deepcache=4).backend_list()[-1] == "onnxruntime-fast"
    with pytest.raises(SdoptError, match="deepcache"):
        make_config("tiny-cpu", fast=True, deepcache=0)
    assert (sd15.height, sd15.steps, sd15.guidance, sd15.batch) == (256, 20, 7.5, 1)
    assert make_config("sd15-512-gpu").precision == "fp16"
    assert make_config("sdxl-1024-gpu").height == 1024


def test_flags_override_config_file():
    cfg = make_config("tiny-cpu", steps=2, runs=1, backends="onnxruntime", compile=None)
    assert (cfg.steps, cfg.runs, cfg.backends, cfg.height, cfg.name) == (2, 1, ["onnxruntime"], 128, "tiny-cpu")


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "synthetic:tiny", "stepz": 3}))
    with pytest.raises(SdoptError, match="unknown keys: stepz"):
        make_config(str(bad))
    with pytest.raises(SdoptError, match="no benchmark config 'nope'") as e:
        make_config("nope")
    assert "tiny-cpu" in e.value.fix


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("runs", 0, "--runs must be an integer >= 1"),
        ("warmup", -1, "--warmup"),
        ("steps", 0, "--steps"),
        ("batch", 0, "--batch"),
        ("height", 100, "not a positive multiple of 8"),
        ("width", -8, "not a positive multiple of 8"),
        ("backends", ["torch", "onnx"], "unknown backend 'onnx'"),
        ("backends", [], "no backends"),
        ("scheduler", "heun", "unknown scheduler"),
        ("precision", "int8", "unknown precision"),
    ],
)
def test_validate_rejects(field, value, message):
    with pytest.raises(SdoptError, match=message):
        validate(BenchConfig(**{field: value}))


# -- bad input through the CLI: clear error, exit 2, nothing heavy done --------------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (["--backends", "torch,onnx"], "unknown backend 'onnx'"),
        (["--runs", "0"], "--runs must be an integer >= 1"),
        (["--height", "100"], "--height 100 is not a positive multiple of 8"),
        (["--height", "512"], "--height 512 is outside synthetic:tiny's range 64..256"),  # checked before exporting
        (["--width", "72"], "not a positive multiple of 16"),
        (["--config", "no-such-config"], "no benchmark config"),
        (["--scheduler", "heun"], "unknown scheduler"),
    ],
)
def test_cli_bad_input_fails_before_heavy_work(tmp_path, args, message):
    out, cache = tmp_path / "out", tmp_path / "cache"
    t0 = time.perf_counter()
    result = invoke("synthetic:tiny", *args, "--out", str(out), "--cache-dir", str(cache))
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not out.exists() and not cache.exists()  # no export, no results
    assert time.perf_counter() - t0 < 10


def test_cli_size_outside_artifact_range(tiny_artifact, tmp_path):
    result = invoke(str(tiny_artifact()), "--height", "512", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "outside the artifact" in result.output and "64..256" in result.output
    result = invoke(str(tiny_artifact()), "--batch", "5", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "maximum batch 4" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(TENSORRT_HERE, reason="tensorrt and a GPU are present here")
def test_cli_tensorrt_alone_without_tensorrt_is_an_error(tmp_path):
    result = invoke(
        "synthetic:tiny",
        "--backends",
        "tensorrt",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.exit_code == 2
    assert "no requested backend can run here" in result.output and "tensorrt" in result.output
    assert not (tmp_path / "cache").exists()


def test_mixed_list_skips_unavailable_tensorrt():
    if TENSORRT_HERE:
        pytest.skip("tensorrt and a GPU are present here")
    p = plan(BenchConfig(model="synthetic:tiny", backends=["torch", "onnxruntime", "tensorrt"]))
    assert p.backends == ["torch", "onnxruntime"]
    assert "tensorrt" in p.skipped and ("not installed" in p.skipped["tensorrt"] or "GPU" in p.skipped["tensorrt"])


# -- export cache --------------------------------------------------------------------------------
def test_cache_key_covers_model_options_and_version(tmp_path, tiny_artifact):
    base = export_settings("synthetic:tiny", BenchConfig())
    # steps is not an export option: same key
    assert cache_key(base) == cache_key(export_settings("synthetic:tiny", BenchConfig(steps=3)))
    assert cache_key(base) != cache_key(export_settings("synthetic:tiny", BenchConfig(precision="fp16")))
    assert cache_key(base) != cache_key(export_settings("synthetic:tiny-sd2", BenchConfig()))
    assert cache_key(base) != cache_key({**base, "sdopt": "0.0.0"})
    # A present export is reused, not rebuilt.
    key = cache_key(base)
    shutil.copytree(tiny_artifact(), tmp_path / key)
    p = plan(BenchConfig(model="synthetic:tiny", backends=["onnxruntime"]), cache_dir=tmp_path)
    logs = []
    path, info = ensure_artifact(p, logs.append)
    assert path == tmp_path / key and info["cached"] is True
    assert "using cached export" in logs[0]


# -- reports -------------------------------------------------------------------------------------
def _fake_results() -> tuple[dict, dict]:
    def run(e2e, te, unet, vae, calls=3):
        return {
            "e2e_s": e2e,
            "stages_s": {"text_encoder": te, "unet": unet, "vae_decoder": vae},
            "unet_calls": calls,
            "unet_per_step_s": unet / calls,
            "other_s": e2e - te - unet - vae,
        }

    torch_run = BackendRun(
        "torch",
        "ok",
        info={"provider": "torch-cpu", "device": "cpu", "precision": "fp32", "import_s": 5.0, "load_s": 2.0},
        spawn_to_ready_s=8.0,
        first_image_s=2.5,
        runs=[run(2.0, 0.1, 1.5, 0.3), run(2.2, 0.1, 1.7, 0.3)],
        rss_peak_bytes=900 << 20,
        image_path="x",
        unet_flops_per_call=int(3e9),
    )
    ort_run = BackendRun(
        "onnxruntime",
        "ok",
        info={"provider": "cpu", "device": "cpu", "precision": "fp32", "import_s": 0.5, "load_s": 1.0},
        spawn_to_ready_s=1.6,
        first_image_s=1.1,
        runs=[run(1.0, 0.05, 0.75, 0.15), run(1.2, 0.05, 0.9, 0.2)],
        rss_peak_bytes=300 << 20,
        image_path="y",
    )
    failed = BackendRun("torch-compile")
    failed.fail("run 1/2", "RuntimeError: boom | with a pipe")
    skipped = BackendRun("tensorrt", "skipped", error="tensorrt not installed")
    runs = {r.name: r for r in (torch_run, failed, ort_run, skipped)}
    ref = np.random.default_rng(0).random((1, 8, 8, 3)).astype(np.float32)
    images = {"torch": ref, "onnxruntime": ref + 1e-3}
    job = Job(
        prompt="p",
        negative_prompt=None,
        steps=2,
        guidance=7.5,
        height=128,
        width=128,
        batch=1,
        seed=0,
        scheduler="pndm",
        threads=2,
        latent_shape=[1, 4, 16, 16],
    )
    manifest = SimpleNamespace(
        family="sd1",
        source={"kind": "synthetic", "id": "synthetic:tiny", "seed": "0"},
        precision="fp32",
        opset=18,
        created="now",
    )
    machine = {
        "cpu": {"model": "Test CPU", "physical_cores": 2, "logical_cores": 2, "arch": "x86_64"},
        "threads": 2,
        "ram_bytes": 1 << 34,
        "gpus": [],
        "os": "Linux",
        "hostname": "h",
        "python": "3.11",
        "versions": {"sdopt": "0.1.0"},
        "matmul_peak": {"cpu_fp32_gflops": 100.0},
    }
    results = build_results(
        BenchConfig(model="synthetic:tiny", runs=2, warmup=0, name="unit"),
        job,
        manifest,
        {"path": "/a", "given": True},
        machine,
        runs,
        images,
        command="sdopt bench --config unit",
    )
    return results, images


def test_results_dict_statistics_and_speedups():
    results, _ = _fake_results()
    by = {b["name"]: b for b in results["backends"]}
    assert [b["name"] for b in results["backends"]] == ["torch", "torch-compile", "onnxruntime", "tensorrt"]
    assert by["torch"]["e2e_s"]["median"] == pytest.approx(2.1)
    assert by["onnxruntime"]["e2e_s"]["median"] == pytest.approx(1.1)
    assert by["onnxruntime"]["speedup_vs_torch"]["e2e"] == pytest.approx(2.1 / 1.1)
    assert by["onnxruntime"]["stages_s"]["unet_per_step"]["median"] == pytest.approx(0.275)
    assert by["onnxruntime"]["speedup_vs_torch"]["unet_per_step"] == pytest.approx(0.5333333 / 0.275)
    assert by["onnxruntime"]["images_per_s"] == pytest.approx(1 / 1.1)
    assert by["onnxruntime"]["parity"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert by["onnxruntime"]["parity"]["psnr_db"] == pytest.approx(60.0, abs=0.1)
    assert by["torch"]["parity"]["reference"] is True and by["torch"]["parity"]["psnr_db"] is None
    assert by["onnxruntime"]["cold_start"]["total_s"] == pytest.approx(2.7)
    assert by["onnxruntime"]["unet_throughput"]["gflops_per_s"] == pytest.approx(3e9 / 0.275 / 1e9)
    assert by["onnxruntime"]["unet_throughput"]["fraction_of_matmul_peak"] == pytest.approx(3e9 / 0.275 / 1e9 / 100)
    assert by["torch-compile"]["status"] == "failed" and by["torch-compile"]["e2e_s"] is None
    assert by["tensorrt"]["status"] == "skipped" and by["tensorrt"]["speedup_vs_torch"] is None
    assert results["unet"]["flops_per_call"] == int(3e9) and results["unet"]["batch"] == 2


def test_report_files(tmp_path):
    results, images = _fake_results()
    report.write_all(results, tmp_path, images)
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN/Infinity
    assert data["schema_version"] == SCHEMA_VERSION
    for key in ("kind", "created", "command", "config", "job", "artifact", "machine", "reference", "unet", "backends"):
        assert key in data
    for key in ("cpu", "threads", "ram_bytes", "gpus", "os", "python", "versions", "matmul_peak"):
        assert key in data["machine"]
    for b in data["backends"]:
        for key in (
            "name",
            "status",
            "error",
            "e2e_s",
            "stages_s",
            "images_per_s",
            "speedup_vs_torch",
            "cold_start",
            "memory",
            "parity",
            "runs",
        ):
            assert key in b
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4  # header + one row per backend
    assert any(r.startswith("| onnxruntime (cpu) | ok | 1.100 |") for r in rows)
    assert any("skipped: tensorrt not installed" in r for r in rows)
    assert any("failed at run 1/2: RuntimeError: boom \\| with a pipe" in r for r in rows)
    assert (tmp_path / "stages.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "images" / "onnxruntime.png").read_bytes()[:8] == PNG_MAGIC


def test_terminal_table_lists_failures_and_skips():
    from rich.console import Console

    results, _ = _fake_results()
    console = Console(width=200, record=True)
    report.print_table(results, console)
    text = console.export_text()
    assert "onnxruntime (cpu)" in text and "1.91x" in text
    assert "tensorrt skipped: tensorrt not installed" in text
    assert "torch-compile failed at run 1/2: RuntimeError: boom" in text


# -- failure isolation (real workers; cheap: no torch worker loads) ------------------------------
def test_failed_and_skipped_backends_do_not_stop_the_others(tiny_artifact, tmp_path):
    cfg = make_config(model=str(tiny_artifact()), backends="torch,onnxruntime,tensorrt", runs=2, warmup=0, steps=2)
    results = run_benchmark(cfg, out_dir=tmp_path, faults={"torch": {"fault": "load"}})
    by = {b["name"]: b for b in results["backends"]}
    assert by["torch"]["status"] == "failed" and by["torch"]["failed_at"] == "load"
    assert "injected fault at load" in by["torch"]["error"]
    assert by["onnxruntime"]["status"] == "ok" and by["onnxruntime"]["e2e_s"]["n"] == 2
    assert by["onnxruntime"]["parity"] is None and by["onnxruntime"]["speedup_vs_torch"] is None  # no reference
    if not TENSORRT_HERE:
        assert by["tensorrt"]["status"] == "skipped" and by["tensorrt"]["error"]
    md = (tmp_path / "results.md").read_text()
    assert "failed at load" in md and "| onnxruntime (cpu) | ok |" in md


def test_worker_crash_mid_run_is_a_failed_row(tiny_artifact, tmp_path):
    cfg = make_config(model=str(tiny_artifact()), backends="onnxruntime", runs=3, warmup=0, steps=2)
    results = run_benchmark(cfg, out_dir=tmp_path, faults={"onnxruntime": {"fault": "crash", "fault_after": 1}})
    (ort,) = results["backends"]
    assert ort["status"] == "failed" and ort["failed_at"] == "run 2/3"
    assert "exited with code 3" in ort["error"]
    assert len(ort["runs"]) == 1  # the run before the crash is kept in the raw data
    assert json.loads((tmp_path / "results.json").read_text())["backends"][0]["status"] == "failed"


def test_tensorrt_worker_builds_engines_only_when_they_are_missing():
    from sdopt.bench.worker_runtime import _needs_engines
    from sdopt.errors import EnginesMissingError

    assert _needs_engines(EnginesMissingError("/a has no TensorRT engine for unet", "build them: sdopt build /a"))
    assert not _needs_engines(SdoptError("/a has no TensorRT engine for unet", "text alone decides nothing"))
    assert not _needs_engines(SdoptError("tensorrt is not installed", "pip install ..."))


def test_importing_the_harness_does_not_import_torch():
    code = (
        "import sys, sdopt.bench, sdopt.bench.command, sdopt.bench.runner, sdopt.bench.report, "
        "sdopt.bench.workers, sdopt.bench.worker_torch, sdopt.bench.worker_runtime, sdopt.bench.quality, "
        "sdopt.bench.quality_run, sdopt.bench.quality_report, sdopt.bench.protocol, sdopt.bench.server_scenario, "
        "sdopt.bench.quality_eval, sdopt.cli.eval; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- end to end: the real thing on the tiny model ------------------------------------------------
def test_bench_end_to_end_on_tiny_artifact(tiny_artifact, tmp_path):
    out = tmp_path / "results"
    result = invoke(
        str(tiny_artifact()),
        "--backends",
        "torch,onnxruntime,tensorrt",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--prompt",
        "a red cube",
        "--negative-prompt",
        "blurry",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "sdopt bench" in result.output and "onnxruntime (cpu)" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["job"]["steps"] == 2 and data["job"]["negative_prompt"] == "blurry"
    assert data["command"].startswith("sdopt bench ") and "--steps 2" in data["command"]
    by = {b["name"]: b for b in data["backends"]}
    assert by["torch"]["status"] == "ok" and by["onnxruntime"]["status"] == "ok", data["backends"]
    if not TENSORRT_HERE:
        assert by["tensorrt"]["status"] == "skipped" and "skipped" in result.output
    ort = by["onnxruntime"]
    # Parity: same latents, same scheduler -> the runtime matches diffusers to ~1e-6 on the tiny model.
    assert ort["parity"]["max_abs_diff"] < 1e-4
    assert ort["parity"]["psnr_db"] is None or ort["parity"]["psnr_db"] > 80
    for b in (by["torch"], ort):
        assert b["e2e_s"]["n"] == 1 and b["e2e_s"]["median"] > 0
        assert set(b["stages_s"]) == {"text_encoder", "unet", "unet_per_step", "vae_decoder", "other"}
        assert b["runs"][0]["unet_calls"] >= 2
        assert b["memory"]["peak_rss_bytes"] > 0
        assert b["cold_start"]["total_s"] > 0 and b["speedup_vs_torch"]["e2e"] > 0
    # Per-backend memory: each worker reports its own peak (the tiny ORT runtime is far below torch+diffusers).
    assert ort["memory"]["peak_rss_bytes"] < by["torch"]["memory"]["peak_rss_bytes"]
    assert data["unet"]["flops_per_call"] > 0
    assert data["machine"]["matmul_peak"].get("cpu_fp32_gflops", 0) > 0
    assert (out / "stages.png").read_bytes()[:8] == PNG_MAGIC
    assert "| torch (cpu) | ok |" in (out / "results.md").read_text()
