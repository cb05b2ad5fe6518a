"""Session-wide fixtures: tiny artifacts exported once per session, references from the other libraries,
and a report of the measured numbers. Full and lean installs: see tests/helpers.py."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ReferenceStore, artifacts_dir, lean_mode

LEAN = lean_mode()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_METRICS] = {}


def pytest_report_header(config: pytest.Config) -> str:
    import sdopt

    mode = "lean: saved references" if LEAN else "full: live references"
    return f"sdopt from {Path(sdopt.__file__).parent} ({mode}; SDOPT_TEST_ARTIFACTS={artifacts_dir()})"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Lean install: collect only the modules that hold lean tests (the others import torch and co.)."""
    if LEAN and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "mark.lean" not in collection_path.read_text(encoding="utf-8")
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Lean install: a lean test that skips is a failure, so nothing the lean run claims goes unchecked."""
    outcome = yield
    report = outcome.get_result()
    if LEAN and report.skipped and item.get_closest_marker("lean") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"lean test skipped in the lean install: {report.longrepr}"


@pytest.fixture(autouse=True, scope="session")
def _quiet_diffusers():
    """diffusers logs every ignored config key; tests share configs across classes on purpose."""
    if LEAN:
        yield
        return
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(level)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Callable[..., Path]:
    """tiny_artifact(preset="tiny", precision="fp32") -> folder of its verified export.

    Exported on first use (into SDOPT_TEST_ARTIFACTS/artifacts when that is set, for the lean run);
    the lean install only reads what the full install exported there.
    """
    cache: dict[tuple[str, str], Path] = {}
    shared = artifacts_dir()

    def get(preset: str = "tiny", precision: str = "fp32") -> Path:
        key = (preset, precision)
        if key not in cache:
            parent = shared / "artifacts" if shared else tmp_path_factory.mktemp("artifacts")
            out = parent / f"{preset}-{precision}"
            if LEAN:
                if not (out / "sdopt.json").is_file():
                    pytest.fail(
                        f"no exported artifact {out}: run the full suite with SDOPT_TEST_ARTIFACTS={shared} "
                        "first (the lean install cannot export)",
                        pytrace=False,
                    )
            elif not (out / "sdopt.json").is_file():
                from sdopt.export.artifact import ExportOptions, export_artifact

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    export_artifact(f"synthetic:{preset}", out, ExportOptions(precision=precision))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference_pipeline() -> Callable[[str], object]:
    """reference_pipeline(preset) -> the diffusers pipeline the artifact was exported from
    (same seeded weights). Shared: tests that swap its scheduler must restore it."""
    cache: dict[str, object] = {}

    def get(preset: str = "tiny"):
        if LEAN:
            pytest.fail("reference_pipeline needs diffusers: compute references inside reference_store.get()")
        if preset not in cache:
            from sdopt.export.synthetic import build_pipeline

            cache[preset] = build_pipeline(preset)
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def reference_store() -> ReferenceStore:
    """reference_store.get(kind, key, compute) -> another library's result, live or saved (helpers.py)."""
    return ReferenceStore(artifacts_dir(), LEAN)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny randomly initialised CLIP (model + processor folder) for CLIP score: never downloaded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sdopt.export.tokenizer_files import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    write_clip_tokenizer(folder, "<|endoftext|>", 77)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    config = CLIPConfig(
        text_config={
            "vocab_size": tokenizer.vocab_size + 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    import torch

    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# -- the numbers: each test records its own, the summary prints them after the run -------------
_METRICS = pytest.StashKey[dict]()


@pytest.fixture
def record_metric(request: pytest.FixtureRequest) -> Callable[[str, str, float], None]:
    """record_metric(table, row, value): keeps the worst (largest) value per row; printed at the end.

    Order-independent: whatever ran is summarised, whichever tests ran first.
    """
    tables = request.config.stash[_METRICS]

    def record(table: str, row: str, value: float) -> None:
        rows = tables.setdefault(table, {})
        rows[row] = max(rows.get(row, value), value)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The recorded numbers: each table's worst row; every row with -v."""
    tables = config.stash.get(_METRICS, {})
    if not tables:
        return
    terminalreporter.section("measured numbers")
    for table, rows in tables.items():
        worst = max(rows, key=rows.get)
        terminalreporter.write_line(f"{table}: worst {rows[worst]:.3g} ({worst}; {len(rows)} rows)")
        if config.get_verbosity() > 0:
            width = max(map(len, rows))
            for row, value in rows.items():
                terminalreporter.write_line(f"    {row:<{width}}  {value:.3g}")
