"""Which sdopt package may import which, read from the source with `ast` (module-level and lazy imports alike).

- `sdopt/export` never imports `sdopt/runtime`: both sides share `sdopt.manifest`, `sdopt.hardware`
  and `sdopt.engines` instead.
- `sdopt.hardware`, `sdopt.engines`, `sdopt.lora`, `sdopt.manifest` and `sdopt.errors` are neutral: they import
  neither side (nor the benchmark or the CLI).
- ONNX Runtime `SessionOptions` are made in one place, `sdopt.engines.ort.session_options`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("sdopt.export", "sdopt.runtime", "sdopt.bench", "sdopt.cli")


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names, wherever the statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offending(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in files:
        hits = sorted(m for m in imported_modules(path) if m.startswith(forbidden))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_export_never_imports_the_runtime():
    files = sorted((ROOT / "sdopt/export").rglob("*.py"))
    assert len(files) > 5
    assert _offending(files, ("sdopt.runtime",)) == {}


def test_shared_modules_import_neither_side():
    files = [
        ROOT / "sdopt/hardware.py",
        ROOT / "sdopt/manifest.py",
        ROOT / "sdopt/errors.py",
        *sorted((ROOT / "sdopt/engines").rglob("*.py")),
        *sorted((ROOT / "sdopt/lora").rglob("*.py")),
    ]
    assert _offending(files, SIDES) == {}


def test_the_checker_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from sdopt.runtime.backends.tensorrt import gpu_facts\n    import sdopt.runtime\n")
    assert imported_modules(probe) >= {"sdopt.runtime.backends.tensorrt", "sdopt.runtime"}


def test_onnx_runtime_session_options_have_one_home():
    files = [p for folder in ("sdopt", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    homes = [str(p.relative_to(ROOT)) for p in files if "SessionOptions()" in p.read_text()]
    assert homes == ["sdopt/engines/ort.py"]
