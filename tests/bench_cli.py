"""Test helper: run `sdopt bench` in-process through typer's CliRunner (shared by the bench test modules)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner


def bench_app() -> typer.Typer:
    from sdopt.bench.command import bench_command
    from sdopt.cli import friendly_errors

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("bench")(friendly_errors(bench_command))

    @app.command("version")  # a second command keeps typer in sub-command mode (`app bench ...`)
    def version() -> None:
        pass

    return app


def invoke(*args: str):
    """`sdopt bench ARGS...`; returns click's Result (exit_code, output)."""
    return CliRunner().invoke(bench_app(), ["bench", *args])
