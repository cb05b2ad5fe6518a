"""The staged pipeline: the request object, the denoising generator and step-level stacking."""

from __future__ import annotations

import numpy as np
import pytest

from sdopt.errors import SdoptError
from sdopt.runtime import Pipeline
from sdopt.runtime.request import Img2Img, Inpaint, Txt2Img


@pytest.fixture(scope="module")
def pipe(tiny_artifact) -> Pipeline:
    return Pipeline.load(tiny_artifact("tiny"))


def test_request_types_the_mode(pipe):
    image = np.full((64, 64, 3), 0.5, np.float32)
    assert isinstance(pipe.make_request("a").mode, Txt2Img)
    img2img = pipe.make_request("a", image=image)
    assert isinstance(img2img.mode, Img2Img) and img2img.mode.strength == 0.8  # diffusers' default
    assert img2img.mode.pixels.shape == (1, 3, 64, 64)
    inpaint = pipe.make_request("a", image=image, mask_image=np.ones((64, 64), np.float32))
    assert isinstance(inpaint.mode, Inpaint) and inpaint.mode.strength == 1.0
    assert pipe.make_request(["a", "b"], num_images_per_prompt=2, guidance_scale=1.0).batch == 4
    assert not pipe.make_request("a", guidance_scale=1.0).do_cfg


def test_request_names_the_problem_and_the_fix(pipe):
    with pytest.raises(SdoptError, match="height 100 is not a positive multiple of 8") as e:
        pipe.make_request("a", height=100)
    assert e.value.fix == "use e.g. 96"


def test_generator_yields_every_step_and_matches_the_call(pipe):
    kwargs = dict(num_inference_steps=4, seed=3, output_type="np", scheduler="ddim")
    states = [(s.step, s.total) for s in pipe.generate_latents(pipe.make_request("a cat", **kwargs))]
    assert states == [(1, 4), (2, 4), (3, 4), (4, 4)]
    request = pipe.make_request("a cat", **kwargs)
    *_, state = pipe.generate_latents(request)
    # Same request, same engine calls in the same order: the same bytes.
    np.testing.assert_array_equal(pipe.decode(state.latents), pipe("a cat", **kwargs).images)


def test_two_requests_stacked_into_one_unet_call_match_separate_runs(pipe):
    """What step-level batching does: requests at different steps share one U-Net call."""
    a = pipe.prepare(pipe.make_request("a cat", num_inference_steps=3, seed=1, scheduler="euler-a"))
    b = pipe.prepare(pipe.make_request(["a dog", "a fox"], num_inference_steps=5, seed=2, guidance_scale=5.0))
    solo = pipe.prepare(pipe.make_request("a cat", num_inference_steps=3, seed=1, scheduler="euler-a"))
    while not solo.done:
        solo.advance(*pipe.unet(*solo.unet_inputs()))
    component, feeds_b = b.unet_inputs()
    b.advance(*pipe.unet(component, feeds_b))  # b is one step ahead of a from here on
    while not a.done:
        (ca, fa), (cb, fb) = a.unet_inputs(), b.unet_inputs()
        assert ca == cb == "unet"
        stacked = {k: np.concatenate([fa[k], fb[k]]) for k in fa}
        pred, deep = pipe.unet("unet", stacked)
        n = fa["sample"].shape[0]
        a.advance(pred[:n], deep[:n] if deep is not None else None)
        b.advance(pred[n:], deep[n:] if deep is not None else None)
    assert (a.step, b.step) == (3, 4)
    # ONNX Runtime's float32 kernels may block a batch of 6 differently from a batch of 2, so the
    # sums can round differently in the last bits; 1e-4 on latents of magnitude ~1 leaves room
    # for that and fails on any mix-up of requests, timesteps or RNG streams (differences ~1).
    np.testing.assert_allclose(a.latents, solo.latents, atol=1e-4, rtol=0)
