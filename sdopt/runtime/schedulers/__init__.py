"""Diffusion schedulers in plain numpy, step-for-step equal to diffusers (no torch import).

    from sdopt.runtime.schedulers import make_scheduler
    sched = make_scheduler("dpm++2m-karras", json.load(open(".../scheduler/scheduler_config.json")))
    sched.set_timesteps(25)

``config`` may come from any diffusers scheduler class: like ``XScheduler.from_config`` only the
keys the target class knows are used and the rest take that class's defaults.
"""

from __future__ import annotations

from typing import Any

from .base import Scheduler
from .ddim import DDIMScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

#: user-facing name -> (class, from_config overrides)
_REGISTRY: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (LCMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: diffusers class name of each scheduler name (for reference tests and docs)
DIFFUSERS_CLASS_NAMES: dict[str, str] = {name: cls.__name__ for name, (cls, _) in _REGISTRY.items()}


def scheduler_overrides(name: str) -> dict[str, Any]:
    """The ``from_config`` keyword overrides that ``name`` implies (e.g. use_karras_sigmas=True)."""
    return dict(_lookup(name)[1])


def _lookup(name: str) -> tuple[type[Scheduler], dict[str, Any]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}") from None


def make_scheduler(name: str, config: dict[str, Any] | None = None) -> Scheduler:
    """Build scheduler ``name`` as diffusers' ``XScheduler.from_config(config, **overrides)`` would.

    Args:
        name: One of ``SCHEDULER_NAMES`` (e.g. "dpm++2m-karras").
        config: The content of a diffusers ``scheduler_config.json`` of any scheduler class;
            keys the target class does not know are ignored, missing ones take its defaults.

    Returns:
        A fresh scheduler; call ``set_timesteps`` before stepping.

    Raises:
        ValueError: for an unknown name.
        NotImplementedError: for config options this numpy port does not implement.
    """
    cls, overrides = _lookup(name)
    return cls.from_config(config or {}, **overrides)


__all__ = [
    "SCHEDULER_NAMES",
    "DIFFUSERS_CLASS_NAMES",
    "Scheduler",
    "make_scheduler",
    "scheduler_overrides",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
]
