"""Engine sessions that speak the runtime's names, whatever interface the graph has.

The runtime reads roles (`pooled`, `penultimate_hidden_state`, `latent_mean`/`latent_std`) and
feeds one timestep per batch item. Graphs in Optimum's interface (sdopt's own since manifest
version 2, and folders written by `optimum-cli export onnx`) differ in three ways, all read
from the manifest, never from the pipeline:

* output names: `Component.aliases` maps a role to the graph output (`pooled` -> `text_embeds`,
  `penultimate_hidden_state` -> `hidden_states.11`);
* Optimum's VAE encoder returns diffusers' `latent_parameters` (mean and log-variance stacked on
  the channel axis): the mean and std are derived as diffusers' DiagonalGaussianDistribution does;
* Optimum's U-Net takes one scalar timestep for the whole batch: a batch whose items are at
  different timesteps (step-level batching) runs as one call per distinct timestep.
"""

from __future__ import annotations

import numpy as np

from sdopt.manifest import Component
from sdopt.runtime.backends.base import EngineSession


class AdaptedSession:
    """Wraps an engine session; `run` takes and returns the runtime's names and shapes."""

    def __init__(self, session: EngineSession, spec: Component) -> None:
        self.session = session
        self.spec = spec
        self.input_names = list(session.input_names)
        self.output_names = list(session.output_names)
        self.scalar_inputs = [t.name for t in spec.inputs if t.shape == []]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call with runtime feeds; outputs keyed by graph name and by every alias/role."""
        batched = [n for n in self.scalar_inputs if np.ndim(feeds[n]) == 1]
        if not batched:
            return self._roles(self.session.run(feeds))
        keys = np.stack([np.asarray(feeds[n]) for n in batched], axis=1)
        groups = [np.flatnonzero((keys == k).all(axis=1)) for k in np.unique(keys, axis=0)]
        parts = []
        for rows in groups:
            sub = {n: (np.asarray(v[rows[0]]) if n in batched else v[rows]) for n, v in feeds.items()}
            parts.append(self.session.run(sub))
        order = np.argsort(np.concatenate(groups), kind="stable")
        merged = {n: np.concatenate([p[n] for p in parts])[order] for n in parts[0]}
        return self._roles(merged)

    def _roles(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for role, name in self.spec.aliases.items():
            out[role] = out[name]
        if "latent_parameters" in out and "latent_mean" not in out:
            mean, logvar = np.split(out["latent_parameters"].astype(np.float32), 2, axis=1)
            out["latent_mean"] = mean
            out["latent_std"] = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' clamp
        return out


def adapt(session: EngineSession, spec: Component) -> EngineSession:
    """`session` itself where the graph already speaks the runtime's names, else a wrapper.

    Args:
        session: a backend's session of the component's graph.
        spec: the component's manifest entry (aliases, input shapes, outputs).

    Returns:
        A session whose `run` takes runtime feeds and returns the runtime's output roles.
    """
    needs = (
        spec.aliases
        or any(t.shape == [] for t in spec.inputs)
        or any(t.name == "latent_parameters" for t in spec.outputs)
    )
    return AdaptedSession(session, spec) if needs else session
