"""The numpy schedulers (sdopt.runtime.schedulers) against diffusers, step by step.

Both sides get the same config, the same initial latents and the same per-step noise; each side's
"U-Net" output is the same deterministic function of its own current (scaled) sample, so any
divergence in the schedule or the update shows up and accumulates along the trajectory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdopt.runtime.schedulers import SCHEDULER_NAMES, make_scheduler  # noqa: E402

# --- configs ----------------------------------------------------------------------------------

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json (+ the explicit leading spacing)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
SD21 = {  # stabilityai/stable-diffusion-2-1: no timestep_spacing, so every class uses its default
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
ZERO_SNR = {  # zero terminal SNR + trailing (Lin et al. 2023), cosine betas, clipping, sigma_min end
    "_class_name": "DDIMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
    "clip_sample": True,
    "clip_sample_range": 1.5,
    "set_alpha_to_one": True,
    "final_sigmas_type": "sigma_min",
    "lower_order_final": False,
    "euler_at_final": True,
}
LINEAR = {  # DDPM linear betas, linspace, dynamic thresholding, Karras sigmas, PRK warm-up, heun
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "timestep_spacing": "linspace",
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.9,
    "sample_max_value": 3.0,
    "skip_prk_steps": False,
    "solver_type": "heun",
    "use_karras_sigmas": True,
    "original_inference_steps": 30,
}
EXOTIC = {  # trained betas, log-linear/continuous Euler, UniPC order 3 bh1 eps-form, clipped lambdas
    "_class_name": "UniPCMultistepScheduler",
    "trained_betas": np.linspace(0.0001, 0.02, 1000).tolist(),
    "prediction_type": "v_prediction",
    "interpolation_type": "log_linear",
    "timestep_type": "continuous",
    "predict_x0": False,
    "solver_type": "bh1",
    "solver_order": 3,
    "disable_corrector": [0],
    "lambda_min_clipped": -4.5,
    "final_sigmas_type": "sigma_min",  # eps-form UniPC divides 0 by 0 at a zero final sigma (NaN in diffusers too)
    "timestep_spacing": "trailing",  # ignored: listed in _use_default_values
    "_use_default_values": ["timestep_spacing"],
    "steps_offset": 1,
    "original_inference_steps": 100,
    "timestep_scaling": 5.0,
    "some_unknown_key": 123,
}
CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "zero_snr": ZERO_SNR, "linear": LINEAR, "exotic": EXOTIC}
STEPS = (1, 4, 20, 25)

# The reference: what each name means in diffusers terms (written out, not taken from the package).
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# Degenerate cases where diffusers itself raises; ours raises the same exception type.
MIRRORED_FAILURES = {
    # PRK warm-up needs >= 4 steps (numpy broadcast error in set_timesteps)
    ("pndm", "zero_snr", 1),
    ("pndm", "linear", 1),
    ("pndm", "exotic", 1),
    # Karras sigmas near sigma_max = 4096 round to the same timestep 998 several times; the first
    # step then starts at the *second* match (index_for_timestep) and the loop runs off the end
    # (IndexError). Pipelines avoid it with set_begin_index(0), as the SDXL pipeline does.
    ("dpm++2m-karras", "zero_snr", 20),
    ("dpm++2m-karras", "zero_snr", 25),
}

SHAPE = (2, 4, 8, 8)
# Max |ours - diffusers| along a trajectory, relative to max(1, the largest |sample| of the
# diffusers trajectory so far). Both sides compute in float32 and agree to rounding: torch's CPU
# sqrt/exp/quantile and numpy's differ in the last bit now and then (torch.sqrt is not even
# correctly rounded on AVX-512), so a step can differ by ~1 ulp of its *operands*. Such an error
# stays put in absolute terms when the sample then shrinks: with zero-SNR (sigma_max = 4096) the
# first euler-a step goes from |x| ~ 2e4 to ~30, which is 2.8e-5 of the new magnitude but 7e-8 of
# the scale it was made at; hence the running scale. Observed worst: ~1.2e-6.
TOL = 1e-5
WORST: dict[str, float] = {}


def reference(name, config):
    cls_name, overrides = REFERENCE[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def fake_unet(x: np.ndarray, i: int, t: float) -> np.ndarray:
    """Deterministic stand-in for the U-Net: depends on the sample, the step and the timestep."""
    eps = np.random.default_rng(1000 + i).standard_normal(x.shape)
    return (0.1 * x + eps * (1.0 + abs(float(t)) / 1000.0)).astype(np.float32)


class NoiseQueue:
    """Replaces diffusers' randn_tensor: hands out the noise our side also receives, in order."""

    def __init__(self, noises):
        self.noises, self.draws = list(noises), 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = self.noises[self.draws]
        self.draws += 1
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise).to(dtype=dtype or torch.float32)


@pytest.fixture
def patched_noise(monkeypatch):
    def install(noises):
        queue = NoiseQueue(noises)
        for mod in ("scheduling_euler_ancestral_discrete", "scheduling_lcm"):
            monkeypatch.setattr(getattr(diffusers.schedulers, mod), "randn_tensor", queue)
        return queue

    return install


def rel_err(ours: np.ndarray, ref, scale: float = 0.0) -> float:
    """max |ours - ref| / max(1, max |ref|, scale)."""
    ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ours.dtype, ref.shape, ref.dtype)
    assert np.all(np.isfinite(ours)) and np.all(np.isfinite(ref))
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / max(1.0, float(np.max(np.abs(ref))), scale))


def run_both(name, config, steps, install_noise, strength=None):
    """Drive both schedulers through a full loop; returns the worst relative error seen.

    Whatever diffusers raises (degenerate schedules), ours must raise too, at the same point; then
    the result is None.
    """
    ref, ours = reference(name, config), make_scheduler(name, config)
    if not _same_outcome(lambda: ref.set_timesteps(steps), lambda: ours.set_timesteps(steps)):
        return None
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(7)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    ours_ts, ref_ts = ours.timesteps, ref.timesteps
    errs = []
    if strength is None:
        x = latents * ours.init_noise_sigma
        rx = torch.from_numpy(latents) * ref.init_noise_sigma
    else:  # img2img as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        ours_ts, ref_ts = ours_ts[t_start * ours.order :], ref_ts[t_start * ref.order :]
        ours.set_begin_index(t_start * ours.order)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(t_start * ref.order)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        x = ours.add_noise(latents, noise, ours_ts[:1])
        rx = ref.add_noise(torch.from_numpy(latents), torch.from_numpy(noise), ref_ts[:1])
        errs.append(rel_err(x, rx))

    step_noise = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(len(ours_ts))]
    queue = install_noise(step_noise)
    scale = float(np.abs(rx.numpy()).max())
    for i, (t, rt) in enumerate(zip(ours_ts, ref_ts)):
        model_in, ref_in = ours.scale_model_input(x, t), ref.scale_model_input(rx, rt)
        errs.append(rel_err(model_in, ref_in, scale))
        out = fake_unet(model_in, i, t)
        ref_out = torch.from_numpy(fake_unet(ref_in.numpy(), i, float(rt)))
        new = {}
        if not _same_outcome(
            lambda: new.setdefault("ref", ref.step(ref_out, rt, rx).prev_sample),
            lambda: new.setdefault("ours", ours.step(out, t, x, noise=step_noise[i] if ours.needs_noise else None)),
        ):
            return None
        x, rx = new["ours"], new["ref"]
        scale = max(scale, float(np.abs(rx.numpy()).max()))
        errs.append(rel_err(x, rx, scale))
    expected_draws = {"euler-a": len(ours_ts), "lcm": len(ours_ts) - 1}.get(name, 0)
    assert queue.draws == expected_draws
    return max(errs)


def _same_outcome(ref_fn, ours_fn) -> bool:
    """Run both; True if both succeeded, False if both raised the same exception type."""
    try:
        ref_fn()
    except Exception as exc:  # noqa: BLE001 - any failure of diffusers must be mirrored
        with pytest.raises(type(exc)):
            ours_fn()
        return False
    ours_fn()
    return True


def _record(name, err):
    WORST[name] = max(WORST.get(name, 0.0), err)
    assert err < TOL, f"{name}: relative error {err:.3g}"


# --- trajectories ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_trajectory_matches_diffusers(name, config_name, steps, patched_noise):
    err = run_both(name, CONFIGS[config_name], steps, patched_noise)
    assert (err is None) == ((name, config_name, steps) in MIRRORED_FAILURES)
    if err is not None:
        _record(name, err)


@pytest.mark.parametrize("config_name", ["sd15", "sdxl", "zero_snr"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps,strength", [(20, 0.6), (25, 0.3), (4, 0.75)])
def test_img2img_begin_index_matches_diffusers(name, config_name, steps, strength, patched_noise):
    _record(name, run_both(name, CONFIGS[config_name], steps, patched_noise, strength=strength))


@pytest.mark.parametrize("config_name", ["sd15", "sd21", "linear"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_add_noise_matches_diffusers(name, config_name):
    """add_noise by timestep lookup (no begin index), for single and per-batch timesteps."""
    config = CONFIGS[config_name]
    ref, ours = reference(name, config), make_scheduler(name, config)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    n = len(ours.timesteps)
    for idx in ([0], [n // 2], [n - 1], [1, n - 2]):
        got = ours.add_noise(x0, noise, ours.timesteps[idx])
        want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[idx])
        _record(name, rel_err(got, want))
    # a python scalar timestep works too
    got = ours.add_noise(x0, noise, float(ours.timesteps[0]))
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[:1])
    _record(name, rel_err(got, want))


# --- API and bookkeeping ------------------------------------------------------------------------


def test_names_and_unknown_name():
    assert SCHEDULER_NAMES == ("ddim", "euler", "euler-a", "dpm++2m", "dpm++2m-karras", "lcm", "pndm", "unipc")
    with pytest.raises(ValueError, match="dpm\\+\\+2m-karras"):
        make_scheduler("heun", SD15)


def test_needs_noise_flags_and_missing_noise():
    assert {n for n in SCHEDULER_NAMES if make_scheduler(n, SD15).needs_noise} == {"euler-a", "lcm"}
    for name in ("euler-a", "lcm"):
        s = make_scheduler(name, SD15)
        s.set_timesteps(4)
        x = np.zeros(SHAPE, np.float32)
        with pytest.raises(ValueError, match="noise"):
            s.step(x, s.timesteps[0], x)
    # no noise needed on the last step (diffusers draws none for LCM; sigma_up = 0 for euler-a)
    for name in ("euler-a", "lcm"):
        s = make_scheduler(name, SD15)
        s.set_timesteps(1)
        out = s.step(np.zeros(SHAPE, np.float32), s.timesteps[0], np.ones(SHAPE, np.float32))
        assert np.all(np.isfinite(out))


def test_config_resolution_like_from_config():
    # keys of other classes are ignored, missing keys take the class defaults
    euler = make_scheduler("euler", SD21)
    assert euler.config["timestep_spacing"] == "linspace" and euler.config["prediction_type"] == "v_prediction"
    assert "skip_prk_steps" not in euler.config
    # _use_default_values keys fall back to the target class's default
    assert make_scheduler("ddim", EXOTIC).config["timestep_spacing"] == "leading"
    # name overrides
    assert make_scheduler("dpm++2m-karras", SD15).config["use_karras_sigmas"] is True
    assert make_scheduler("dpm++2m", {**SD15, "use_karras_sigmas": True, "solver_order": 3}).config["solver_order"] == 2
    # options the port lacks fail loudly at construction
    with pytest.raises(NotImplementedError, match="use_exponential_sigmas"):
        make_scheduler("euler", {**SD15, "use_exponential_sigmas": True})
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        make_scheduler("ddim", {**SD15, "beta_schedule": "sigmoid"})


def test_set_timesteps_resets_state():
    """A scheduler reused for a second generation gives the same result (history and indices reset)."""
    for name in SCHEDULER_NAMES:
        s = make_scheduler(name, SDXL)
        results = []
        for _ in range(2):
            s.set_timesteps(6)
            x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * s.init_noise_sigma
            for i, t in enumerate(s.timesteps):
                out = fake_unet(s.scale_model_input(x, t), i, t)
                noise = np.random.default_rng(50 + i).standard_normal(SHAPE).astype(np.float32)
                x = s.step(out, t, x, noise=noise)
            results.append(x)
        np.testing.assert_array_equal(results[0], results[1])


def test_float16_latents_keep_their_dtype():
    for name in SCHEDULER_NAMES:
        s = make_scheduler(name, SD15)
        s.set_timesteps(4)
        x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float16)
        for i, t in enumerate(s.timesteps):
            model_in = s.scale_model_input(x, t)
            assert model_in.dtype == np.float16
            noise = np.random.default_rng(i).standard_normal(SHAPE).astype(np.float16)
            x = s.step(fake_unet(model_in, i, t).astype(np.float16), t, x, noise=noise)
            assert x.dtype == np.float16 and np.all(np.isfinite(x))


def test_runtime_package_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        import sdopt.runtime.schedulers as s
        for name in s.SCHEDULER_NAMES:
            s.make_scheduler(name, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}).set_timesteps(4)
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zz_report_worst_errors():
    """Prints the worst relative error per scheduler (run with -s to see it)."""
    assert WORST, "run the whole module"
    for name in SCHEDULER_NAMES:
        if name in WORST:
            print(f"{name:16s} worst rel err {WORST[name]:.3g}")
    assert max(WORST.values()) < TOL
