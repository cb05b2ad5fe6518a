"""LoRA files -> weight deltas, without torch: diffusers/PEFT and kohya/A1111 `.safetensors`.

For each LoRA'd module, delta = scale * (alpha / r) * B @ A (reshaped to the weight's shape
for convolutions), summed over the files; the caller adds it to the base weight. This is
what diffusers' `load_lora_weights` + `fuse_lora(lora_scale=scale)` computes (PEFT's
`get_delta_weight`), and what `sdopt export --lora` and the runtime's hot-swap both use.

alpha per module: the file's `<module>.alpha` tensor (kohya), else PEFT's `lora_alpha` /
`alpha_pattern` from the `lora_adapter_metadata` header (what diffusers' `save_lora_weights`
writes), else r (scale 1). rank-stabilised LoRA (`use_rslora`) divides by sqrt(r).

All of a file or none of it: a key that names no module of this model, or a tensor whose
shape does not fit, fails the whole call with one SdoptError before any weight changes.
Only `.safetensors` files are read (no pickle: loading one runs arbitrary code).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdopt.errors import SdoptError
from sdopt.lora.blas import one_blas_thread
from sdopt.lora.keys import KeyRef, KeyResolver, unsupported_variant

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_SHOWN = 8  # unmatched keys listed in an error


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and its strength (diffusers' `lora_scale`)."""

    path: Path
    scale: float = 1.0


@dataclass
class LoraFile:
    """A LoRA file's tensors (float32) and its safetensors header metadata."""

    path: Path
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)


# component -> module path -> the module's weight shape (out, in[, kh, kw])
Targets = dict[str, dict[str, tuple[int, ...]]]
# component -> parameter name ("<module>.weight") -> float32 delta of that shape
Deltas = dict[str, dict[str, np.ndarray]]


def parse_lora_arg(text: str) -> LoraSpec:
    """`PATH[:SCALE]` (the CLI's --lora) -> LoraSpec; a tail that is no number stays in the path.

    Args:
        text: e.g. `style.safetensors:0.8`.
    Returns:
        The spec, scale 1.0 where none is given.
    """
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return LoraSpec(Path(head).expanduser(), float(tail))
        except ValueError:
            pass
    return LoraSpec(Path(text).expanduser(), 1.0)


def as_specs(loras: list[LoraSpec] | list[tuple[str | Path, float]] | None) -> list[LoraSpec]:
    """Accept LoraSpec or (path, scale) pairs (the Python API's `loras=[(path, scale), ...]`)."""
    out = []
    for item in loras or []:
        out.append(item if isinstance(item, LoraSpec) else LoraSpec(Path(item[0]).expanduser(), float(item[1])))
    return out


def read_lora_file(path: str | Path) -> LoraFile:
    """Read a `.safetensors` LoRA with safetensors' numpy API (no torch).

    Args:
        path: the file.
    Returns:
        Its tensors as float32 arrays and its header metadata.
    Raises:
        SdoptError: missing file, a pickle/.bin checkpoint, or a malformed file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SdoptError(f"LoRA file {path} does not exist", "check the path")
    _check_safetensors(path)
    from safetensors import SafetensorError, safe_open

    try:
        header = _read_header(path)
        bf16 = [k for k, v in header.items() if k != "__metadata__" and v.get("dtype") == "BF16"]
        tensors: dict[str, np.ndarray] = {}
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                if key not in bf16:
                    tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        tensors.update(_read_bf16(path, header, bf16))
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, struct.error) as e:
        raise SdoptError(
            f"LoRA file {path} is not a readable safetensors file ({str(e)[:200]})", "re-save it with safetensors"
        ) from e
    return LoraFile(path, tensors, metadata)


def _check_safetensors(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise SdoptError(
            f"{path} is a pickle checkpoint (.bin/.pt/.ckpt); sdopt reads LoRAs only from .safetensors "
            "(loading a pickle can run arbitrary code)",
            "convert it once in a trusted environment: safetensors.torch.save_file(torch.load(f), 'lora.safetensors')",
        )
    if len(head) < 9 or head[8:9] != b"{":
        raise SdoptError(f"{path} is not a safetensors file", "pass a LoRA saved as .safetensors")


def _read_header(path: Path) -> dict:
    """The safetensors JSON header: key -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return dict(json.loads(f.read(size)))


def _read_bf16(path: Path, header: dict, keys: list[str]) -> dict[str, np.ndarray]:
    """bfloat16 tensors (numpy has no bf16): the high half of a float32's bits."""
    if not keys:
        return {}
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        out = {}
        for key in keys:
            start, end = header[key]["data_offsets"]
            f.seek(8 + size + start)
            bits = np.frombuffer(f.read(end - start), dtype="<u2").astype(np.uint32) << 16
            out[key] = bits.view(np.float32).reshape(header[key]["shape"])
    return out


@dataclass
class _Module:
    """The tensors one file holds for one module."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key


@dataclass(frozen=True)
class _Term:
    """One file's share of one weight's delta: up @ down, `up` already times scale * alpha / r."""

    up: np.ndarray  # (out, rank) float32
    down: np.ndarray  # (rank, fan_in) float32


@dataclass
class DeltaPlan:
    """Every file checked against the model; each weight's delta computed only when asked.

    `delta` computes one weight's delta at a time, into a buffer the caller may reuse, so a
    swap never holds all deltas at once (a rank-16 sd15 LoRA's deltas are 1.4 GB of float32).
    The export merge (`compute_deltas`) goes through the same calls: the same bits.
    """

    shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # component -> param -> shape
    terms: dict[str, dict[str, list[_Term]]] = field(default_factory=dict)

    def params(self, component: str) -> list[str]:
        """The "<module>.weight" names a delta exists for in `component`."""
        return list(self.terms.get(component, {}))

    def delta(self, component: str, param: str, out: np.ndarray | None = None) -> np.ndarray:
        """float32 sum over the files of scale * (alpha / r) * B @ A, in the weight's shape.

        Args:
            component: e.g. "unet".
            param: "<module>.weight".
            out: a float32 C-contiguous buffer of at least the weight's size to write into (else a new array).
        Returns:
            The delta (a view of `out` where given).
        """
        shape = self.shapes[component][param]
        size = int(np.prod(shape))
        acc = np.empty(size, np.float32) if out is None else out.reshape(-1)[:size]
        terms = self.terms[component][param]
        product = acc.reshape(terms[0].up.shape[0], terms[0].down.shape[1])
        with one_blas_thread():
            np.matmul(terms[0].up, terms[0].down, out=product)  # one sgemm, written in place
            if len(terms) > 1:  # stacked files
                extra = np.empty_like(product)
                for term in terms[1:]:
                    np.matmul(term.up, term.down, out=extra)
                    product += extra
        return acc.reshape(shape)


def plan_deltas(loras: list[LoraSpec], targets: Targets, ignore_unmatched: bool = False) -> DeltaPlan:
    """Read and check every file; the deltas themselves come later from `DeltaPlan.delta`.

    Args:
        loras: the files and their scales, applied together (stacked).
        targets: the model's LoRA-able modules and their weight shapes, per component.
        ignore_unmatched: skip keys that name no module of this model instead of failing.
    Returns:
        The plan; empty for no LoRAs.
    Raises:
        SdoptError: any file that does not fit this model (nothing is applied then).
    """
    resolver = KeyResolver({c: list(m) for c, m in targets.items()})
    plan = DeltaPlan()
    for spec in loras:
        lora = read_lora_file(spec.path)
        modules = _group(lora, resolver, ignore_unmatched)
        config = _peft_config(lora)
        for (component, module), parts in modules.items():
            shape = targets[component][module]
            up, down, factor = _checked(lora.path, component, module, parts, shape, config.get(component))
            name = module + ".weight"
            plan.shapes.setdefault(component, {})[name] = tuple(shape)
            scaled = (up * factor) * np.float32(spec.scale)  # (out, rank): cheaper than scaling B @ A
            plan.terms.setdefault(component, {}).setdefault(name, []).append(_Term(scaled, down))
    return plan


def compute_deltas(loras: list[LoraSpec], targets: Targets, ignore_unmatched: bool = False) -> Deltas:
    """Sum of every file's scale * (alpha / r) * B @ A per LoRA'd weight, all at once.

    The same numbers as `plan_deltas(...).delta` (it is computed by it), for callers that
    want every delta in memory (the export merge).

    Args:
        loras: the files and their scales, applied together (stacked).
        targets: the model's LoRA-able modules and their weight shapes, per component.
        ignore_unmatched: skip keys that name no module of this model instead of failing.
    Returns:
        component -> "<module>.weight" -> float32 delta; empty for no LoRAs.
    Raises:
        SdoptError: any file that does not fit this model (nothing is applied then).
    """
    plan = plan_deltas(loras, targets, ignore_unmatched)
    return {c: {p: plan.delta(c, p) for p in plan.params(c)} for c in plan.terms}


def _group(lora: LoraFile, resolver: KeyResolver, ignore_unmatched: bool) -> dict[tuple[str, str], _Module]:
    modules: dict[tuple[str, str], _Module] = {}
    unmatched: list[str] = []
    for key, tensor in lora.tensors.items():
        variant = unsupported_variant(key)
        if variant:
            raise SdoptError(
                f"{lora.path} is a {variant} file (key {key}); sdopt applies plain LoRA only",
                "use a plain LoRA, or merge this one into the model with its own tools first",
            )
        ref: KeyRef | None = resolver.resolve(key)
        if ref is None:
            unmatched.append(key)
            continue
        part = modules.setdefault((ref.component, ref.module), _Module())
        part.keys[ref.role] = key
        if ref.role == "alpha":
            part.alpha = float(tensor.reshape(-1)[0])
        else:
            setattr(part, ref.role, tensor)
    if unmatched and not ignore_unmatched:
        more = f" and {len(unmatched) - _SHOWN} more" if len(unmatched) > _SHOWN else ""
        raise SdoptError(
            f"{len(unmatched)} of {len(lora.tensors)} keys in {lora.path.name} match no module of this "
            f"model: {', '.join(unmatched[:_SHOWN])}{more}",
            "use a LoRA made for this model family, or pass --lora-ignore-unmatched "
            "(ignore_unmatched=True) to apply the rest",
        )
    if not any(m.down is not None or m.up is not None for m in modules.values()):
        raise SdoptError(
            f"{lora.path} holds no LoRA weights this model can use", "pass a LoRA file for this model family"
        )
    return modules


def _checked(
    path: Path, component: str, module: str, parts: _Module, shape: tuple[int, ...], config: dict | None
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(B as (out, rank), A as (rank, fan_in), alpha / r) of one module, checked against the weight's shape."""
    for role, other in (("down", "up"), ("up", "down")):
        if getattr(parts, role) is None:
            raise SdoptError(
                f"{path.name}: {parts.keys.get(other, module)} has no matching lora {role} tensor",
                "the file is incomplete; re-save it",
            )
    down, up = parts.down, parts.up
    assert down is not None and up is not None
    rank = down.shape[0]
    fan_in = int(np.prod(shape[1:]))
    expected_down = (rank, *shape[1:]) if down.ndim == len(shape) else (rank, fan_in)
    expected_up = (shape[0], rank, *[1] * (up.ndim - 2))
    for role, tensor, expected in (("down", down, expected_down), ("up", up, expected_up)):
        if tuple(tensor.shape) != expected or tensor.size != int(np.prod(expected)):
            raise SdoptError(
                f"{path.name}: {parts.keys[role]} has shape {tuple(tensor.shape)}, but the model's "
                f"{component}.{module}.weight of shape {tuple(shape)} needs {expected}",
                "this LoRA is for another model family or size: use one made for this model",
            )
    alpha, scaling_rank = _alpha_rank(module, parts.alpha, rank, config)
    divisor = math.sqrt(scaling_rank) if config and config.get("use_rslora") else scaling_rank
    b = np.ascontiguousarray(up.reshape(shape[0], rank), dtype=np.float32)
    a = np.ascontiguousarray(down.reshape(rank, fan_in), dtype=np.float32)
    return b, a, np.float32(alpha / divisor)


def _alpha_rank(module: str, file_alpha: float | None, rank: int, config: dict | None) -> tuple[float, int]:
    if file_alpha is not None:
        return file_alpha, rank
    if not config:
        return float(rank), rank
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r)))
    return alpha, r


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_config(lora: LoraFile) -> dict[str, dict]:
    """component -> its LoraConfig fields, from diffusers' `lora_adapter_metadata` header."""
    raw = lora.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise SdoptError(f"{lora.path}: its {METADATA_KEY} header is not JSON", "re-save the LoRA") from None
    config: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        config.setdefault(component, {})[name] = value
    for component, fields in config.items():
        if fields.get("use_dora"):
            raise SdoptError(
                f"{lora.path} is a DoRA adapter ({component}); sdopt applies plain LoRA only", "use a plain LoRA"
            )
    return config
