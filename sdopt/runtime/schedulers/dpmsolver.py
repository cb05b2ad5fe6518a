"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2: the 2M solver in data-prediction form)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import (
    TRAINING_DEFAULTS,
    SigmaScheduler,
    Timestep,
    as_work,
    predict_x0,
    recent,
    threshold_sample,
    work_dtype,
)
from .betas import (
    F32,
    exp32,
    final_sigma,
    interp_sigmas,
    karras_sigmas,
    log_snr,
    multistep_timesteps,
    sigma_space_alphas_cumprod,
    sigma_to_t,
    train_sigmas,
)


class DPMSolverMultistepScheduler(SigmaScheduler):
    """Port of ``diffusers.DPMSolverMultistepScheduler`` for algorithm_type="dpmsolver++",
    solver_order 1 or 2 (midpoint or heun second-order update)."""

    DEFAULTS = dict(
        **TRAINING_DEFAULTS,
        solver_order=2,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
        variance_type=None,
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
    )
    _missing_timestep_is_last = True

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        # diffusers' silent remaps of options borrowed from sibling schedulers' configs
        if cfg["algorithm_type"] == "deis":
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"
        self._require("algorithm_type", "dpmsolver++")
        self._require("solver_order", 1, 2)
        self._require("solver_type", "midpoint", "heun")
        self._require_prediction("epsilon", "sample", "v_prediction")
        unsupported = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
        for key in (*unsupported, "use_dynamic_shifting"):
            self._require(key, False, None)
        self._require("final_sigmas_type", "zero", "sigma_min")

        self.alphas_cumprod = sigma_space_alphas_cumprod(cfg)
        self.sigmas = train_sigmas(self.alphas_cumprod)
        self.model_outputs: list[np.ndarray | None] = [None] * cfg["solver_order"]
        self.lower_order_nums = 0

    def _last_timestep(self) -> int:
        """num_train_timesteps minus the steps whose log-SNR lambda is below lambda_min_clipped."""
        ac = self.alphas_cumprod
        alpha, sigma = np.sqrt(ac).astype(np.float64), np.sqrt(F32(1) - ac).astype(np.float64)
        with np.errstate(divide="ignore"):
            lambdas = np.log(alpha).astype(F32) - np.log(sigma).astype(F32)
        clipped = int(np.searchsorted(lambdas[::-1], self.config["lambda_min_clipped"], side="left"))
        return self.config["num_train_timesteps"] - clipped

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        timesteps = multistep_timesteps(
            cfg["timestep_spacing"],
            cfg["num_train_timesteps"],
            num_inference_steps,
            cfg["steps_offset"],
            self._last_timestep(),
        )
        sigmas = train_sigmas(self.alphas_cumprod)
        if cfg["use_karras_sigmas"]:
            sig = karras_sigmas(sigmas[::-1], num_inference_steps)
            timesteps = sigma_to_t(sig, np.log(sigmas))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sig = interp_sigmas(timesteps, sigmas)
        self.sigmas = np.concatenate([sig, [final_sigma(cfg, self.alphas_cumprod)]]).astype(F32)
        self.timesteps = timesteps.astype(np.int64).astype(F32)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * cfg["solver_order"]
        self.lower_order_nums = 0
        self._reset_indices()

    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Data prediction x0_theta(x_t, t) that DPM-Solver++ integrates."""
        learned_variance = self.config["variance_type"] in ("learned", "learned_range")
        if self.config["prediction_type"] == "epsilon" and learned_variance:
            model_output = model_output[:, :3]
        alpha_t, sigma_t, _ = log_snr(self.sigmas[self._require_step_index()])
        x0 = predict_x0(self.config["prediction_type"], model_output, sample, alpha_t, sigma_t)
        if self.config["thresholding"]:
            x0 = threshold_sample(x0, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"])
        return x0

    def _first_order_update(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++(1) = DDIM: x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) x0 (DPM-Solver++ eq. 9)."""
        i = self._require_step_index()
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s, lambda_s = log_snr(self.sigmas[i])
        h = lambda_t - lambda_s
        return sigma_t / sigma_s * sample - alpha_t * (exp32(-h) - F32(1.0)) * x0

    def _second_order_update(self, sample: np.ndarray) -> np.ndarray:
        """Multistep DPM-Solver++(2M) (Algorithm 2): first difference D1 of the last two x0 estimates."""
        i = self._require_step_index()
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
        m0, m1 = recent(self.model_outputs, 1), recent(self.model_outputs, 2)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        with np.errstate(divide="ignore"):  # h = 0 (repeated final sigma): r0 = inf, D1 = 0, as in torch
            r0 = h_0 / h
        d0, d1 = m0, (F32(1.0) / r0) * (m0 - m1)
        phi = exp32(-h) - F32(1.0)
        if self.config["solver_type"] == "midpoint":
            return sigma_t / sigma_s0 * sample - alpha_t * phi * d0 - F32(0.5) * (alpha_t * phi) * d1
        return sigma_t / sigma_s0 * sample - alpha_t * phi * d0 + alpha_t * (phi / h + F32(1.0)) * d1

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        self._check_ready()
        cfg, n, i = self.config, len(self.timesteps), self._current_step_index(timestep)
        lower_order_final = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        dtype = work_dtype(model_output, sample)
        x = as_work(sample, dtype)
        x0 = self._convert_model_output(as_work(model_output, dtype), x)
        self.model_outputs = self.model_outputs[1:] + [x0]

        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev = self._first_order_update(x0, x)
        else:
            prev = self._second_order_update(x)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg["solver_order"])
        self._step_index = i + 1
        return prev.astype(np.result_type(model_output), copy=False)
