"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), deterministic (eta = 0)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    TRAINING_DEFAULTS,
    AlphaScheduler,
    Timestep,
    as_work,
    clip_or_threshold,
    predict_eps,
    predict_x0,
    work_dtype,
)
from .betas import F32, make_alphas_cumprod, make_betas, spaced_timesteps


class DDIMScheduler(AlphaScheduler):
    """Port of ``diffusers.DDIMScheduler`` (eta = 0)."""

    DEFAULTS = dict(
        **TRAINING_DEFAULTS,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="leading",
        rescale_betas_zero_snr=False,
    )

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._require_prediction("epsilon", "sample", "v_prediction")
        self.alphas_cumprod = make_alphas_cumprod(make_betas(self.config))
        self.final_alpha_cumprod = F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        T = self.config["num_train_timesteps"]
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} cannot exceed num_train_timesteps={T}")
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(self.config["timestep_spacing"], T, num_inference_steps, self.config["steps_offset"])
        self.timesteps = ts.astype(np.int64).astype(F32)
        self._reset_indices()

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1}) eps  (DDIM eq. 12 with sigma_t = 0)."""
        self._check_ready()
        dtype = work_dtype(model_output, sample)
        model_output, x = as_work(model_output, dtype), as_work(sample, dtype)
        t = int(timestep)
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha_t, sigma_t = np.sqrt(a_t), np.sqrt(F32(1) - a_t)

        pt = self.config["prediction_type"]
        x0 = predict_x0(pt, model_output, x, alpha_t, sigma_t)
        eps = predict_eps(pt, model_output, x, alpha_t, sigma_t, x0=x0)
        x0 = clip_or_threshold(x0, self.config)

        direction = np.sqrt(F32(1) - a_prev) * eps
        prev = np.sqrt(a_prev) * x0 + direction
        return prev.astype(np.result_type(sample), copy=False)
