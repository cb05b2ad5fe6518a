"""LoRAs in the server: the names configured at start, and which requests may run together.

A request names LoRAs (`"lora": "style"` or `["style", "detail"]`); paths never come from
requests. Its *LoRA set* is the tuple of those names in the configured order (so the same set
always stacks the same way); `()` is the base weights.

Requests with different LoRA sets never share a U-Net call, and the weights never change
while a request runs: the engine runs one LoRA set at a time (a *turn*). A turn starts when
no request is in flight: it takes the LoRA set of the oldest waiting request, swaps the
weights if they differ (`Pipeline.set_loras`, between U-Net calls), and admits the waiting
requests of that set into free batch slots. While requests of another set wait, the turn
admits only requests that arrived before the turn began or before the oldest of those; so it
ends once these finish, and every request is served within a bounded number of turns
(at most one per LoRA set of the requests older than it), however many arrive behind it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sdopt.errors import SdoptError
from sdopt.lora.files import LoraSpec, compute_deltas
from sdopt.serve.config import ServeLora

LoraSet = tuple[str, ...]  # configured LoRA names, in configured order; () = base weights
BASE: LoraSet = ()


@dataclass(frozen=True)
class LoraCatalog:
    """The LoRAs a server was started with, by name."""

    loras: tuple[ServeLora, ...] = ()

    @property
    def names(self) -> list[str]:
        """The configured names, in configured order."""
        return [lora.name for lora in self.loras]

    def lora_set(self, requested: str | Sequence[str] | None) -> LoraSet:
        """A request's `lora` field -> its LoRA set.

        Args:
            requested: None or [] for the base weights, a name, or a list of names (stacked).

        Returns:
            The names in configured order.

        Raises:
            SdoptError: an unknown or repeated name (the message lists the configured names).
        """
        if requested is None:
            return BASE
        wanted = [requested] if isinstance(requested, str) else list(requested)
        names = self.names
        unknown = [n for n in wanted if n not in names]
        if unknown:
            available = ", ".join(names) if names else "none: the server was started without --lora"
            raise SdoptError(
                f"unknown LoRA {unknown[0]!r}; this server has: {available}",
                "name one of those (or leave 'lora' out for the base weights)",
            )
        if len(set(wanted)) != len(wanted):
            raise SdoptError(f"LoRA names repeat in {wanted}", "name each LoRA once")
        return tuple(n for n in names if n in wanted)

    def specs(self, lora_set: LoraSet) -> list[LoraSpec]:
        """The files and scales of a LoRA set, as `Pipeline.set_loras` takes them."""
        by_name = {lora.name: lora for lora in self.loras}
        return [LoraSpec(Path(by_name[n].path), by_name[n].scale) for n in lora_set]

    def check_files(self, artifact: str | Path) -> None:
        """Read every configured file and match it against the artifact's LoRA-able weights.

        Args:
            artifact: The artifact folder.

        Raises:
            SdoptError: the first file that is missing, unreadable or for another model, named by
                its LoRA name; or an artifact without a weight map.
        """
        if not self.loras:
            return
        from sdopt.manifest import load_manifest
        from sdopt.runtime.lora_swap import check_swappable, manifest_targets

        manifest = load_manifest(Path(artifact))
        check_swappable(manifest)
        targets = manifest_targets(manifest)
        for lora in self.loras:
            try:
                compute_deltas(self.specs((lora.name,)), targets)
            except SdoptError as e:
                raise SdoptError(f"--lora {lora.name}: {e.problem}", e.fix) from None


class Waiting(Protocol):
    """What the turn policy reads of a waiting job."""

    lora: LoraSet
    seq: int  # arrival order


class LoraTurns:
    """The engine's turn policy: which LoRA set runs, and which waiting jobs it may admit."""

    def __init__(self) -> None:
        self.current: LoraSet = BASE  # the weights the pipeline holds now
        self._start = 0  # arrival number at which the current turn began

    def next_set(self, waiting: Sequence[Waiting]) -> LoraSet | None:
        """Called with nothing in flight: the LoRA set of the next turn (that of the oldest waiting job).

        Args:
            waiting: The waiting jobs, oldest first.

        Returns:
            The set to run next (the caller swaps the weights where it differs from `current`,
            then calls `begin`), or None when nothing waits.
        """
        return waiting[0].lora if waiting else None

    def begin(self, lora_set: LoraSet, next_seq: int) -> None:
        """A turn of `lora_set` begins (the weights hold it now).

        Args:
            lora_set: The set the weights hold.
            next_seq: The arrival number of the next job: every job of the set that arrived before
                it belongs to this turn.
        """
        self.current = lora_set
        self._start = next_seq

    def admissible(self, waiting: Iterable[Waiting]) -> list[Any]:
        """The waiting jobs the current turn may admit.

        Args:
            waiting: The waiting jobs, oldest first.

        Returns:
            Those of the current set that arrived before the turn began, or before the oldest waiting
            job of another set (all of them where none waits), oldest first; the caller fills free
            slots in that order.
        """
        jobs = list(waiting)
        others = [j.seq for j in jobs if j.lora != self.current]
        cutoff = max(self._start, min(others)) if others else None
        return [j for j in jobs if j.lora == self.current and (cutoff is None or j.seq < cutoff)]
