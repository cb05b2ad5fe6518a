"""The `sdopt` command line: export, build, inspect, generate, bench, eval, serve, bench-serve.

One module per group of commands; each registers itself on the shared typer `app`. Heavy
libraries are imported inside the commands that need them, so `sdopt --help` and
`sdopt generate` stay fast and torch-free.
"""

from __future__ import annotations

import sdopt.cli.eval  # noqa: F401  (registers eval; a module name that would shadow the builtin if imported bare)
import sdopt.cli.serve  # noqa: F401  (registers serve, bench-serve)
from sdopt.cli import export, generate  # noqa: F401  (registers the commands)
from sdopt.cli.common import app, friendly_errors


def _register_bench() -> None:
    """`sdopt bench` lives in sdopt.bench (its workers import torch lazily)."""
    from sdopt.bench.command import bench_command

    app.command("bench")(friendly_errors(bench_command))


_register_bench()

__all__ = ["app"]
