"""Scheduler base class: diffusers-compatible config resolution, step-index bookkeeping, shared math.

Float conventions (mirroring diffusers on float32 latents): schedule tables are float32, per-step
coefficients are float32 scalars, and the update runs in float32 (float16 inputs are upcast for the
arithmetic and the result is cast back to the dtype diffusers would return).
"""

from __future__ import annotations

import copy
from typing import Any, TypeAlias

import numpy as np

from .betas import F32, sigma_to_alpha_sigma_t

#: One timestep: a Python number or a numpy scalar (an element of ``Scheduler.timesteps``).
Timestep: TypeAlias = float | np.floating | np.integer
#: ``add_noise`` also takes one timestep per batch entry.
Timesteps: TypeAlias = Timestep | np.ndarray
#: A schedule coefficient (alpha_t, sigma_t): a float32 scalar, or an array broadcast over the batch.
Coefficient: TypeAlias = np.floating | np.ndarray


def resolve_config(
    defaults: dict[str, Any], config: dict[str, Any] | None, overrides: dict[str, Any]
) -> dict[str, Any]:
    """What ``XScheduler.from_config(config, **overrides)`` passes to ``__init__``.

    Keys of the class's ``__init__`` (``defaults``) are taken from the config, unknown and private
    keys are ignored, keys listed in ``_use_default_values`` fall back to this class's defaults and
    the overrides win over everything.
    """
    config = dict(config or {})
    use_defaults = set(config.pop("_use_default_values", None) or ())
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected scheduler option(s): {sorted(unknown)}")
    resolved = copy.deepcopy(defaults)
    for key, value in config.items():
        if key in defaults and key not in use_defaults and not key.startswith("_"):
            resolved[key] = value
    resolved.update(overrides)
    return resolved


def work_dtype(*arrays: np.ndarray) -> np.dtype:
    """dtype the update runs in: at least float32."""
    return np.result_type(F32, *[np.asarray(a).dtype for a in arrays])


def as_work(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as an array of ``dtype`` (no copy when it already is one)."""
    return np.asarray(x).astype(dtype, copy=False)


def predict_x0(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_t: Coefficient, sigma_t: Coefficient
) -> np.ndarray:
    """Data prediction x0 from the network output, for x_t = alpha_t * x0 + sigma_t * eps.

    epsilon: DDPM (Ho et al. 2020); v_prediction: v = alpha_t * eps - sigma_t * x0 (Salimans & Ho
    2022, progressive distillation); sample: the network predicts x0 itself.
    """
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    raise ValueError(f"prediction_type={prediction_type!r} must be one of 'epsilon', 'sample' or 'v_prediction'")


def predict_eps(
    prediction_type: str,
    model_output: np.ndarray,
    sample: np.ndarray,
    alpha_t: Coefficient,
    sigma_t: Coefficient,
    x0: np.ndarray | None = None,
) -> np.ndarray:
    """Noise prediction eps from the network output (same parameterisations as :func:`predict_x0`)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        x0 = model_output if x0 is None else x0
        return (sample - alpha_t * x0) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise ValueError(f"prediction_type={prediction_type!r} must be one of 'epsilon', 'sample' or 'v_prediction'")


def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Saharia et al. 2022, Imagen sec. 2.3): clamp x0 per sample to the
    `ratio` quantile s of |x0| (s clamped to [1, max_value]) and divide by s."""
    dtype = sample.dtype
    x = sample.astype(work_dtype(sample))
    flat = x.reshape(x.shape[0], -1)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(x.dtype)
    s = np.minimum(np.maximum(s, 1), max_value).astype(x.dtype)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x.shape).astype(dtype)


def clip_or_threshold(x0: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """DDIM/LCM post-processing of x0: dynamic thresholding, else optional clipping to +-clip_sample_range."""
    if config.get("thresholding", False):
        return threshold_sample(x0, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    if config.get("clip_sample", False):
        r = config["clip_sample_range"]
        return np.clip(x0, -r, r).astype(x0.dtype)
    return x0


def as_timestep_list(timestep: Timesteps) -> np.ndarray:
    """A scalar timestep or one per batch entry, as a 1-D float32 array."""
    return np.asarray(timestep).reshape(-1).astype(F32)


def recent(history: list[np.ndarray | None], k: int) -> np.ndarray:
    """The k-th most recent entry (k = 1: the latest) of a multistep solver's model-output history."""
    entry = history[-k]
    if entry is None:
        raise RuntimeError(f"multistep history has no entry {k} steps back yet")
    return entry


def per_sample(coeff: np.ndarray, ndim: int) -> np.ndarray:
    """Shape per-timestep coefficients (k,) as (k, 1, ..., 1) to broadcast over (batch, ...) samples."""
    return coeff.reshape((-1,) + (1,) * max(ndim - 1, 0))


# The training noise schedule every diffusers scheduler takes, with diffusers' defaults.
TRAINING_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None
)


class Scheduler:
    """Numpy port of a diffusers scheduler (protocol used by the runtime pipelines).

    Loop::

        sched.set_timesteps(steps)
        sched.set_begin_index(0)  # optional (SDXL pipeline does it); img2img: t_start * order
        latents = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            model_in = sched.scale_model_input(latents, t)
            eps = unet(model_in, t)
            latents = sched.step(eps, t, latents, noise=rng.standard_normal(...) if sched.needs_noise else None)
    """

    #: diffusers' ``XScheduler.__init__`` keyword defaults; subclasses fill this in.
    DEFAULTS: dict[str, Any] = {}
    #: DPM-Solver/UniPC: a timestep that is not in the schedule maps to the last index.
    _missing_timestep_is_last = False

    order: int = 1
    needs_noise: bool = False

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        self.config: dict[str, Any] = resolve_config(self.DEFAULTS, config, overrides)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.arange(self.config["num_train_timesteps"])[::-1].astype(F32)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, **overrides: Any) -> Scheduler:
        return cls(config, **overrides)

    def _require(self, key: str, *allowed: Any) -> None:
        value = self.config[key]
        if value not in allowed:
            raise NotImplementedError(
                f"{type(self).__name__}: {key}={value!r} is not supported by the numpy runtime "
                f"(supported: {', '.join(repr(a) for a in allowed)})"
            )

    def _require_prediction(self, *allowed: str) -> None:
        pt = self.config["prediction_type"]
        if pt not in allowed:
            raise NotImplementedError(
                f"{type(self).__name__}: prediction_type={pt!r} is not supported (supported: {', '.join(allowed)})"
            )

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial latents (1 for the variance-preserving schedulers)."""
        return 1.0

    # -- step-index bookkeeping (diffusers' _step_index / _begin_index) --------------------------

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step`` call (None until the first call)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """First index of the loop (img2img/inpaint: ``t_start * order``); call after set_timesteps."""
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: Timestep) -> int:
        """Index of ``timestep`` in ``timesteps``; the second match if it repeats (so an img2img loop
        starting in the middle of a repeated pair does not skip a sigma), as diffusers."""
        matches = np.flatnonzero(self.timesteps == F32(timestep))
        if len(matches) == 0:
            if self._missing_timestep_is_last:
                return len(self.timesteps) - 1
            raise ValueError(f"timestep {timestep!r} is not in the schedule {self.timesteps.tolist()}")
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _init_step_index(self, timestep: Timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _require_step_index(self) -> int:
        """The current step index, which the first ``step``/``scale_model_input`` call sets."""
        if self._step_index is None:
            raise RuntimeError(f"{type(self).__name__}: no step index yet (step() has not been called)")
        return self._step_index

    def _current_step_index(self, timestep: Timestep) -> int:
        """The step index, initialised from ``timestep`` (or the begin index) on the first call."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._require_step_index()

    def _reset_indices(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _check_ready(self) -> int:
        """``num_inference_steps``, after checking that ``set_timesteps`` has set it."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps() before step()")
        return self.num_inference_steps

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """Schedule indices add_noise uses, with diffusers' precedence: timestep lookup when no begin
        index is set, else the current step index, else the begin index."""
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        if self._step_index is not None:
            return [self._step_index] * len(timesteps)
        return [self._begin_index] * len(timesteps)

    # -- protocol -------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """Input scaling of the denoiser; identity except for the sigma-space (Euler) schedulers."""
        return sample

    def step(
        self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:  # pragma: no cover - abstract
        """One reverse-diffusion step: x_t -> x_{t-1} (the next timestep of the schedule).

        Args:
            model_output: The denoiser's prediction at ``timestep`` (epsilon, v or x0, per the
                config's ``prediction_type``), guidance already applied.
            timestep: The current timestep, an element of ``timesteps``.
            sample: The current latents x_t.
            noise: Standard normal noise of ``sample``'s shape for stochastic schedulers
                (``needs_noise``); ignored (may be None) otherwise.

        Returns:
            The latents at the next timestep, in ``sample``'s dtype.
        """
        raise NotImplementedError

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timestep: Timesteps
    ) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _require_noise(self, noise: np.ndarray | None, sample: np.ndarray) -> np.ndarray:
        if noise is None:
            raise ValueError(
                f"{type(self).__name__}.step() is stochastic: pass noise=standard normal of shape {np.shape(sample)}"
            )
        noise = np.asarray(noise)
        if noise.shape != np.shape(sample):
            raise ValueError(f"noise shape {noise.shape} != sample shape {np.shape(sample)}")
        return noise

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_inference_steps={self.num_inference_steps})"


class AlphaScheduler(Scheduler):
    """Schedulers parameterised by alpha_bar_t at integer timesteps (DDIM, PNDM, LCM)."""

    alphas_cumprod: np.ndarray

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: Timesteps) -> np.ndarray:
        """Forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), in the input's dtype."""
        ts = as_timestep_list(timestep)
        ac = per_sample(self.alphas_cumprod.astype(original.dtype)[ts.astype(np.int64)], original.ndim)
        one = ac.dtype.type(1)
        return np.sqrt(ac) * original + np.sqrt(one - ac) * noise


class SigmaScheduler(Scheduler):
    """Schedulers indexed by step over a float32 ``sigmas`` table (Euler, DPM-Solver, UniPC)."""

    sigmas: np.ndarray
    _vp_add_noise = True  # DPM/UniPC: x_t = alpha_t x0 + sigma_t eps; Euler: x0 + sigma eps

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: Timesteps) -> np.ndarray:
        ts = as_timestep_list(timestep)
        sigma = per_sample(self.sigmas.astype(original.dtype)[self._noise_indices(ts)], original.ndim)
        if not self._vp_add_noise:
            return original + noise * sigma
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma)
        return alpha_t * original + sigma_t * noise
