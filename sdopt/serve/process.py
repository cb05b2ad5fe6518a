"""`sdopt serve` as a child process, as a user runs it: a free loopback port, started from the CLI,
stopped with Ctrl-C. One home for the bench's Server scenario, the serve benchmarks and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError

STOP_TIMEOUT_S = 90.0  # Serve and the local Ray instance shutting down after Ctrl-C


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(artifact: str | Path, port: int, args: list[str]) -> list[str]:
    """The `sdopt serve` command line that start() runs (program name first, as a user types it)."""
    return ["sdopt", "serve", str(artifact), "--port", str(port), *args]


def start(
    artifact: str | Path, port: int, args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `sdopt serve ARTIFACT --port PORT ARGS...` in its own process group, output to `log`.

    Args:
        artifact: the artifact folder to serve.
        port: the loopback port (see free_port).
        args: further `sdopt serve` options.
        log: file that receives the server's stdout and stderr.
        env: extra environment variables.

    Returns:
        The running process; end it with stop().
    """
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    cmd = [sys.executable, "-m", *command(artifact, port, args)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        # its own process group: a stuck Ray instance can be ended as one
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Ctrl-C (the CLI's own stop path: Serve and the local Ray instance end); past the timeout, kill the group.

    Args:
        proc: a process from start().
        timeout_s: how long Ctrl-C may take.

    Returns:
        The process's exit code.
    """
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> dict[str, Any] | None:
    """Poll URL/ready until the server answers ready, the process exits, or the time is up.

    Args:
        url: the server's base URL.
        proc: its process (from start()).
        timeout_s: how long to wait.

    Returns:
        The /ready body, or None when the server exited or did not become ready in time.
    """
    from sdopt.serve.bench import read_ready

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return read_ready(url, timeout_s=5.0)
        except SdoptError:
            time.sleep(0.5)
    return None
