"""Noise schedules shared by the schedulers: betas, alpha cumprod, timestep spacing, sigmas.

Everything here reproduces diffusers' schedule arithmetic value for value: diffusers builds the
betas as float32 torch tensors, reduces the cumulative product in float64 and stores float32, then
does the timestep/sigma work in float64 numpy and stores float32 again. numpy only, no torch.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np

F32 = np.float32

#: A float32 scalar (the step math) or an array of them (add_noise).
_Sigma = TypeVar("_Sigma", np.floating, np.ndarray)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 ``torch.linspace``: fills from both ends with a fused multiply-add, like torch's CPU kernel.

    Bit-identical to ``torch.linspace(start, stop, num, dtype=torch.float32)`` (a plain float64
    ``np.linspace`` cast to float32 differs in the last bit for about a third of the entries).
    """
    start32, stop32 = F32(start), F32(stop)
    if num == 1:
        return np.array([start32], dtype=F32)
    step = F32((stop32 - start32) / F32(num - 1))
    i = np.arange(num)
    # The products step*i are exact in float64, so this is the single rounding of an FMA.
    head = np.float64(start32) + np.float64(step) * i
    tail = np.float64(stop32) - np.float64(step) * (num - 1 - i)
    return np.where(i < num // 2, head, tail).astype(F32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule ("squaredcos_cap_v2"), Nichol & Dhariwal 2021 eq. 17, betas capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1), in float32 like diffusers."""
    alphas_bar_sqrt = np.sqrt(make_alphas_cumprod(betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (F32(1) - alphas).astype(F32)


def make_betas(config: dict[str, Any]) -> np.ndarray:
    """float32 betas from a resolved scheduler config (trained_betas win over beta_schedule)."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64).astype(F32)
    elif config["beta_schedule"] == "linear":
        betas = linspace_f32(config["beta_start"], config["beta_end"], n)
    elif config["beta_schedule"] == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        root = linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n)
        betas = root * root
    elif config["beta_schedule"] == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise NotImplementedError(
            f"beta_schedule={config['beta_schedule']!r} is not implemented (choose one of {BETA_SCHEDULES})"
        )
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def make_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM, Ho et al. 2020); float64 accumulation, float32 result
    (what torch.cumprod does on CPU)."""
    alphas = (F32(1) - betas).astype(F32)
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def sigma_space_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """alpha_bar_t of the training schedule for the sigma-space schedulers (Euler, DPM-Solver, UniPC).

    With zero-terminal-SNR rescaling alpha_bar at the last training step is 0, so its sigma
    sqrt((1 - alpha_bar) / alpha_bar) would be infinite; diffusers sets it to 2**-24 instead
    (float32's smallest normal step above 0 near 1e-7), and so do we.
    """
    alphas_cumprod = make_alphas_cumprod(make_betas(config))
    if config["rescale_betas_zero_snr"]:
        alphas_cumprod[-1] = F32(2**-24)
    return alphas_cumprod


def final_sigma(config: dict[str, Any], alphas_cumprod: np.ndarray) -> np.floating | float:
    """The sigma appended after the last inference step (diffusers' `final_sigmas_type`).

    Returns:
        0 for "zero"; for "sigma_min" the training schedule's smallest sigma,
        sqrt((1 - alpha_bar_0) / alpha_bar_0).
    """
    if config.get("final_sigmas_type", "zero") != "sigma_min":
        return 0.0
    a0 = alphas_cumprod[0]
    return np.sqrt((F32(1) - a0) / a0)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Variance-exploding noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float32, ascending in t."""
    return np.sqrt((F32(1) - alphas_cumprod) / alphas_cumprod).astype(F32)


def spaced_timesteps(
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int = 0,
    *,
    round_linspace: bool = True,
) -> np.ndarray:
    """Descending float64 inference timesteps for DDIM/Euler/PNDM-style schedulers.

    Spacings follow Lin et al. 2023, Table 2: "linspace" (rounded unless round_linspace=False, as
    in the Euler schedulers), "leading" (+ steps_offset), "trailing".
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported (choose one of {TIMESTEP_SPACINGS})")


def multistep_timesteps(
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """Descending float64 timesteps of the DPM-Solver/UniPC schedulers: an (n + 1)-point grid up to
    last_timestep with its final point dropped (different from :func:`spaced_timesteps`)."""
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        return (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round() - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported (choose one of {TIMESTEP_SPACINGS})")


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Linear interpolation of the training sigmas at (possibly fractional) timesteps; float64."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(
    in_sigmas: np.ndarray,
    num_inference_steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> np.ndarray:
    """Karras et al. 2022 ("Elucidating the Design Space...") eq. 5: sigmas evenly spaced in sigma^(1/rho).

    sigma_min/sigma_max default to in_sigmas[-1]/in_sigmas[0], as in diffusers.
    """
    sigma_min = float(in_sigmas[-1]) if sigma_min is None else sigma_min
    sigma_max = float(in_sigmas[0]) if sigma_max is None else sigma_max
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Invert sigma(t): piecewise-linear interpolation of log-sigma over the training timesteps
    (diffusers' ``_sigma_to_t``, vectorised over sigmas; float64 result)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def sigma_to_alpha_sigma_t(sigma: _Sigma) -> tuple[_Sigma, _Sigma]:
    """VP coefficients of a VE noise level: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t.

    Works on float32 scalars (step math) and arrays (add_noise); keeps the input's dtype.
    """
    one = np.result_type(sigma).type(1)
    alpha_t = one / np.sqrt(sigma * sigma + one)
    return alpha_t, sigma * alpha_t


def log32(x: float | np.floating) -> np.floating:
    """float32 log via float64 (matches torch's CPU float32 log); log(0) = -inf without a warning."""
    with np.errstate(divide="ignore"):
        return F32(np.log(np.float64(x)))


def exp32(x: float | np.floating) -> np.floating:
    """float32 exp via float64."""
    return F32(np.exp(np.float64(x)))


def expm1_32(x: float | np.floating) -> np.floating:
    """float32 expm1 via float64."""
    return F32(np.expm1(np.float64(x)))


def log_snr(sigma: float | np.floating) -> tuple[np.floating, np.floating, np.floating]:
    """(alpha_t, sigma_t, lambda_t = log(alpha_t) - log(sigma_t)) of a float32 VE sigma; the half
    log-SNR lambda is the time variable of DPM-Solver (Lu et al. 2022) and UniPC (Zhao et al. 2023)."""
    alpha_t, sigma_t = sigma_to_alpha_sigma_t(F32(sigma))
    return alpha_t, sigma_t, F32(log32(alpha_t) - log32(sigma_t))
