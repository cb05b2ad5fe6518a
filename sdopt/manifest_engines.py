"""TensorRT engine records of the manifest (`Manifest.engines`): written by `sdopt build`, checked
by the runtime before it deserializes anything. Pure python, like the rest of the contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ShapeRange:
    """One engine input's (min, opt, max) shape in a TensorRT optimization profile."""

    min: list[int]
    opt: list[int]
    max: list[int]

    def contains(self, shape: tuple[int, ...] | list[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max, strict=True)
        )


@dataclass
class EngineFlags:
    """How an engine was built (`sdopt build` options). Defaults are what older manifests implied."""

    static: bool = False
    refittable: bool = False  # BuilderFlag.REFIT: weights can be replaced (sdopt.engines.trt.refit_engine)
    version_compatible: bool = False  # loads in later TensorRT; embeds a lean runtime (host code)
    exclude_lean_runtime: bool = False  # no embedded lean runtime; sdopt does not load such engines
    strongly_typed: bool = True
    tf32: bool = True  # BuilderFlag.TF32 (TensorRT's default): fp32 matmuls/convs may round to TF32
    opt_level: int = 3
    workspace_gb: float | None = None


@dataclass
class EngineEntry:
    """One TensorRT engine in the artifact, written by `sdopt build`, checked by the runtime before loading."""

    component: str
    path: str  # relative to the artifact root: engines/<gpu>_sm<cc>_trt<version>/<component>.plan
    sha256: str
    bytes: int
    tensorrt: str  # the TensorRT version that built it
    gpu: str  # the GPU model it was built (and tuned) on
    compute_capability: str  # "8.9"
    profiles: list[dict[str, ShapeRange]]  # input name -> range; the runtime uses profile 0
    flags: EngineFlags = field(default_factory=EngineFlags)
    build_seconds: float = 0.0
    created: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineEntry:
        """An entry from its JSON form (also reads the untyped dicts of earlier sdopt versions)."""
        d = dict(d)
        d["profiles"] = [{k: ShapeRange(**v) for k, v in p.items()} for p in d.get("profiles", [])]
        flags = d.get("flags") or {}
        d["flags"] = EngineFlags(**{k: v for k, v in flags.items() if k in EngineFlags.__dataclass_fields__})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


__all__ = ["EngineEntry", "EngineFlags", "ShapeRange"]
