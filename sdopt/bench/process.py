"""The parent side of a worker: start `python -m sdopt.bench.workers`, send requests, read replies.

A worker that dies (crash, OOM kill) turns into `WorkerDied` carrying its exit code and the
tail of its log, so the runner can mark that backend failed and carry on with the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from sdopt.bench.machine import thread_env


class WorkerDied(RuntimeError):
    pass


class WorkerProcess:
    def __init__(self, backend: str, log_path: Path, threads: int) -> None:
        self.backend = backend
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(self.log_path, "wb")
        env = thread_env(threads)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("DIFFUSERS_VERBOSITY", "error")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdopt.bench.workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, **msg: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise WorkerDied(self._death_note())
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise WorkerDied(f"worker sent an unreadable reply: {line[:200]!r}") from None

    def _death_note(self) -> str:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        what = {
            None: "stopped answering",
            -9: "was killed (SIGKILL: out of memory?)",
            -11: "crashed (segmentation fault)",
        }.get(code, f"exited with code {code}")
        tail = self.log_tail()
        return f"worker {what}" + (f": {tail}" if tail else "")

    def log_tail(self, lines: int = 1) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        text = [t for t in text if t.strip()]
        return " | ".join(text[-lines:])[:400]

    def close(self) -> None:
        """Ask it to exit; kill it if it does not within a few seconds."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout,):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
