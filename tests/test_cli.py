"""The CLI's error style: one `error:`/`fix:` pair and exit 2; `--debug` adds the chained traceback."""

from __future__ import annotations

import subprocess
import sys


def _sdopt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "sdopt", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200", **(env or {})},
    )  # fmt: skip


def _broken_artifact(tmp_path):
    (tmp_path / "sdopt.json").write_text("{not json")
    return str(tmp_path)


def test_errors_are_one_line_without_a_traceback(tmp_path):
    r = _sdopt("inspect", _broken_artifact(tmp_path))
    assert r.returncode == 2
    assert "error:" in r.stderr and "is unreadable" in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr


def test_debug_flag_shows_the_chained_traceback(tmp_path):
    r = _sdopt("--debug", "inspect", _broken_artifact(tmp_path))
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "JSONDecodeError" in r.stderr  # the library's own error, chained
    assert "error:" in r.stderr  # and still the one-line summary


def test_debug_environment_variable_does_the_same(tmp_path):
    r = _sdopt("inspect", _broken_artifact(tmp_path), env={"SDOPT_DEBUG": "1"})
    assert r.returncode == 2 and "JSONDecodeError" in r.stderr
