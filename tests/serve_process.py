"""A real `sdopt serve` process on loopback for the serve tests: start it as a user does, wait until it
answers, stop it with Ctrl-C. Every request has a client timeout, so nothing here can hang."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

CLIENT_TIMEOUT = 60  # seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    artifact: str
    headers: dict[str, str]

    def post(self, body, headers=None, timeout=CLIENT_TIMEOUT, **kw):
        headers = self.headers if headers is None else headers
        return requests.post(self.url + "/v1/images/generations", json=body, headers=headers, timeout=timeout, **kw)

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    def ray_address(self) -> str:
        match = re.search(r"local Ray instance (\S+);", self.log.read_text())
        assert match, self.log.read_text()[-2000:]
        return match.group(1)


@contextmanager
def serve_process(
    artifact: str, args: list[str], log: Path, env: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> Iterator[Server]:
    """`sdopt serve ARTIFACT --port P ARGS...` as a subprocess; yields once /ready answers 200.

    The caller may stop it itself (then this only checks it is gone); otherwise Ctrl-C stops it here."""
    port = free_port()
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "sdopt", "serve", artifact, "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log, artifact, headers or {})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(server.url + "/ready", timeout=5).status_code == 200 and "Ctrl-C" in log.read_text():
                    break
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"sdopt serve did not start: {log.read_text()[-3000:]}")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
