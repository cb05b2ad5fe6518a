"""What every `sdopt` command shares: the typer app, the consoles, and one error style.

Every SdoptError becomes one `error:` line (and a `fix:` line) and exit code 2, never a
traceback. `sdopt --debug ...` or `SDOPT_DEBUG=1` also prints the chained traceback, for
bug reports and for errors that come from deep inside a library.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from sdopt.errors import SdoptError

app = typer.Typer(
    help="Stable Diffusion from PyTorch/diffusers to verified ONNX and TensorRT, and a lean runtime to run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def debug_enabled() -> bool:
    return os.environ.get("SDOPT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


@app.callback()
def main(
    debug: bool = typer.Option(
        False, "--debug", help="On error, also print the full chained traceback (or SDOPT_DEBUG=1)."
    ),
) -> None:
    """Stable Diffusion from PyTorch/diffusers to verified ONNX and TensorRT, and a lean runtime to run it."""
    if debug:
        os.environ["SDOPT_DEBUG"] = "1"


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SdoptError (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SdoptError as e:
            if debug_enabled():
                err_console.print(escape("".join(traceback.format_exception(e, chain=True))), highlight=False)
            err_console.print(
                f"[bold red]error:[/] {escape(e.problem)}" + (f"\n[dim]fix:[/] {escape(e.fix)}" if e.fix else ""),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def split_list(value: Optional[str]) -> Optional[list[str]]:
    """ "a, b,c" -> ["a", "b", "c"]; None or "" -> None."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None
