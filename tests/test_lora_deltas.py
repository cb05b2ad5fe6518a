"""LoRA deltas one weight at a time (`DeltaPlan`), on one BLAS thread, merged into a memory-mapped base.

The swap's speed work (benchmarks/README.md, LoRA) must not change a bit: these check the
pieces against the plain formulas with exact equality, because both sides are the same numpy
float32 operations on the same inputs (no other library's result is involved).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdopt.lora.files import LoraSpec, compute_deltas, plan_deltas
from sdopt.lora.onnx_weights import TensorLocation
from sdopt.runtime.lora_swap import merged

# Wide enough that OpenBLAS splits the GEMM across threads (the sd15 feed-forward shape).
TARGETS = {"unet": {"mid_block.ff.net.0.proj": (1280, 5120), "mid_block.attn1.to_q": (320, 320)}}


def write_lora(path: Path, rank: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (rows, cols) in TARGETS["unet"].items():
        tensors[f"unet.{module}.lora_A.weight"] = rng.standard_normal((rank, cols), dtype=np.float32)
        tensors[f"unet.{module}.lora_B.weight"] = rng.standard_normal((rows, rank), dtype=np.float32)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": 8})}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_plan_gives_compute_deltas_bits_and_reuses_the_buffer(tmp_path):
    a, b = write_lora(tmp_path / "a.safetensors"), write_lora(tmp_path / "b.safetensors", 4, 1)
    specs = [LoraSpec(a, 0.7), LoraSpec(b, 0.3)]
    whole = compute_deltas(specs, TARGETS)["unet"]
    plan = plan_deltas(specs, TARGETS)
    buffer = np.empty(1280 * 5120, np.float32)
    for param in plan.params("unet"):
        got = plan.delta("unet", param, buffer)
        assert np.shares_memory(got, buffer) and got.shape == whole[param].shape
        assert np.array_equal(got.view(np.uint32), whole[param].view(np.uint32))
    # The value: sum of scale * (alpha / r) * B @ A (alpha 8 in the header; ranks 16 and 4). The
    # scale is folded into B before the product, so float32 rounding differs from this order (~1e-7).
    ta, tb = load_file(str(a)), load_file(str(b))
    key = "unet.mid_block.attn1.to_q.lora_{}.weight"
    want = 0.7 * 8 / 16 * (ta[key.format("B")] @ ta[key.format("A")])
    want += 0.3 * 8 / 4 * (tb[key.format("B")] @ tb[key.format("A")])
    np.testing.assert_allclose(whole["mid_block.attn1.to_q.weight"], want, rtol=1e-5, atol=1e-5)


def test_merged_into_a_memory_map_is_base_plus_delta(tmp_path):
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float16):
        base = rng.standard_normal((64, 48)).astype(dtype)
        (tmp_path / "w.bin").write_bytes(b"\0" * 16 + base.tobytes())
        loc = TensorLocation(tmp_path / "w.bin", 16, dtype, (64, 48))
        delta = rng.standard_normal((48, 64), dtype=np.float32).T  # a transposed MatMul delta: strided
        got = merged(loc.mapped(), delta)
        want = base.astype(np.float32) + delta
        if dtype == np.float16:
            want = np.clip(want, -65504.0, 65504.0)
        want = want.astype(dtype)
        assert got.dtype == dtype and got.flags.c_contiguous and got.flags.writeable
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


_HASH = """
import hashlib, sys
from pathlib import Path
import numpy as np
from sdopt.lora.files import LoraSpec, compute_deltas
sys.path.insert(0, {tests!r})
from test_lora_deltas import TARGETS
path = Path({path!r})
d = compute_deltas([LoraSpec(path, 0.5)], TARGETS)["unet"]
from safetensors.numpy import load_file
t = load_file(str(path))
plain = t["unet.mid_block.ff.net.0.proj.lora_B.weight"] @ t["unet.mid_block.ff.net.0.proj.lora_A.weight"]
digest = lambda data: hashlib.sha256(data).hexdigest()
print(digest(b"".join(d[k].tobytes() for k in sorted(d))), digest(plain.tobytes()))
"""


def test_deltas_do_not_depend_on_the_blas_thread_count(tmp_path):
    """OpenBLAS splits a GEMM across its threads and 1 and 2 threads round differently; the deltas
    are computed on one thread, so an export merge and a runtime swap agree on any core count."""
    path = write_lora(tmp_path / "a.safetensors")
    code = _HASH.format(tests=str(Path(__file__).parent), path=str(path))
    out = {}
    for threads in ("1", "2"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        out[threads] = run.stdout.split()
    assert out["1"][0] == out["2"][0]
    if out["1"][1] == out["2"][1]:
        pytest.skip("this BLAS gives a plain B @ A the same bits on 1 and 2 threads: the check above is void here")
