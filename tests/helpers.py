"""What several test modules share: the family table, the lean/full switch and the reference store.

The suite runs in two installs:

- **full** (`.[test]`: torch, diffusers, transformers): references are computed live from
  diffusers/transformers in PyTorch. With ``SDOPT_TEST_ARTIFACTS=DIR`` the tiny artifacts are
  exported into DIR and every reference a test computes is also saved there.
- **lean** (`pip install .` only): ``pytest -m lean`` with ``SDOPT_TEST_ARTIFACTS=DIR`` pointing at
  a folder the full install filled. The same lean tests then run the runtime on those artifacts and
  compare against the saved references. Nothing is computed by the libraries the lean install lacks,
  and a missing artifact or reference fails the test (it is never skipped).

``SDOPT_TEST_LEAN=1`` forces the lean behaviour in a full install (to try the lean path locally).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The tiny synthetic preset of each model family; the one table every test module uses.
FAMILY_PRESETS = {"sd1": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}

ARTIFACTS_ENV = "SDOPT_TEST_ARTIFACTS"
LEAN_ENV = "SDOPT_TEST_LEAN"


def lean_mode() -> bool:
    """True where the reference libraries are absent (or SDOPT_TEST_LEAN=1): use saved references."""
    if os.environ.get(LEAN_ENV, "") not in ("", "0"):
        return True
    return any(importlib.util.find_spec(m) is None for m in ("torch", "diffusers", "transformers"))


def artifacts_dir() -> Path | None:
    """The shared folder of tiny artifacts and saved references (SDOPT_TEST_ARTIFACTS), if set."""
    value = os.environ.get(ARTIFACTS_ENV)
    return Path(value).resolve() if value else None


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", key).strip("_") + ".npz"


class ReferenceStore:
    """Another library's results, computed live (full install) or read back (lean install).

    A reference is a dict of numpy arrays (strings and numbers are stored as 0-d arrays).
    """

    def __init__(self, root: Path | None, lean: bool) -> None:
        self.root, self.lean = root, lean

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.root is None else self.root / "references" / kind / _file_name(key)

    def get(self, kind: str, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, np.ndarray]:
        """The reference `kind`/`key`: compute() in the full install (saved when a folder is set),
        else the saved copy; a lean run without one fails, naming how to make it."""
        path = self.path(kind, key)
        if self.lean:
            if path is None or not path.is_file():
                pytest.fail(
                    f"no saved reference {kind}/{key} (looked for {path}); run the full suite first with "
                    f"{ARTIFACTS_ENV}={self.root or 'DIR'} to record it",
                    pytrace=False,
                )
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        values = {k: np.asarray(v) for k, v in compute().items() if v is not None}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **values)
            tmp.replace(path)  # atomic: a lean run never reads half a file
        return values


def scalar(value: np.ndarray) -> Any:
    """A 0-d array read back from the store as a plain Python value."""
    return np.asarray(value).item()


@contextlib.contextmanager
def aligned_randn(seed: int, modules: tuple[str, ...]) -> Any:
    """Make diffusers draw its noise from np.random.default_rng(seed), in call order, like the runtime.

    Args:
        seed: The seed the runtime call uses.
        modules: Every diffusers module on the tested path that imports `randn_tensor`.
    """
    import torch

    rng = np.random.default_rng(seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    with pytest.MonkeyPatch.context() as mp:
        for name in modules:
            mp.setattr(importlib.import_module(name), "randn_tensor", randn_tensor)  # raises if it moved
        yield
