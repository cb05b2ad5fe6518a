"""numpy's BLAS on one thread while LoRA deltas are computed (threadpoolctl)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_BLAS_LOCK = threading.Lock()
_BLAS: list[Any] = []  # threadpoolctl's controller of the BLAS numpy loaded, made once


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS) on one thread for the LoRA products, then back as it was.

    B @ A of rank r << width is memory-bound: more threads add little, and OpenBLAS's threads
    spin-wait, which on a busy CPU cost several times the CPU time (benchmarks/README.md, LoRA).
    One thread also makes the bits independent of the core count (OpenBLAS splits a GEMM
    across its threads, and 1 and 2 threads round differently), so an export merge and a
    runtime swap agree on any machine with the same BLAS kernels. threadpoolctl is the
    maintained way to set this at run time; its controller costs microseconds per use.
    Trade-off: on an idle many-core machine a high-rank LoRA (LCM-LoRA: rank 64 on every U-Net
    layer) would compute its products faster on more threads; that case was not measured here.
    """
    with _BLAS_LOCK:
        if not _BLAS:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
        with _BLAS[0].limit(limits=1, user_api="blas"):
            yield
