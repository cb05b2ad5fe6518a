"""Step-level continuous batching: many requests' denoising loops share each U-Net call.

One engine thread per replica. Every active job keeps its own `DenoiseState` (latents,
scheduler, RNG, prompt embeddings) from `pipe.prepare(request)`. At each step boundary the
engine

1. admits waiting jobs (up to `max_batch` images in flight) and prepares them; with LoRAs
   configured, only jobs of the LoRA set the weights hold now (`sdopt.serve.lora_groups`:
   one LoRA set per turn, swapped only when no job is in flight),
2. drops cancelled jobs (client gone, deadline passed),
3. stacks the states whose U-Net call has the same component, feed names and feed shapes
   (the same image size; guided and unguided requests stack too) into one `pipe.unet` call, each item with
   its own timestep, and hands each state its slice of the output (`state.advance`),
4. decodes the finished states' latents together and resolves their futures.

Requests at different steps stack fine: the U-Net takes one timestep per batch item. A
request's image is the same as `Pipeline`'s for the same arguments, up to the float
differences kernels may show between batch sizes (measured with ONNX Runtime on CPU:
none, bit-identical; see README, Serving).

ONNX Runtime releases the GIL while it runs, so the HTTP event loop stays responsive.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sdopt.errors import SdoptError
from sdopt.serve.lora_groups import BASE, LoraCatalog, LoraSet, LoraTurns


class StagedPipeline(Protocol):
    """What the engine needs of `sdopt.runtime.Pipeline` (its staged API)."""

    def prepare(self, request: Any) -> Any: ...
    def unet(self, component: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]: ...
    def decode(self, latents: np.ndarray) -> np.ndarray: ...
    def set_loras(self, loras: Any) -> None: ...


class EngineObserver(Protocol):
    """Metrics hooks (sdopt.serve.metrics.ServeMetrics)."""

    def unet_call(self, images: int, seconds: float) -> None: ...
    def images_done(self, count: int) -> None: ...
    def depth(self, waiting: int, active: int) -> None: ...
    def lora_swap(self, seconds: float) -> None: ...


class QueueFull(SdoptError):
    """More jobs waiting than the engine takes: the caller answers 503."""


@dataclass
class JobResult:
    """One finished image: HWC float32 in [0, 1], its seed and its stage timings (seconds)."""

    image: np.ndarray
    seed: int
    timings: dict[str, float]


@dataclass
class Job:
    """One single-image request travelling through the engine."""

    request: Any  # sdopt.runtime.request.GenerationRequest
    lora: LoraSet = BASE  # the LoRAs its weights carry; () = base
    seq: int = 0  # arrival number (the turn policy's order)
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    state: Any = None  # DenoiseState once admitted
    admitted: float = 0.0
    unet_s: float = 0.0  # wall time of the U-Net calls this job was part of
    lora_swap_s: float = 0.0  # the LoRA swap it waited for (part of its queue time)

    @property
    def images(self) -> int:
        return int(self.request.batch)


class StepBatcher:
    """The batching engine of one replica: `submit` jobs, await their futures, `close` at the end."""

    def __init__(
        self,
        pipe: StagedPipeline,
        max_batch: int,
        max_waiting: int,
        observer: EngineObserver | None = None,
        loras: LoraCatalog | None = None,
    ) -> None:
        """Args:
        pipe: A loaded Pipeline (staged API: prepare, unet, decode; set_loras where LoRAs are configured).
        max_batch: Images in flight at once (stacked into one U-Net call); 1 = no batching.
        max_waiting: Jobs allowed to wait for a slot; `submit` raises QueueFull beyond.
        observer: Metrics hooks, or None.
        loras: The LoRAs jobs may name (the pipeline must hold the base weights at start).
        """
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.observer = observer
        self.loras = loras or LoraCatalog()
        self._turns = LoraTurns()
        self._seq = 0
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None  # set if the engine thread itself died
        self._thread = threading.Thread(target=self._run, name="sdopt-step-batcher", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------------
    def submit(self, request: Any, lora: LoraSet = BASE) -> Job:
        """Queue one validated GenerationRequest; its job's future resolves to a list of JobResult.

        Args:
            request: From `Pipeline.make_request`.
            lora: Its LoRA set (`LoraCatalog.lora_set`); () for the base weights.
        """
        job = Job(request, lora)
        if job.images > self.max_batch:
            raise SdoptError(
                f"{job.images} images in one job exceed the server's --max-batch {self.max_batch}",
                "send fewer images per request",
            )
        with self._cond:
            if self._closed or self.error is not None:
                raise RuntimeError("the engine is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests already wait on this replica", "retry later")
            job.seq, self._seq = self._seq, self._seq + 1
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job at the next step boundary (client gone or past its deadline)."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; unfinished jobs fail with RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def applied_loras(self) -> LoraSet:
        """The LoRA set the weights hold now."""
        return self._turns.current

    def load(self) -> tuple[int, int]:
        """(waiting jobs, active jobs)."""
        with self._cond:
            return len(self._waiting), len(self._active)

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._next_batch():
                self._step()
                self._finish()
        except BaseException as e:  # noqa: BLE001 - reported through every pending future and `alive`
            self.error = e
        finally:
            self._fail_all(self.error or RuntimeError("the server is shutting down"))

    def _next_batch(self) -> bool:
        """Wait for work, start a turn where none is in flight, admit its waiting jobs into free slots,
        drop cancelled ones. False: closed."""
        with self._cond:
            while not self._closed and not self._waiting and not self._active:
                self._cond.wait()
            if self._closed:
                return False
            self._active = [j for j in self._active if not self._drop_if_cancelled(j)]
            self._waiting = deque(j for j in self._waiting if not self._drop_if_cancelled(j))
            turn = None if self._active else self._turns.next_set(self._waiting)
        if turn is not None:
            self._begin_turn(turn)
        with self._cond:
            admitted = self._admit()
        for job in admitted:  # prompt encoding and initial latents, outside the lock
            job.admitted = time.perf_counter()
            try:
                job.state = self.pipe.prepare(job.request)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                _settle(job.future, error=e)
                continue
            with self._cond:
                self._active.append(job)
        self._report()
        return True

    def _begin_turn(self, lora_set: LoraSet) -> None:
        """Nothing in flight: swap the weights to `lora_set` where they differ, and start its turn.

        A swap that fails fails that set's waiting jobs; the weights stay as they were.
        """
        swap_s = 0.0
        if lora_set != self._turns.current:
            t0 = time.perf_counter()
            try:
                self.pipe.set_loras(self.loras.specs(lora_set))
            except Exception as e:  # noqa: BLE001 - those jobs fail, the engine goes on with the old weights
                with self._cond:
                    failed = [j for j in self._waiting if j.lora == lora_set]
                    self._waiting = deque(j for j in self._waiting if j.lora != lora_set)
                for job in failed:
                    _settle(job.future, error=e)
                return
            swap_s = time.perf_counter() - t0
            if self.observer:
                self.observer.lora_swap(swap_s)
        with self._cond:
            self._turns.begin(lora_set, self._seq)
            for job in self._waiting:
                if job.lora == lora_set and swap_s:
                    job.lora_swap_s = swap_s

    def _admit(self) -> list[Job]:
        """The current turn's waiting jobs that fit the free slots, oldest first (call with the lock held)."""
        in_flight = sum(j.images for j in self._active)
        admitted: list[Job] = []
        for job in self._turns.admissible(self._waiting):
            if in_flight + job.images > self.max_batch:
                break  # FIFO: a later, smaller job does not overtake
            admitted.append(job)
            in_flight += job.images
        taken = {id(j) for j in admitted}
        self._waiting = deque(j for j in self._waiting if id(j) not in taken)
        return admitted

    @staticmethod
    def _drop_if_cancelled(job: Job) -> bool:
        if job.cancelled:
            job.future.cancel()
        return job.cancelled

    def _step(self) -> None:
        """One step boundary: one U-Net call per group of stackable states."""
        groups: dict[tuple, list[tuple[Job, dict[str, np.ndarray]]]] = {}
        component_of: dict[tuple, str] = {}
        for job in self._active:
            if job.state.done:
                continue
            component, feeds = job.state.unet_inputs()
            key = (component, *sorted((k, v.shape[1:], v.dtype.str) for k, v in feeds.items()))
            groups.setdefault(key, []).append((job, feeds))
            component_of[key] = component
        for key, members in groups.items():
            self._unet_group(component_of[key], members)

    def _unet_group(self, component: str, members: list[tuple[Job, dict[str, np.ndarray]]]) -> None:
        t0 = time.perf_counter()
        names = members[0][1].keys()
        feeds = {k: np.concatenate([f[k] for _, f in members]) for k in names} if len(members) > 1 else members[0][1]
        try:
            pred, deep = self.pipe.unet(component, feeds)
        except Exception as e:  # noqa: BLE001 - the group's jobs fail, the engine goes on
            for job, _ in members:
                _settle(job.future, error=e)
                job.cancelled = True
            with self._cond:
                self._active = [j for j in self._active if not j.cancelled]
            return
        seconds = time.perf_counter() - t0
        start = 0
        for job, f in members:
            n = f["sample"].shape[0]
            job.state.advance(pred[start : start + n], None if deep is None else deep[start : start + n])
            job.unet_s += seconds
            start += n
        if self.observer:
            self.observer.unet_call(sum(job.images for job, _ in members), seconds)

    def _finish(self) -> None:
        """Decode finished states together (grouped by latent shape) and resolve their futures."""
        done = [j for j in self._active if j.state.done and not j.cancelled]
        if not done:
            return
        by_shape: dict[tuple, list[Job]] = {}
        for job in done:
            by_shape.setdefault(job.state.latents.shape[1:], []).append(job)
        for jobs in by_shape.values():
            t0 = time.perf_counter()
            images = self.pipe.decode(np.concatenate([j.state.latents for j in jobs]))
            decode_s = time.perf_counter() - t0
            start = 0
            for job in jobs:
                n = job.images
                _settle(job.future, self._results(job, images[start : start + n], decode_s))
                start += n
        finished = {id(j) for j in done}
        with self._cond:
            self._active = [j for j in self._active if id(j) not in finished]
        if self.observer:
            self.observer.images_done(sum(j.images for j in done))
        self._report()

    @staticmethod
    def _results(job: Job, images: np.ndarray, decode_s: float) -> list[JobResult]:
        now = time.perf_counter()
        timings = {
            "queue": job.admitted - job.submitted,
            **({"lora_swap": job.lora_swap_s} if job.lora_swap_s else {}),
            **job.state.timings,
            "unet": job.unet_s,
            "unet_per_step": job.unet_s / max(job.state.total, 1),
            "vae_decoder": decode_s,
            "total": now - job.submitted,
        }
        return [JobResult(image, int(job.request.seed), timings) for image in images]

    def _report(self) -> None:
        if self.observer:
            waiting, active = self.load()
            self.observer.depth(waiting, active)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            jobs = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
        for job in jobs:
            _settle(job.future, error=error if isinstance(error, Exception) else RuntimeError(str(error)))


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a future unless the caller already cancelled it (it may, from another thread)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
