"""A real `sdopt serve` process on loopback for the serve tests: start it as a user does, wait until it
answers, stop it with Ctrl-C. Every request has a client timeout, so nothing here can hang."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from sdopt.serve.process import free_port, start, stop

CLIENT_TIMEOUT = 60  # seconds


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
    proc = start(artifact, port, args, log, env)
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
        stop(proc, timeout_s=60)
