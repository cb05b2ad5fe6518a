"""The numpy schedulers (sdopt.runtime.schedulers) against diffusers, step by step.

Both sides get the same config, the same initial latents and the same per-step noise; each side's
"U-Net" output is the same deterministic function of its own current (scaled) sample, so any
divergence in the schedule or the update shows up and accumulates along the trajectory.

Tolerances (float32 on both sides; each assert below names its reason):

- Trajectories: max |ours - diffusers| relative to the running scale max(1, largest |sample| so
  far) must stay within max(TOL, COEFF_ULPS * 2**-23 * A). torch's and numpy's float32
  sqrt/exp/pow/quantile kernels differ in the last bit now and then, and which kernel runs depends
  on the CPU (AVX2 or AVX-512, Intel's or AMD's MKL path), so a coefficient can differ by ~1 ulp.
  A = 1 / sqrt(max(alpha_bar_T, 2**-24)) = sqrt(1 + sigma_max**2), read from diffusers' schedule,
  bounds the factors a step applies: VP samplers (DDIM, PNDM, DPM-Solver, UniPC) scale the sample by
  sqrt(alpha_prev / alpha_t) <= A and cancel terms of size A |x| down to |x|, so one ulp of a
  coefficient is A ulps of the result. A is 14.6 for SD's scaled-linear betas (tolerance: the floor
  TOL = 1e-5), 157 for DDPM's linear betas (1.5e-4) and 4096 with zero terminal SNR (3.9e-3):
  2**-24 is the alpha_bar_T diffusers substitutes for zero there (DDIM and LCM keep the 0 but only
  multiply by it; PNDM cannot rescale and keeps the cosine schedule's 2.4e-9, but its first factor
  sqrt(alpha_874 / alpha_999) = 3960 stays under 2**12). COEFF_ULPS = 8 covers a few coefficients
  each off by an ulp.
  Observed worst (AMD EPYC with AVX-512, where exact comparisons failed): 1.07e-3 for
  pndm/zero_snr, 4.8e-6 for unipc/exotic (1.3e-5 with SIMD dispatch lowered), 1.9e-6 on SD's
  schedules: at most 0.27 of the tolerance.
  Moving every float32 sqrt of our pndm by one ulp moves pndm/zero_snr/4 steps by 2.5e-3.
  Real differences stay visible: on zero_snr, clip range 1.45 for 1.5, set_alpha_to_one off, a zero
  final sigma for sigma_min or UniPC bh1 for bh2 move the trajectory by 7e-3 (final sigma) to 0.57.
- Timesteps: equal, or within TIMESTEP_ULPS float32 ulps of the largest timestep where they are
  fractional (they come from float32 log-sigma tables). Integer timesteps (Karras sigmas mapped back
  to t, then rounded or truncated) must be equal, except a neighbouring integer where diffusers' own
  unrounded value crosses the boundary when its float32 alphas_cumprod moves by one ulp (plus
  ROUNDING_ULPS ulps of t): sigma_min = sqrt((1 - a0) / a0) loses three digits to cancellation, so
  one ulp of a0 moves zero-SNR's t = 927.99 by ~0.012 (diffusers truncates it to 927, numpy's
  rounding of a0 gives 928). The trajectory is then compared from the reference's timesteps.

In the lean install (tests/helpers.py) the diffusers side is the trajectory the full install saved.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np
import pytest
from helpers import scalar

from sdopt.runtime.schedulers import SCHEDULER_NAMES, make_scheduler

pytestmark = pytest.mark.lean

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
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one float32 ulp at 1.0
TOL = 1e-5  # floor: float32 kernels differing by ~1 ulp on a well-conditioned schedule (module docstring)
COEFF_ULPS = 8  # a few float32 coefficients each 1 ulp off, amplified by A (module docstring)
TIMESTEP_ULPS = 4  # fractional timesteps: 4 float32 ulps of the largest timestep (one log/exp ulp is ~1-2)
ROUNDING_ULPS = 4  # integer timesteps: slack (float32 ulps of t) around diffusers' 1-ulp range (check_timesteps)
TRAJECTORY_TABLE = "scheduler max rel error vs diffusers"


def fake_unet(x: np.ndarray, i: int, t: float) -> np.ndarray:
    """Deterministic stand-in for the U-Net: depends on the sample, the step and the timestep."""
    eps = np.random.default_rng(1000 + i).standard_normal(x.shape)
    return (0.1 * x + eps * (1.0 + abs(float(t)) / 1000.0)).astype(np.float32)


@dataclass
class Inputs:
    """The random numbers both sides receive: initial latents, img2img noise, one noise per step."""

    latents: np.ndarray
    noise: np.ndarray
    step_noise: list[np.ndarray]

    @classmethod
    def make(cls, n_steps: int) -> Inputs:
        rng = np.random.default_rng(7)
        latents, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
        return cls(latents, noise, [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n_steps)])


@dataclass
class Run:
    """One side's loop: its schedule, every state along the way, and where (if at all) it raised."""

    timesteps: np.ndarray
    init_noise_sigma: float = 1.0
    states: list[np.ndarray] = field(default_factory=list)  # start sample, then per step model input, new sample
    failure: str = ""  # "IndexError at step 3": diffusers' degenerate cases must fail alike on our side
    draws: int = 0  # diffusers' randn_tensor calls (euler-a and lcm draw per-step noise)


def img2img_start(steps: int, strength: float, order: int) -> int:
    """First schedule index, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0) * order


def run_ours(name, config, steps, strength=None, timesteps=None) -> Run:
    """Our scheduler through a full loop (timesteps: replace the schedule's, see check_timesteps)."""
    sched = make_scheduler(name, config)
    try:
        sched.set_timesteps(steps)
    except Exception as exc:  # noqa: BLE001 - compared with what diffusers raised
        return Run(np.zeros(0, np.float32), failure=f"{type(exc).__name__} at set_timesteps")
    run = Run(sched.timesteps.copy(), float(sched.init_noise_sigma))
    if timesteps is not None:
        sched.timesteps = np.array(timesteps, dtype=np.float32)
    ts = sched.timesteps
    inputs = Inputs.make(len(ts))
    if strength is None:
        x = inputs.latents * sched.init_noise_sigma
    else:
        start = img2img_start(steps, strength, sched.order)
        ts = ts[start:]
        sched.set_begin_index(start)
        x = sched.add_noise(inputs.latents, inputs.noise, ts[:1])
    run.states.append(x)
    for i, t in enumerate(ts):
        model_in = sched.scale_model_input(x, t)
        run.states.append(model_in)
        try:
            x = sched.step(fake_unet(model_in, i, t), t, x, noise=inputs.step_noise[i] if sched.needs_noise else None)
        except Exception as exc:  # noqa: BLE001 - compared with what diffusers raised
            run.failure = f"{type(exc).__name__} at step {i}"
            return run
        run.states.append(x)
    return run


# -- the diffusers side (full install only) --------------------------------------------------------
REFERENCE = {  # what each name means in diffusers terms (written out, not taken from the package)
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def reference(name, config):
    import diffusers

    cls_name, overrides = REFERENCE[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


class NoiseQueue:
    """Replaces diffusers' randn_tensor: hands out the noise our side also receives, in order."""

    def __init__(self, noises):
        self.noises, self.draws = list(noises), 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        import torch

        noise = self.noises[self.draws]
        self.draws += 1
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise).to(dtype=dtype or torch.float32)


@contextlib.contextmanager
def diffusers_noise(noises):
    import diffusers

    queue = NoiseQueue(noises)
    with pytest.MonkeyPatch.context() as mp:
        for mod in ("scheduling_euler_ancestral_discrete", "scheduling_lcm"):
            mp.setattr(getattr(diffusers.schedulers, mod), "randn_tensor", queue)
        yield queue


def run_diffusers(name, config, steps, strength=None) -> Run:
    """diffusers' scheduler through the same loop."""
    import torch

    ref = reference(name, config)
    try:
        ref.set_timesteps(steps)
    except Exception as exc:  # noqa: BLE001 - ours must raise the same
        return Run(np.zeros(0, np.float32), failure=f"{type(exc).__name__} at set_timesteps")
    run = Run(ref.timesteps.numpy().astype(np.float32), float(ref.init_noise_sigma))
    ts = ref.timesteps
    inputs = Inputs.make(len(ts))
    if strength is None:
        x = torch.from_numpy(inputs.latents) * ref.init_noise_sigma
    else:
        start = img2img_start(steps, strength, ref.order)
        ts = ts[start:]
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(start)
        x = ref.add_noise(torch.from_numpy(inputs.latents), torch.from_numpy(inputs.noise), ts[:1])
    run.states.append(x.numpy())
    with diffusers_noise(inputs.step_noise[: len(ts)]) as queue:
        for i, t in enumerate(ts):
            model_in = ref.scale_model_input(x, t)
            run.states.append(model_in.numpy())
            try:
                x = ref.step(torch.from_numpy(fake_unet(model_in.numpy(), i, float(t))), t, x).prev_sample
            except Exception as exc:  # noqa: BLE001 - ours must raise the same
                run.failure = f"{type(exc).__name__} at step {i}"
                break
            run.states.append(x.numpy())
        run.draws = queue.draws
    return run


def unrounded_timesteps(name, config, steps) -> np.ndarray | None:
    """diffusers' Karras timesteps before they become integers (DPM-Solver/UniPC set_timesteps,
    verbatim), from its float32 alphas_cumprod as is and moved one ulp down and up: shape (3, steps).
    None where the schedule has no Karras sigmas."""
    import torch

    ref = reference(name, config)
    if not (ref.config.get("use_karras_sigmas") and hasattr(ref, "_convert_to_karras")):
        return None
    rows = []
    for direction in (None, -torch.inf, torch.inf):
        ac = ref.alphas_cumprod
        if direction is not None:  # exact constants (alpha_bar = 1) carry no rounding: they stay
            ac = torch.where(ac == 1, ac, torch.nextafter(ac, torch.full_like(ac, direction)))
        sigmas = np.array(((1 - ac) / ac) ** 0.5)
        log_sigmas = np.log(sigmas)
        karras = ref._convert_to_karras(in_sigmas=np.flip(sigmas).copy(), num_inference_steps=steps)
        rows.append([ref._sigma_to_t(sigma, log_sigmas) for sigma in karras])
    return np.array(rows, dtype=np.float64)


def trajectory_errors(ours: list[np.ndarray], ref: list[np.ndarray]) -> list[float]:
    """Per state: max |ours - ref| / max(1, the largest |ref| so far).

    The running scale: a step that differs by ~1 ulp of its operands leaves an error that stays put
    in absolute terms when the sample then shrinks (zero-SNR euler-a goes from |x| ~ 2e4 to ~30).
    """
    errs, scale = [], 1.0
    for o, r in zip(ours, ref, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, o.dtype, r.shape, r.dtype)
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(r))
        scale = max(scale, float(np.max(np.abs(r))))
        errs.append(float(np.max(np.abs(o.astype(np.float64) - r))) / scale)
    return errs


def scheduler_reference(reference_store, name, config_name, steps, strength=None) -> dict[str, np.ndarray]:
    """diffusers' trajectory and its schedule before rounding (live or saved)."""
    key = f"{name}-{config_name}-{steps}" + ("" if strength is None else f"-img2img-{strength}")

    def compute():
        config = CONFIGS[config_name]
        base = run_diffusers(name, config, steps, strength)
        unrounded = unrounded_timesteps(name, config, steps) if base.states else None
        alpha_bar_t = max(reference(name, config).alphas_cumprod[-1].item(), 2**-24)  # see the module docstring
        return {
            "timesteps": base.timesteps,
            "unrounded": unrounded,
            "amplification": 1 / np.sqrt(alpha_bar_t),
            "init_noise_sigma": base.init_noise_sigma,
            "failure": base.failure,
            "draws": base.draws,
            "states": np.stack(base.states) if base.states else np.zeros((0, *SHAPE), np.float32),
        }

    return reference_store.get("schedulers", key, compute)


def check_timesteps(ours: np.ndarray, ref: np.ndarray, unrounded: np.ndarray | None) -> bool:
    """Assert our schedule matches diffusers' within float32 rounding (module docstring); True if equal.

    unrounded: diffusers' values before they became integers, from its alphas_cumprod as is, one
    ulp down and one ulp up (rows), see unrounded_timesteps.
    """
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    if np.array_equal(ours, ref):
        return True
    if np.all(ref == np.round(ref)):
        # Integer timesteps: a neighbour is legitimate only where a float32 rounding difference can
        # carry diffusers' unrounded value across the integer boundary: a one-ulp change of its
        # alphas_cumprod (sigma_min = sqrt((1 - a0) / a0) loses 3 digits to cancellation), widened by
        # ROUNDING_ULPS ulps of t itself.
        assert unrounded is not None, f"integer timesteps differ: {ours.tolist()} != diffusers {ref.tolist()}"
        to_int = next((f for f in (np.round, np.trunc) if np.array_equal(f(unrounded[0]), ref)), None)
        assert to_int is not None, "unrounded_timesteps no longer reproduces diffusers' timesteps"
        slack = ROUNDING_ULPS * np.spacing(np.abs(unrounded).max(axis=0).astype(np.float32)).astype(np.float64)
        low, high = to_int(unrounded.min(axis=0) - slack), to_int(unrounded.max(axis=0) + slack)
        off = ours != ref
        assert np.all((ours >= low) & (ours <= high)), (
            f"timesteps {ours[off].tolist()} != diffusers {ref[off].tolist()}: no float32 rounding tie "
            f"(unrounded {unrounded[:, off].T.tolist()} as is / 1 ulp down / 1 ulp up)"
        )
        return False
    # Fractional timesteps come from float32 log-sigma tables: a 1-ulp log/exp difference moves them
    # by ~1-2 ulps of the largest timestep.
    atol = TIMESTEP_ULPS * EPS32 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    return False


def compare_with_diffusers(name, config_name, steps, reference_store, record_metric, strength=None) -> float | None:
    """Run ours against diffusers' (live or saved) trajectory; the worst relative error, or None where
    both raised alike (degenerate schedules)."""
    want = scheduler_reference(reference_store, name, config_name, steps, strength)
    ours = run_ours(name, CONFIGS[config_name], steps, strength)
    failure = str(scalar(want["failure"]))
    if failure.endswith("set_timesteps") or ours.failure.endswith("set_timesteps"):
        assert ours.failure == failure, f"ours: {ours.failure or 'no error'}; diffusers: {failure or 'no error'}"
        return None
    if not check_timesteps(ours.timesteps, want["timesteps"], want.get("unrounded")):
        ours = run_ours(name, CONFIGS[config_name], steps, strength, timesteps=want["timesteps"])
    assert ours.failure == failure, f"ours: {ours.failure or 'no error'}; diffusers: {failure or 'no error'}"
    # init_noise_sigma: one float32 value computed by both (sqrt of sigma_max^2 + 1): 8 ulps of rounding.
    assert ours.init_noise_sigma == pytest.approx(scalar(want["init_noise_sigma"]), rel=8 * EPS32)
    assert len(ours.states) == len(want["states"]), (len(ours.states), len(want["states"]))
    if not failure:  # diffusers drew exactly the per-step noises ours received (none on LCM's last step)
        expected_draws = {"euler-a": len(ours.states) // 2, "lcm": len(ours.states) // 2 - 1}.get(name, 0)
        assert scalar(want["draws"]) == expected_draws
    err = max(trajectory_errors(ours.states, list(want["states"])))
    # float32 on both sides: a coefficient's last bit, amplified by the schedule's A (module docstring).
    amplification = scalar(want["amplification"])
    allowed = max(TOL, COEFF_ULPS * EPS32 * amplification)
    record_metric(TRAJECTORY_TABLE, f"{name}/{config_name}", err)
    record_metric(TRAJECTORY_TABLE + " / its tolerance", f"{name}/{config_name}", err / allowed)
    assert err <= allowed, f"{name}/{config_name}: relative error {err:.3g} > {allowed:.2g} (A = {amplification:.4g})"
    return None if failure else err


# --- trajectories ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_trajectory_matches_diffusers(name, config_name, steps, reference_store, record_metric):
    err = compare_with_diffusers(name, config_name, steps, reference_store, record_metric)
    assert (err is None) == ((name, config_name, steps) in MIRRORED_FAILURES)


@pytest.mark.parametrize("config_name", ["sd15", "sdxl", "zero_snr"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps,strength", [(20, 0.6), (25, 0.3), (4, 0.75)])
def test_img2img_begin_index_matches_diffusers(name, config_name, steps, strength, reference_store, record_metric):
    assert compare_with_diffusers(name, config_name, steps, reference_store, record_metric, strength) is not None


@pytest.mark.parametrize("config_name", ["sd15", "sd21", "linear"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_add_noise_matches_diffusers(name, config_name, reference_store, record_metric):
    """add_noise by timestep lookup (no begin index), for single and per-batch timesteps."""
    config = CONFIGS[config_name]
    ours = make_scheduler(name, config)
    ours.set_timesteps(20)
    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    n = len(ours.timesteps)
    picks = ([0], [n // 2], [n - 1], [1, n - 2])

    def compute():
        import torch

        ref = reference(name, config)
        ref.set_timesteps(20)
        out = {
            f"idx{i}": ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[idx]).numpy()
            for i, idx in enumerate(picks)
        }
        return {**out, "timesteps": ref.timesteps.numpy().astype(np.float32)}

    want = reference_store.get("add_noise", f"{name}-{config_name}", compute)
    check_timesteps(ours.timesteps, want["timesteps"], None)
    got = [ours.add_noise(x0, noise, ours.timesteps[idx]) for idx in picks]
    got.append(ours.add_noise(x0, noise, float(ours.timesteps[0])))  # a python scalar timestep works too
    errs = trajectory_errors(got, [want[f"idx{i}"] for i in range(len(picks))] + [want["idx0"]])
    record_metric(TRAJECTORY_TABLE, f"{name}/{config_name} add_noise", max(errs))
    # One product-sum of float32 table values (sqrt of alphas_cumprod) with ~1-ulp kernel differences.
    assert max(errs) <= TOL, f"{name}: add_noise relative error {max(errs):.3g}"


def test_timestep_check_accepts_only_rounding_ties():
    """The rule for integer timesteps: a neighbour only where diffusers' unrounded value can cross."""
    ref = np.array([999, 927, 500], np.float32)
    tie = np.array([[999.0, 927.49999, 500.2], [999.0, 927.4999, 500.2], [999.0, 927.50001, 500.2]])
    assert check_timesteps(ref.copy(), ref, tie)
    assert not check_timesteps(np.array([999, 928, 500], np.float32), ref, tie)
    with pytest.raises(AssertionError, match="no float32 rounding tie"):
        check_timesteps(np.array([999, 927, 501], np.float32), ref, tie)  # 500.2 is no tie
    with pytest.raises(AssertionError, match="no float32 rounding tie"):
        check_timesteps(np.array([999, 929, 500], np.float32), ref, tie)  # two away
    with pytest.raises(AssertionError, match="no float32 rounding tie"):
        check_timesteps(np.array([999, 928, 500], np.float32), ref, np.repeat(tie[:1] - 0.01, 3, axis=0))
    truncated = np.array([[999.0, 927.99, 500.2], [999.0, 927.98, 500.2], [999.0, 928.01, 500.2]])  # astype(int)
    assert not check_timesteps(np.array([999, 928, 500], np.float32), ref, truncated)
    frac = np.array([999.0, 88.03043365478516, 0.5], np.float32)
    assert not check_timesteps(np.nextafter(frac, np.float32(0)), frac, None)  # 1 ulp: accepted
    with pytest.raises(AssertionError):
        check_timesteps(frac + np.float32(0.01), frac, None)


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
    dpm = make_scheduler("dpm++2m", {**SD15, "use_karras_sigmas": True, "solver_order": 3})
    assert dpm.config["solver_order"] == 2
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
            config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
            s.make_scheduler(name, config).set_timesteps(4)
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
