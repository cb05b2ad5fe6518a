"""`sdopt generate` in a real process: writes the runtime's image, and bad input is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdopt.runtime import Pipeline

pytestmark = pytest.mark.lean


def sdopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdopt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )


def test_generate_writes_the_runtime_image(tiny_artifact, tmp_path):
    root = tiny_artifact("tiny")
    r = sdopt(
        "generate",
        str(root),
        "a red cat",
        "--out",
        str(tmp_path / "cat.png"),
        "--steps",
        "3",
        "--seed",
        "7",
        "--height",
        "64",
        "--width",
        "96",
        "--scheduler",
        "euler-a",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "seed 7" in r.stdout and "cat.png" in r.stdout
    written = np.asarray(Image.open(tmp_path / "cat.png").convert("RGB"), dtype=np.int16)
    assert written.shape == (64, 96, 3)
    same = Pipeline.load(root)("a red cat", num_inference_steps=3, seed=7, height=64, width=96, scheduler="euler-a")
    # The runtime against itself in another process: the same float32 kernels, but a pixel that lands
    # on a rounding edge may flip by one 8-bit level.
    assert np.abs(written - np.asarray(same.images[0], dtype=np.int16)).max() <= 1


def test_generate_batch_writes_numbered_files(tiny_artifact, tmp_path):
    r = sdopt(
        "generate",
        str(tiny_artifact("tiny")),
        "a dog",
        "--out",
        str(tmp_path / "dog.png"),
        "--steps",
        "2",
        "--batch",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.glob("dog*.png")) == ["dog-0.png", "dog-1.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--height", "100"], "height 100 is not a positive multiple of 8"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--scheduler", "heun"], "unknown scheduler 'heun'"),
        (["--strength", "0.5", "--image", "/nonexistent.png"], "cannot read image"),
    ],
)
def test_generate_bad_input_is_one_clear_line(args, message, tiny_artifact, tmp_path):
    r = sdopt("generate", str(tiny_artifact("tiny")), "a cat", "--out", str(tmp_path / "x.png"), *args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "fix:" in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "x.png").exists()


def test_generate_on_a_folder_that_is_no_artifact(tmp_path):
    r = sdopt("generate", str(tmp_path), "a cat", cwd=tmp_path)
    assert r.returncode == 2 and "is not an sdopt artifact" in r.stderr and "fix:" in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
