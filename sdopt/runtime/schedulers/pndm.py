"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): linear
multistep (PLMS, eq. 12) or Runge-Kutta warm-up (PRK, eq. 13) on eps, over the DDIM transfer (eq. 11)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import TRAINING_DEFAULTS, AlphaScheduler, Timestep, as_work, work_dtype
from .betas import F32, make_alphas_cumprod, make_betas, spaced_timesteps


class PNDMScheduler(AlphaScheduler):
    """Port of ``diffusers.PNDMScheduler`` (skip_prk_steps=True is the Stable Diffusion setting: PLMS
    only, warmed up with a second-order step; skip_prk_steps=False runs 3 Runge-Kutta steps first)."""

    DEFAULTS = dict(
        **TRAINING_DEFAULTS,
        skip_prk_steps=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=0,
    )
    pndm_order = 4

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if self.config["prediction_type"] not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type={self.config['prediction_type']!r} must be one of 'epsilon' or 'v_prediction'"
            )
        self.alphas_cumprod = make_alphas_cumprod(make_betas(self.config))
        self.final_alpha_cumprod = F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.prk_timesteps = np.array([], dtype=np.int64)
        self._reset_history()

    def _reset_history(self) -> None:
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_model_output: np.ndarray | int = 0
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        T, n = cfg["num_train_timesteps"], num_inference_steps
        self.num_inference_steps = n
        ts = spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"])[::-1].astype(np.int64)  # ascending
        if cfg["skip_prk_steps"]:
            # PLMS only; the second-to-last timestep is repeated for the warm-up step (counter == 1).
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            half = np.tile(np.array([0, T // n // 2]), self.pndm_order)
            prk = np.array(ts[-self.pndm_order :]).repeat(2) + half
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ts[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64).astype(F32)
        self._reset_history()
        self._reset_indices()

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        self._check_ready()
        dtype = work_dtype(model_output, sample)
        mo, x = as_work(model_output, dtype), as_work(sample, dtype)
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            prev = self._step_prk(mo, int(timestep), x)
        else:
            prev = self._step_plms(mo, int(timestep), x)
        return prev.astype(np.result_type(sample), copy=False)

    def _step_prk(self, mo: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        """Fourth-order Runge-Kutta on eps: 4 model calls per step, weights 1/6, 1/3, 1/3, 1/6."""
        diff_to_prev = 0 if self.counter % 2 else self.config["num_train_timesteps"] // self.num_inference_steps // 2
        prev_t = t - diff_to_prev
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + F32(1 / 6) * mo
            self.ets.append(mo)
            self.cur_sample = x
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + F32(1 / 3) * mo
        else:
            mo = self.cur_model_output + F32(1 / 6) * mo
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else x
        prev = self._get_prev_sample(cur_sample, t, prev_t, mo)
        self.counter += 1
        return prev

    def _step_plms(self, mo: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        """Adams-Bashforth on eps (orders 1-4 while the history fills up; PNDM eq. 12)."""
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: PLMS steps need the 12 Runge-Kutta (PRK) steps to run first")
        ratio = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_t = t - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:] + [mo]
        else:
            prev_t, t = t, t + ratio  # warm-up: redo the first step with the averaged eps
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = x
        elif len(ets) == 1 and self.counter == 1:
            mo = (mo + ets[-1]) / 2
            assert self.cur_sample is not None, "the PLMS warm-up step keeps the sample of the first step"
            x, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            mo = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            mo = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            mo = F32(1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev = self._get_prev_sample(x, t, prev_t, mo)
        self.counter += 1
        return prev

    def _get_prev_sample(self, x: np.ndarray, t: int, prev_t: int, eps: np.ndarray) -> np.ndarray:
        """DDIM transfer phi(x_t, eps, t -> t'), PNDM eq. 11 (the "pseudo" numerical step)."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        if self.config["prediction_type"] == "v_prediction":
            eps = np.sqrt(a_t) * eps + np.sqrt(b_t) * x
        sample_coeff = np.sqrt(a_prev / a_t)
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        return sample_coeff * x - (a_prev - a_t) * eps / denom
