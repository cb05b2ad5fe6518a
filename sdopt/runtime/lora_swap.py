"""LoRA hot-swap in the runtime: merged weights into new engine sessions, old ones untouched.

`set_loras` computes each LoRA'd weight W + delta (`sdopt.lora.files`), in the layout and
dtype of the component's ONNX initializer (the manifest's weight map says which initializer
holds each weight and whether transposed), and creates new sessions for only the components
whose weights change, with those initializers overridden (ONNX Runtime's
`SessionOptions.add_initializer`). The base weights are read from the artifact's own graph
file, never kept in memory; `set_loras([])` re-creates the base sessions exactly as `load`
did, so the images are byte-identical to those before any LoRA.

Graph: where the export found every overridden weight in ONNX Runtime's saved optimised CPU
graph (MatMul weights under their own names, convolutions re-laid out in NCHWc blocks under
new names: `sdopt.lora.layout`), the session starts from that graph with the values in its layout
(seconds); otherwise from the original `model.onnx`, which ONNX Runtime optimises at session
creation (slower on large models).

Threads: the new sessions are built while calls go on with the old ones; then a
readers-writer lock swaps them in once no call is in flight, and calls that start meanwhile
wait. A call holds the read side for its whole length, so no call sees a mix of weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.lora.files import DeltaPlan, LoraSpec, Targets, as_specs, plan_deltas
from sdopt.lora.layout import to_layout
from sdopt.lora.onnx_weights import initializer_locations
from sdopt.manifest import Manifest

LORA_TARGETS = ("unet", "text_encoder", "text_encoder_2")  # what LoRA files name
SHARES_WEIGHTS = {"unet_shallow": "unet", "unet_deep": "unet"}  # graphs over (part of) another's weights


@dataclass
class Overrides:
    """One component's LoRA'd initializers: name -> value in the graph's layout and dtype,
    for model.onnx, or (`optimised`) for the saved ORT-optimised CPU graph (its names and
    NCHWc layouts)."""

    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    optimised: bool = False


def manifest_targets(manifest: Manifest) -> Targets:
    """The LoRA-able modules and weight shapes the artifact recorded (its weight map).

    Args:
        manifest: the artifact's manifest.
    Returns:
        component -> module path -> weight shape.
    """
    targets: Targets = {}
    for name in LORA_TARGETS:
        comp = manifest.components.get(name)
        if comp is not None and comp.weights:
            targets[name] = {k[: -len(".weight")]: tuple(r.shape) for k, r in comp.weights.items()}
    return targets


def check_swappable(manifest: Manifest) -> None:
    if not manifest_targets(manifest):
        raise SdoptError(
            "this artifact has no weight map for LoRA (exported before sdopt recorded one)",
            "re-export it with `sdopt export --force`, or merge the LoRA at export: sdopt export --lora",
        )


def build_overrides(
    root: Path,
    manifest: Manifest,
    deltas: DeltaPlan,
    optimised: Callable[[str], bool] = lambda name: False,
    names: list[str] | None = None,
) -> dict[str, Overrides]:
    """component -> its overridden initializers, for every graph a delta touches.

    Memory: each merged value is the one new array a weight needs (its base read from the
    graph's data file, the delta added in place); the deltas go through one reused buffer.
    Fresh memory is what the first swap in a process pays for (page faults), so a swap
    touches little more of it than the new sessions keep.

    Args:
        root: the artifact folder.
        manifest: its manifest.
        deltas: from `plan_deltas`.
        optimised: whether the backend loads a component from its saved ORT-optimised graph;
            where it does and the export found every changed weight there, the values are
            computed in that graph's names and layouts, from its own (page-cached) file.
        names: the components to compute (default: those the runtime loads).
    Returns:
        Only components with at least one changed weight.
    """
    out: dict[str, Overrides] = {}
    scratch = _Scratch()
    for name in names if names is not None else manifest.runtime_components():
        comp = manifest.components[name]
        source = SHARES_WEIGHTS.get(name, name)
        refs = {param: comp.weights[param] for param in deltas.params(source) if param in comp.weights}
        if not refs:
            continue
        folded = [param for param, ref in refs.items() if not ref.initializer]
        if folded:
            raise SdoptError(
                f"the export folded {name}.{folded[0]} into another constant, so a LoRA cannot be "
                "swapped into it at run time",
                "merge this LoRA at export instead: sdopt export --lora FILE",
            )
        fast = bool(comp.ort_cpu_path) and optimised(name) and all(r.ort_cpu for r in refs.values())
        graph = str(comp.ort_cpu_path) if fast else comp.path
        by_init = {(r.ort_cpu_initializer or r.initializer) if fast else r.initializer: p for p, r in refs.items()}
        locations = initializer_locations(root / graph, set(by_init))
        values = {}
        for init, param in by_init.items():
            ref = refs[param]
            delta = deltas.delta(source, param, scratch.get(int(np.prod(ref.shape))))
            layout = ref.ort_cpu_layout if fast else ""
            values[init] = merged(locations[init].mapped(), to_layout(delta.T if ref.transposed else delta, layout))
        out[name] = Overrides(values, fast)
    return out


class _Scratch:
    """One float32 buffer, grown to the largest delta, reused for every weight of a swap."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, np.float32)

    def get(self, size: int) -> np.ndarray:
        if self.buffer.size < size:
            self.buffer = np.empty(size, np.float32)
        return self.buffer


def merged(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """base + delta in the base's dtype: float32(base) + delta, rounded back (fp16: clipped to its range).

    Args:
        base: a weight as stored (e.g. memory-mapped from the graph's data file; only read).
        delta: float32, the base's shape (any strides).
    Returns:
        A new C-contiguous array: the merged weight, the only new memory a weight needs.
    """
    if base.dtype == np.float32:
        out = np.empty(base.shape, np.float32)
        np.add(base, delta, out=out)  # the same float32 additions as below, straight into the result
        return out
    result = np.asarray(base).astype(np.float32) + delta
    if base.dtype == np.float16:
        result = np.clip(result, -65504.0, 65504.0)
    return np.ascontiguousarray(result.astype(base.dtype, copy=False))


def ort_model_with(
    ort: Any, options: Any, path: Path, initializers: dict[str, np.ndarray], optimised_graph: bool
) -> tuple[str | bytes, list[Any]]:
    """The model argument for `ort.InferenceSession` with these initializer values, and the
    buffers that must outlive the session.

    ONNX Runtime applies `add_initializer` values only after its graph optimisations (which
    read and re-lay out convolution weights from the graph itself), so that API is used
    only on the saved optimised graph, for the names it keeps unchanged (`WeightRef.ort_cpu`).
    On the original graph the values go in before optimisation: external-data initializers
    through `add_external_initializers`, inline ones by patching their bytes (same size) in
    a copy of the file, which is then loaded from memory.

    Args:
        ort: the onnxruntime module.
        options: the SessionOptions, updated in place.
        path: the graph file the session would load.
        initializers: name -> value in the initializer's layout and dtype.
        optimised_graph: `path` is the saved ORT-optimised graph.
    Returns:
        (path or model bytes, buffers to keep alive).
    """
    keep: list[Any] = []
    if optimised_graph:
        for name, value in initializers.items():
            keep.append((value, ort.OrtValue.ortvalue_from_numpy(value)))
            options.add_initializer(name, keep[-1][1])
        return str(path), keep
    locations = initializer_locations(path, set(initializers))
    external = {n: v for n, v in initializers.items() if locations[n].file != path}
    if external:
        keep = [(v, ort.OrtValue.ortvalue_from_numpy(v)) for v in external.values()]
        options.add_external_initializers(list(external), [k[1] for k in keep])
    inline = {n: v for n, v in initializers.items() if n not in external}
    if not inline:
        return str(path), keep
    if external:
        raise SdoptError(f"{path} mixes inline and external LoRA target weights", "re-export the artifact")
    data = bytearray(path.read_bytes())
    for name, value in inline.items():
        raw = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        offset = locations[name].offset
        data[offset : offset + len(raw)] = raw
    return bytes(data), keep


class SwapLock:
    """Readers-writer lock: many calls at once, or one swap; a waiting swap goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting_writers = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Held by a call for its whole length (re-entrant per call path is not needed)."""
        with self._cond:
            while self._writing or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Waits for in-flight calls to finish; calls arriving meanwhile wait for the swap."""
        with self._cond:
            self._waiting_writers += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class LoraSwapper:
    """The pipeline's LoRA state: which files are applied, and the swap itself.

    ONNX Runtime: new sessions for the changed components, swapped in between calls.
    TensorRT (sessions with `refit`, engines built `--refittable`): the engines are refitted in
    place with the same merged values while no call runs (`sdopt.runtime.lora_refit`).
    """

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        backend: Any,
        entry: Callable[[str, Any], tuple[str, Any]],
        role: Callable[[str], str] = lambda name: name,
        names: list[str] | None = None,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.entry = entry  # (component, engine session) -> (pipeline role, adapted session)
        self.role = role  # component -> the pipeline's key for its session
        self.names = names  # the components the pipeline loaded (default: manifest.runtime_components())
        self.lock = SwapLock()
        self.loras: list[LoraSpec] = []
        self._applied: set[str] = set()  # components whose sessions carry LoRA weights
        self._refitted: dict[str, set[str]] = {}  # TensorRT: initializers refitted away from the base
        self.refit_partners: dict[str, list[str]] = {}  # TensorRT, last refit: fused partner weights set too
        # Last swap's seconds: "weights" (read the files, B @ A, read the base weights, merge),
        # "engines" (new sessions, or the refit), "swap_in" (waiting for calls in flight, then the swap).
        self.timings: dict[str, float] = {}
        self._swap = threading.Lock()  # one swap at a time

    def overrides(self, specs: list[LoraSpec], ignore_unmatched: bool = False) -> dict[str, Overrides]:
        """The merged initializer values `specs` give each component (empty for none).

        Raises:
            SdoptError: a file that does not fit; nothing has changed then.
        """
        if not specs:
            return {}
        check_swappable(self.manifest)
        deltas = plan_deltas(specs, manifest_targets(self.manifest), ignore_unmatched)
        optimised = getattr(self.backend, "optimised_graph", lambda name: False)
        return build_overrides(self.root, self.manifest, deltas, optimised, self.names)

    @property
    def refits(self) -> bool:
        """True where the backend changes weights by refitting engines, not by new sessions."""
        return getattr(self.backend, "load_with_initializers", None) is None

    def new_sessions(self, overrides: dict[str, Overrides]) -> dict[str, Any]:
        """Sessions for every component whose weights differ between the applied LoRAs and `overrides`."""
        new: dict[str, Any] = {}
        for name in sorted(self._applied | set(overrides)):
            if name in overrides:
                session = self.backend.load_with_initializers(
                    name, overrides[name].initializers, overrides[name].optimised
                )
            else:
                session = self.backend.load(name)
            new.update([self.entry(name, session)])
        return new

    def _refit(self, sessions: dict[str, Any], overrides: dict[str, Overrides]) -> None:
        from sdopt.runtime.lora_refit import refit_sessions

        by_name = {name: sessions[self.role(name)] for name in set(overrides) | set(self._refitted)}
        self.refit_partners = {}
        self._refitted = refit_sessions(
            self.root, self.manifest, by_name, overrides, self._refitted, self.refit_partners
        )

    def start(
        self,
        specs: list[LoraSpec] | list[tuple[str | Path, float]],
        ignore_unmatched: bool = False,
    ) -> dict[str, Any]:
        """The LoRA'd sessions for a pipeline being loaded (the caller loads the rest).

        Args:
            specs: LoraSpec or (path, scale) pairs; may be empty.
            ignore_unmatched: skip keys that match no module instead of failing.
        Returns:
            component -> session, for the components the LoRAs change.
        """
        specs = as_specs(specs)
        overrides = self.overrides(specs, ignore_unmatched)
        if self.refits:
            sessions = dict(self.entry(name, self.backend.load(name)) for name in overrides)
            self._refit(sessions, overrides)
        else:
            sessions = self.new_sessions(overrides)
        self.loras, self._applied = specs, set(overrides)
        return sessions

    def apply(
        self,
        sessions: dict[str, Any],
        specs: list[LoraSpec] | list[tuple[str | Path, float]],
        ignore_unmatched: bool = False,
    ) -> None:
        """Apply `specs` to the pipeline's `sessions` (updated in place) between calls.

        Args:
            sessions: the pipeline's component -> session dict.
            specs: LoraSpec or (path, scale) pairs; [] restores the base weights.
            ignore_unmatched: skip keys that match no module instead of failing.
        Raises:
            SdoptError: a file that does not fit (nothing changed), or a backend that refuses.
        """
        specs = as_specs(specs)
        with self._swap:
            t0 = time.perf_counter()
            overrides = self.overrides(specs, ignore_unmatched)
            t1 = time.perf_counter()
            if self.refits:
                with self.lock.writing():  # refitting changes engines in place: no call may run
                    self._refit(sessions, overrides)
                    self.loras, self._applied = specs, set(overrides)
                self.timings = {"weights": t1 - t0, "engines": time.perf_counter() - t1}
                return
            new = self.new_sessions(overrides)
            t2 = time.perf_counter()
            with self.lock.writing():
                sessions.update(new)
                self.loras, self._applied = specs, set(overrides)
            self.timings = {"weights": t1 - t0, "engines": t2 - t1, "swap_in": time.perf_counter() - t2}
