"""`sdopt serve` as a child process, as a user runs it: a free loopback port, started from the CLI,
stopped with Ctrl-C. One home for the bench's Server scenario, the serve benchmarks and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

STOP_TIMEOUT_S = 90.0  # Serve and the local Ray instance shutting down after Ctrl-C


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    cmd = [sys.executable, "-m", "sdopt", "serve", str(artifact), "--port", str(port), *args]
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
