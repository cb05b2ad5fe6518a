"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): multistep UniP predictor + UniC corrector, B(h) variants bh1/bh2 (Algorithms 1-2)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    TRAINING_DEFAULTS,
    SigmaScheduler,
    Timestep,
    as_work,
    predict_eps,
    predict_x0,
    recent,
    threshold_sample,
    work_dtype,
)
from .betas import (
    F32,
    expm1_32,
    final_sigma,
    interp_sigmas,
    karras_sigmas,
    log_snr,
    multistep_timesteps,
    sigma_space_alphas_cumprod,
    sigma_to_t,
    train_sigmas,
)


class UniPCMultistepScheduler(SigmaScheduler):
    """Port of ``diffusers.UniPCMultistepScheduler`` (any solver_order, bh1/bh2, predict_x0 or not)."""

    DEFAULTS = dict(
        **TRAINING_DEFAULTS,
        solver_order=2,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        disable_corrector=[],
        solver_p=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        timestep_spacing="linspace",
        steps_offset=0,
        final_sigmas_type="zero",
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
        sigma_min=None,
        sigma_max=None,
        shift_terminal=None,
    )
    _missing_timestep_is_last = True

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg["solver_type"] in ("midpoint", "heun", "logrho"):  # diffusers' remap of DPM-Solver configs
            cfg["solver_type"] = "bh2"
        self._require("solver_type", "bh1", "bh2")
        self._require_prediction("epsilon", "sample", "v_prediction")
        for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
            self._require(key, False, None)
        self._require("solver_p", None)
        self._require("final_sigmas_type", "zero", "sigma_min")

        self.alphas_cumprod = sigma_space_alphas_cumprod(cfg)
        self.sigmas = train_sigmas(self.alphas_cumprod)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0
        self.last_sample: np.ndarray | None = None
        self.this_order = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = num_inference_steps
        timesteps = multistep_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"])
        sigmas = train_sigmas(self.alphas_cumprod)
        if cfg["use_karras_sigmas"]:
            sig = karras_sigmas(sigmas[::-1], n, cfg["sigma_min"], cfg["sigma_max"])
            timesteps = sigma_to_t(sig, np.log(sigmas)).round()
            # diffusers' UniPC ends a Karras schedule on its own last sigma, not the training minimum.
            sigma_last = sig[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            sig = interp_sigmas(timesteps, sigmas)
            sigma_last = final_sigma(cfg, self.alphas_cumprod)
        self.sigmas = np.concatenate([sig, [sigma_last]]).astype(F32)
        self.timesteps = timesteps.astype(np.int64).astype(F32)
        self.num_inference_steps = len(timesteps)
        self._reset_history()
        self._reset_indices()

    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x0 prediction (predict_x0, the data-prediction UniPC) or eps prediction (noise form)."""
        alpha_t, sigma_t, _ = log_snr(self.sigmas[self._require_step_index()])
        pt = self.config["prediction_type"]
        if not self.config["predict_x0"]:
            return predict_eps(pt, model_output, sample, alpha_t, sigma_t)
        x0 = predict_x0(pt, model_output, sample, alpha_t, sigma_t)
        if self.config["thresholding"]:
            x0 = threshold_sample(x0, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"])
        return x0

    def _bh_update(
        self, x: np.ndarray, m0: np.ndarray, order: int, t_idx: int, s0_idx: int, past: list[tuple[int, np.ndarray]]
    ) -> tuple[np.ndarray, np.floating, list[np.ndarray], np.ndarray, np.ndarray]:
        """Shared UniP/UniC algebra for a step from sigmas[s0_idx] to sigmas[t_idx].

        ``past`` lists (sigma index, model output) of the earlier points; returns
        (x_t_ = the first-order (DDIM-like) update, coefficient of the correction, D1s, R, b) where
        R_{k,j} = r_j^k and b_k = phi_{k+1}(hh) k! / B(h) are the order conditions of UniPC eq. (6)-(8).
        """
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[t_idx])
        alpha_s0, sigma_s0, lambda_s0 = log_snr(self.sigmas[s0_idx])
        h = lambda_t - lambda_s0
        rk_list: list[np.floating] = []
        d1s: list[np.ndarray] = []
        for si, mi in past:
            _, _, lambda_si = log_snr(self.sigmas[si])
            rk = (lambda_si - lambda_s0) / h
            rk_list.append(rk)
            d1s.append((mi - m0) / rk)
        rks = np.array(rk_list + [F32(1)], dtype=F32)

        hh = -h if self.config["predict_x0"] else h
        h_phi_1 = expm1_32(hh)
        h_phi_k = h_phi_1 / hh - F32(1)
        b_h = hh if self.config["solver_type"] == "bh1" else expm1_32(hh)
        R_rows: list[np.ndarray] = []
        b_list: list[np.floating] = []
        factorial_i = 1
        for k in range(1, order + 1):
            R_rows.append(rks ** (k - 1))
            b_list.append(h_phi_k * F32(factorial_i) / b_h)
            factorial_i *= k + 1
            h_phi_k = h_phi_k / hh - F32(1 / factorial_i)
        R, b = np.stack(R_rows).astype(F32), np.array(b_list, dtype=F32)

        if self.config["predict_x0"]:
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            coeff = alpha_t * b_h
        else:
            x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
            coeff = sigma_t * b_h
        return x_t_, coeff, d1s, R, b

    @staticmethod
    def _weighted_sum(rhos: np.ndarray, d1s: list[np.ndarray]) -> np.ndarray | int:
        """sum_k rhos[k] * d1s[k], accumulated left to right from the integer 0 (0 when empty)."""
        total: np.ndarray | int = 0
        for rho, d in zip(rhos, d1s, strict=True):
            total = total + rho * d
        return total

    def _predictor(self, x: np.ndarray, order: int) -> np.ndarray:
        """UniP-p: x_t = x_t_ - B(h) * sum_k rho_k D1_k, rho from the first order-1 conditions
        (rho = 1/2 at order 2)."""
        i = self._require_step_index()
        m0 = recent(self.model_outputs, 1)
        past = [(i - k, recent(self.model_outputs, k + 1)) for k in range(1, order)]
        x_t_, coeff, d1s, R, b = self._bh_update(x, m0, order, i + 1, i, past)
        if not d1s:
            return x_t_
        rhos = np.array([0.5], dtype=F32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
        return x_t_ - coeff * self._weighted_sum(rhos, d1s)

    def _corrector(self, model_t: np.ndarray, last_sample: np.ndarray, order: int) -> np.ndarray:
        """UniC-p: re-solve the previous step with the new model output model_t at the arrival point."""
        i = self._require_step_index()
        m0 = recent(self.model_outputs, 1)
        past = [(i - (k + 1), recent(self.model_outputs, k + 1)) for k in range(1, order)]
        x_t_, coeff, d1s, R, b = self._bh_update(last_sample, m0, order, i, i - 1, past)
        rhos = np.array([0.5], dtype=F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
        corr = self._weighted_sum(rhos[:-1], d1s)
        return x_t_ - coeff * (corr + rhos[-1] * (model_t - m0))

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        self._check_ready()
        cfg, i = self.config, self._current_step_index(timestep)
        dtype = work_dtype(model_output, sample)
        x = as_work(sample, dtype)
        use_corrector = i > 0 and (i - 1) not in cfg["disable_corrector"]
        converted = self._convert_model_output(as_work(model_output, dtype), x)
        if use_corrector and self.last_sample is not None:
            x = self._corrector(converted, self.last_sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [converted]

        order = min(cfg["solver_order"], len(self.timesteps) - i) if cfg["lower_order_final"] else cfg["solver_order"]
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = x
        prev = self._predictor(x, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg["solver_order"])
        self._step_index = i + 1
        return prev.astype(np.result_type(sample), copy=False)
