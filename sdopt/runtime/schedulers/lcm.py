"""Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models",
Algorithm 3): predict x0 with the consistency function, re-noise it to the next timestep."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import AlphaScheduler, Timestep, as_work, clip_or_threshold, predict_x0, work_dtype
from .betas import F32, make_alphas_cumprod, make_betas


class LCMScheduler(AlphaScheduler):
    """Port of ``diffusers.LCMScheduler``.

    ``step`` needs ``noise`` (standard normal) on every step but the last, where diffusers draws none.
    """

    DEFAULTS = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        trained_betas=None,
        original_inference_steps=50,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        timestep_spacing="leading",
        timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    )
    needs_noise = True

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._require_prediction("epsilon", "sample", "v_prediction")
        self.alphas_cumprod = make_alphas_cumprod(make_betas(self.config))
        self.final_alpha_cumprod = F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(
        self, num_inference_steps: int, original_inference_steps: int | None = None, strength: float = 1.0
    ) -> None:
        """Evenly skip through the distillation schedule of ``original_inference_steps`` timesteps
        (k = T // original_steps; t = k*j - 1). ``strength`` < 1 truncates that schedule (LCM img2img)."""
        T = self.config["num_train_timesteps"]
        default_steps = self.config["original_inference_steps"]
        original_steps = original_inference_steps if original_inference_steps is not None else default_steps
        if original_steps > T:
            raise ValueError(f"original_inference_steps={original_steps} cannot exceed num_train_timesteps={T}")
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} cannot exceed num_train_timesteps={T}")
        k = T // original_steps
        origin = np.arange(1, int(original_steps * strength) + 1) * k - 1
        if len(origin) // num_inference_steps < 1:
            raise ValueError(
                f"original_inference_steps x strength = {original_steps} x {strength} is smaller than "
                f"num_inference_steps={num_inference_steps}"
            )
        if num_inference_steps > original_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} cannot exceed original_inference_steps={original_steps}"
            )
        origin = origin[::-1]
        idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.num_inference_steps = num_inference_steps
        self.timesteps = origin[idx].astype(F32)
        self._reset_indices()

    def _boundary_scalings(self, t: int) -> tuple[np.floating, np.floating]:
        """Consistency-model boundary condition (Song et al. 2023): c_skip(0) = 1, c_out(0) = 0, sigma_data = 0.5."""
        s = F32(t) * F32(self.config["timestep_scaling"])
        denom = s * s + F32(0.25)
        return F32(0.25) / denom, s / np.sqrt(denom)

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """x0 = c_skip x + c_out f(x); x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) z (no noise on the last step)."""
        n = self._check_ready()
        i = self._current_step_index(timestep)
        dtype = work_dtype(model_output, sample)
        mo, x = as_work(model_output, dtype), as_work(sample, dtype)
        t = int(timestep)
        prev_i = i + 1
        prev_t = int(self.timesteps[prev_i]) if prev_i < len(self.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self._boundary_scalings(t)

        x0 = predict_x0(self.config["prediction_type"], mo, x, np.sqrt(a_t), np.sqrt(F32(1) - a_t))
        x0 = clip_or_threshold(x0, self.config)
        denoised = c_out * x0 + c_skip * x
        if i != n - 1:
            z = as_work(self._require_noise(noise, sample), dtype)
            prev = np.sqrt(a_prev) * denoised + np.sqrt(F32(1) - a_prev) * z
        else:
            prev = denoised
        self._step_index = i + 1
        return prev.astype(np.result_type(model_output, sample), copy=False)
