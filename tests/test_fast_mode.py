"""Fast mode (DeepCache): exact where it must be, close where it approximates."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FAMILY_PRESETS

from sdopt.errors import SdoptError
from sdopt.runtime import Pipeline

pytestmark = pytest.mark.lean


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_deepcache_interval_one_is_exact_and_larger_intervals_stay_close(family, tiny_artifact):
    pipe = Pipeline.load(tiny_artifact(FAMILY_PRESETS[family]))
    args = dict(prompt="a photo of a cat", num_inference_steps=12, seed=3, height=64, width=64, output_type="np")
    exact = pipe(**args).images
    # Exact: the runtime against itself, and deepcache=1 must run the very same full passes.
    np.testing.assert_array_equal(pipe(**args, deepcache=1).images, exact)
    psnrs = []
    for n in (2, 4):
        fast = pipe(**args, deepcache=n).images
        assert not np.array_equal(fast, exact)  # the shallow graph really ran
        psnrs.append(_psnr(fast, exact))
    # Fidelity falls as more steps reuse the cached deep feature; both stay recognisably the
    # same image (measured 35-52 dB on the tiny random-weight models).
    assert psnrs[0] > psnrs[1] > 25, psnrs


def test_deepcache_with_interval_beyond_the_steps_only_runs_full_passes(tiny_artifact):
    """With N >= steps only step 0 is full: the result must differ from exact yet be
    deterministic (same seed, same image)."""
    pipe = Pipeline.load(tiny_artifact("tiny"))
    args = dict(prompt="a dog", num_inference_steps=3, seed=0, height=64, width=64, output_type="np", deepcache=10)
    np.testing.assert_array_equal(pipe(**args).images, pipe(**args).images)  # the runtime against itself


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_deepcache_bad_interval(bad, tiny_artifact):
    pipe = Pipeline.load(tiny_artifact("tiny"))
    with pytest.raises(SdoptError, match="deepcache"):
        pipe("x", num_inference_steps=2, height=64, width=64, deepcache=bad)
