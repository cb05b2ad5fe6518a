"""Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", Algorithm 2 with S_churn = 0; ancestral variant as in
k-diffusion's ``sample_euler_ancestral``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import TRAINING_DEFAULTS, SigmaScheduler, Timestep, as_work, work_dtype
from .betas import (
    F32,
    final_sigma,
    interp_sigmas,
    karras_sigmas,
    linspace_f32,
    log32,
    sigma_space_alphas_cumprod,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)

_COMMON_DEFAULTS = dict(
    **TRAINING_DEFAULTS,
    prediction_type="epsilon",
    timestep_spacing="linspace",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)


class EulerDiscreteScheduler(SigmaScheduler):
    """Port of ``diffusers.EulerDiscreteScheduler``:
    x_{i+1} = x_i + (x_i - x0_i) / sigma_i * (sigma_{i+1} - sigma_i)."""

    DEFAULTS = dict(
        _COMMON_DEFAULTS,
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_type="discrete",
        final_sigmas_type="zero",
    )
    _vp_add_noise = False

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._validate()
        self.alphas_cumprod = sigma_space_alphas_cumprod(self.config)
        self.train_sigmas = train_sigmas(self.alphas_cumprod)
        self.sigmas = np.concatenate([self.train_sigmas[::-1], [0.0]]).astype(F32)
        if self._continuous_timesteps:
            self.timesteps = np.array([F32(0.25) * log32(s) for s in self.sigmas[:-1]], dtype=F32)

    def _validate(self) -> None:
        self._require_prediction("epsilon", "v_prediction", "sample", "original_sample")
        self._require("interpolation_type", "linear", "log_linear")
        self._require("use_exponential_sigmas", False, None)
        self._require("use_beta_sigmas", False, None)
        self._require("timestep_type", "discrete", "continuous")
        self._require("final_sigmas_type", "zero", "sigma_min")

    @property
    def _continuous_timesteps(self) -> bool:
        """EDM-style c_noise = log(sigma) / 4 fed to the network (only with v_prediction, as diffusers)."""
        return self.config["timestep_type"] == "continuous" and self.config["prediction_type"] == "v_prediction"

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial latents: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing."""
        max_sigma = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + F32(1)))

    def _inference_sigmas(self, timesteps: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas at the ``n`` inference timesteps, timesteps), before appending the final sigma."""
        sigmas = self.train_sigmas
        if self.config["interpolation_type"] == "linear":
            sig = interp_sigmas(timesteps, sigmas)
        else:  # log_linear: evenly spaced log-sigmas from the largest to the smallest (n + 1 of them)
            sig = np.exp(linspace_f32(np.log(sigmas[-1]), np.log(sigmas[0]), n + 1).astype(np.float64)).astype(F32)
        if self.config["use_karras_sigmas"]:
            sig = karras_sigmas(sig, n, self.config["sigma_min"], self.config["sigma_max"])
            timesteps = sigma_to_t(sig, np.log(sigmas))
        return sig, timesteps

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            cfg["timestep_spacing"], cfg["num_train_timesteps"], num_inference_steps, 0, round_linspace=False
        ).astype(F32)
        if cfg["timestep_spacing"] == "leading":
            timesteps += F32(cfg["steps_offset"])
        sig, timesteps = self._inference_sigmas(timesteps, num_inference_steps)
        self.sigmas = np.concatenate([sig, [final_sigma(cfg, self.alphas_cumprod)]]).astype(F32)
        if self._continuous_timesteps:
            self.timesteps = np.array([F32(0.25) * log32(s) for s in self.sigmas[:-1]], dtype=F32)
        else:
            self.timesteps = np.asarray(timesteps).astype(F32)
        self._reset_indices()

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """c_in = 1 / sqrt(sigma^2 + 1) (Karras et al. 2022, Table 1, VP column)."""
        sigma = self.sigmas[self._current_step_index(timestep)]
        x = as_work(sample, work_dtype(sample))
        return (x / np.sqrt(sigma * sigma + F32(1))).astype(np.result_type(sample), copy=False)

    def _x0(self, model_output: np.ndarray, x: np.ndarray, sigma: np.floating) -> np.ndarray:
        pt = self.config["prediction_type"]
        if pt in ("sample", "original_sample"):
            return model_output
        if pt == "epsilon":
            return x - sigma * model_output
        # v_prediction on the scaled input x / sqrt(sigma^2 + 1)
        return model_output * (-sigma / np.sqrt(sigma * sigma + F32(1))) + x / (sigma * sigma + F32(1))

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One Euler step of dx/dsigma = (x - x0) / sigma from sigma_i to sigma_{i+1}."""
        i = self._current_step_index(timestep)
        dtype = work_dtype(model_output, sample)
        mo, x = as_work(model_output, dtype), as_work(sample, dtype)
        sigma = self.sigmas[i]
        x0 = self._x0(mo, x, sigma)
        derivative = (x - x0) / sigma
        dt = self.sigmas[i + 1] - sigma
        prev = x + derivative * dt
        self._step_index = i + 1
        return prev.astype(np.result_type(model_output), copy=False)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Port of ``diffusers.EulerAncestralDiscreteScheduler``: Euler step to sigma_down, then fresh
    noise of std sigma_up, with sigma_up^2 + sigma_down^2 = sigma_{i+1}^2 (ancestral sampling, eta = 1).

    ``step`` needs ``noise`` (standard normal, the draw diffusers makes with randn_tensor on every step).
    """

    DEFAULTS = dict(_COMMON_DEFAULTS)
    needs_noise = True

    def _validate(self) -> None:
        if self.config["prediction_type"] == "sample":
            raise NotImplementedError(
                "EulerAncestralDiscreteScheduler: prediction_type='sample' is not implemented (as in diffusers)"
            )
        self._require_prediction("epsilon", "v_prediction")

    @property
    def _continuous_timesteps(self) -> bool:
        return False

    def _inference_sigmas(self, timesteps: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        return interp_sigmas(timesteps, self.train_sigmas), timesteps

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i = self._current_step_index(timestep)
        dtype = work_dtype(model_output, sample)
        mo, x = as_work(model_output, dtype), as_work(sample, dtype)
        sigma_from = self.sigmas[i]
        sigma_to = self.sigmas[i + 1]
        x0 = self._x0(mo, x, sigma_from)
        sf2, st2 = sigma_from * sigma_from, sigma_to * sigma_to
        sigma_up = np.sqrt(st2 * (sf2 - st2) / sf2)
        sigma_down = np.sqrt(st2 - sigma_up * sigma_up)
        derivative = (x - x0) / sigma_from
        prev = x + derivative * (sigma_down - sigma_from)
        if noise is not None or sigma_up != 0:
            prev = prev + as_work(self._require_noise(noise, sample), dtype) * sigma_up
        self._step_index = i + 1
        return prev.astype(np.result_type(model_output), copy=False)
