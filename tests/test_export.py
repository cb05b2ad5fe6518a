"""Export spine: every family's tiny preset exports, verifies and describes itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import FAMILY_PRESETS

from sdopt.errors import SdoptError
from sdopt.export.artifact import ExportOptions, export_artifact
from sdopt.manifest import MANIFEST_VERSION, load_manifest, sha256_file, verify_files

EXPECTED = {
    "sd1": ["text_encoder", "unet", "unet_deep", "unet_shallow", "vae_decoder", "vae_encoder"],
    "sd2": ["text_encoder", "unet", "unet_deep", "unet_shallow", "vae_decoder", "vae_encoder"],
    "sdxl": ["text_encoder", "text_encoder_2", "unet", "unet_deep", "unet_shallow", "vae_decoder", "vae_encoder"],
}


@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_each_family_exports_verified(family, tiny_artifact):
    root = tiny_artifact(FAMILY_PRESETS[family])
    m = load_manifest(root)
    assert m.version == MANIFEST_VERSION and m.family == family
    assert sorted(m.components) == sorted(EXPECTED[family])
    assert m.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    for c in m.components.values():
        v = c.verification
        assert v.passed and v.max_rel_err <= v.tolerance == 1e-3, (c.name, v)
        # fp32 ONNX Runtime vs fp32 PyTorch on the same inputs: kernel rounding only (observed <= 7e-6).
        assert v.max_abs_err < 1e-4, (c.name, v.max_abs_err)
        assert (root / c.path).is_file()
    verify_files(root, m)  # every recorded hash matches
    for folder in ["scheduler", *m.tokenizers]:
        assert (root / folder).is_dir()
    index = json.loads((root / "model_index.json").read_text())
    assert set(EXPECTED[family]) - {"unet_deep"} <= set(index)  # unet_deep: a second graph in unet/
    assert m.vae.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert m.versions["torch"] and m.versions["onnx"]


def test_unet_graph_io_and_dynamic_axes(tiny_artifact):
    root = tiny_artifact("tiny-sdxl")
    m = load_manifest(root)
    unet = m.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.dims["batch"].max == 2 * m.image.max_batch  # classifier-free guidance doubles the batch
    graph = onnx.load(str(root / unet.path), load_external_data=False).graph
    sample = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in sample] == ["batch", 4, "latent_height", "latent_width"]
    # The scaling factor is recorded, not baked: the decoder graph has no Mul by 1/0.13025 at its input.
    dec = onnx.load(str(root / m.components["vae_decoder"].path)).graph
    assert dec.node[0].input[0] == "latent_sample" and dec.node[0].op_type == "Conv"


@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_shallow_unet_reproduces_the_full_unet_from_its_deep_feature(family, tiny_artifact):
    """DeepCache's cheap graph, fed the deep feature of the same inputs, equals the full U-Net."""
    import onnxruntime as ort

    from sdopt.export.components import ComponentPlan

    root = tiny_artifact(FAMILY_PRESETS[family])
    m = load_manifest(root)
    unet, shallow = m.components["unet_deep"], m.components["unet_shallow"]
    plan = ComponentPlan("unet_deep", None, unet.inputs, unet.outputs, unet.dims, vocab_size=1)
    feed = plan.example_inputs({"batch": 2, "latent_height": 16, "latent_width": 16}, seed=3)
    out, deep = ort.InferenceSession(str(root / unet.path)).run(["out_sample", "deep_feature"], feed)
    feed["deep_feature"] = deep
    again = ort.InferenceSession(str(root / shallow.path)).run(None, {t.name: feed[t.name] for t in shallow.inputs})[0]
    # Two ONNX Runtime graphs over the same weights; their fusions may differ: float32 rounding only.
    np.testing.assert_allclose(again, out, atol=1e-5)


def test_fp16_export_keeps_fp32_islands(tiny_artifact):
    root = tiny_artifact("tiny", "fp16")
    m = load_manifest(root)
    assert m.precision == "fp16"
    assert m.components["unet"].precision == "fp16" and m.components["unet"].input("sample").dtype == "float16"
    assert m.components["vae_decoder"].precision == "fp32"  # the VAE overflows in fp16
    assert "LayerNormalization" in m.components["text_encoder"].fp32_ops
    for c in m.components.values():
        assert c.verification.passed, (c.name, c.verification)


def test_failed_verification_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(SdoptError, match="verification failed"):
        export_artifact("synthetic:tiny", out, ExportOptions(components=["text_encoder"], tolerance=1e-12))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written folder left behind either
    kept = export_artifact(
        "synthetic:tiny", out, ExportOptions(components=["text_encoder"], tolerance=1e-12, allow_verify_failure=True)
    )
    assert not kept.manifest.components["text_encoder"].verification.passed


def test_interrupted_export_leaves_nothing_and_force_replaces(tmp_path):
    out = tmp_path / "art"

    def interrupt(component, stage, detail):
        if component == "unet" and stage == "verify":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_artifact("synthetic:tiny", out, ExportOptions(components=["text_encoder", "unet"]), interrupt)
    assert list(tmp_path.iterdir()) == []
    export_artifact("synthetic:tiny", out, ExportOptions(components=["text_encoder"]))
    with pytest.raises(SdoptError, match="already exists"):
        export_artifact("synthetic:tiny", out, ExportOptions(components=["vae_decoder"]))
    export_artifact("synthetic:tiny", out, ExportOptions(components=["vae_decoder"], force=True))
    assert sorted(load_manifest(out).components) == ["vae_decoder"]
    assert not (out / "text_encoder").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_dynamo_exporter_matches_pytorch(tmp_path):
    res = export_artifact("synthetic:tiny", tmp_path / "d", ExportOptions(components=["unet"], exporter="dynamo"))
    v = res.manifest.components["unet"].verification
    assert v.passed and v.max_abs_err < 1e-4  # fp32 ONNX Runtime vs fp32 PyTorch: rounding only


def test_local_diffusers_folder_and_corrupt_weights(tmp_path, reference_pipeline):
    folder = tmp_path / "model"
    reference_pipeline("tiny").save_pretrained(folder)
    res = export_artifact(str(folder), tmp_path / "a", ExportOptions(components=["text_encoder", "vae_decoder"]))
    assert res.manifest.source["kind"] == "folder" and res.manifest.family == "sd1"
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SdoptError, match="could not load model"):
        export_artifact(str(folder), tmp_path / "b", ExportOptions(components=["text_encoder"]))
    assert not (tmp_path / "b").exists()


def test_tampered_artifact_is_refused(tiny_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact("tiny"), copy)
    path = copy / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SdoptError, match="does not match the hash"):
        verify_files(copy, load_manifest(copy))
    assert sha256_file(path) != load_manifest(copy).components["unet"].files["unet/model.onnx"]


def _sdopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdopt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["synthetic:nope"], "unknown synthetic preset"),
        (["/does/not/exist"], "does not exist"),
        (["EMPTY"], "no model_index.json"),
        (["--min-size", "100"], "not a positive multiple of 8"),
        (["--min-size", "512", "--max-size", "256"], "larger than --max-size"),
        (["--min-size", "72"], "not a positive multiple of 16"),
        (["--precision", "int4"], "unknown precision"),
        (["--components", "unet,foo"], "unknown component"),
        (["--out", "EXISTS"], "already exists"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, message, tmp_path):
    from typer.testing import CliRunner

    from sdopt.cli import app

    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EXISTS").mkdir()
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    args = [str(tmp_path / a) if a in ("EMPTY", "EXISTS") else a for a in args]
    r = CliRunner().invoke(app, ["export", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "fix:" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback, just the line
    assert not (tmp_path / "out").exists()


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    r = _sdopt("export", "synthetic:nope", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "unknown synthetic preset" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_export_and_inspect(tmp_path, tiny_artifact):
    r = _sdopt("inspect", str(tiny_artifact("tiny-sdxl")), "--verify", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("sdxl", "text_encoder_2", "time_ids", "all file hashes match"):
        assert word in r.stdout
    r = _sdopt("export", "--out", str(tmp_path / "cli"), "--components", "text_encoder", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "text_encoder" in r.stdout and "ok" in r.stdout
    assert np.isfinite(load_manifest(tmp_path / "cli").components["text_encoder"].verification.max_abs_err)


def test_cli_tables_fit_80_columns(tmp_path, tiny_artifact):
    """`sdopt inspect` (and export's summary, the same table) on an 80-column terminal: no cut names."""
    r = subprocess.run(
        [sys.executable, "-m", "sdopt", "inspect", str(tiny_artifact("tiny-sdxl"))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "80"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert max(map(len, r.stdout.splitlines())) <= 80
    summary = r.stdout[r.stdout.index("verified") :]
    for name in load_manifest(tiny_artifact("tiny-sdxl")).components:
        assert f" {name} " in summary, f"{name} cut in:\n{summary}"
    assert "…" not in summary, summary


def _resize_with_constant_scales() -> onnx.ModelProto:
    """An upsampler as the unfolded sd15 U-Net graph has it: Resize whose scales come from a Constant node."""
    from onnx import TensorProto, helper

    scales = helper.make_node(
        "Constant", [], ["scales"], value=helper.make_tensor("v", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    )
    resize = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
    graph = helper.make_graph(
        [scales, resize],
        "up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_of_an_unfolded_graph_keeps_resize_scales_float():
    """Graphs over 2 GB are not folded before fp16 conversion: a Constant feeding Resize's scales must stay
    float32, else ONNX Runtime rejects the graph (it broke `--precision fp16` of the full-size sd15 U-Net)."""
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from sdopt.export.onnx_graph import to_fp16

    plain = convert_float_to_float16(_resize_with_constant_scales(), keep_io_types=False, disable_shape_infer=True)
    with pytest.raises(Exception, match="float16"):  # what happened before the fix
        ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    model = to_fp16(_resize_with_constant_scales(), [], shape_inference=False)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float16).reshape(1, 1, 2, 2)
    (y,) = session.run(None, {"x": x})
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))  # nearest: copies, exact in fp16
