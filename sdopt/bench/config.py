"""What a benchmark runs: one `BenchConfig`, from defaults, a named config file, and CLI flags.

Named configs live in `benchmarks/configs/NAME.json` (keys are BenchConfig fields, plus free
text `description`/`note`). Precedence: defaults < config file < command-line flags.
`validate` checks everything checkable without loading a model, so bad input fails in
milliseconds, before any export or worker start.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError

#: Every backend the harness knows, in table order. torch is the reference.
BACKENDS = ("torch", "torch-compile", "onnxruntime", "onnxruntime-fast", "tensorrt")
REFERENCE = "torch"
DEFAULT_BACKENDS = ("torch", "onnxruntime")
DEFAULT_MODEL = "synthetic:tiny"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
PRECISIONS = ("fp32", "fp16")
TEXT_KEYS = ("description", "note")  # free text a config file may carry; copied into results


@dataclass
class BenchConfig:
    model: str | None = None  # model id or artifact folder; None: DEFAULT_MODEL
    backends: list[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    compile: bool = False  # also run torch-compile (torch.compile on U-Net and VAE decoder)
    fast: bool = False  # also run onnxruntime-fast: the runtime's DeepCache fast mode
    deepcache: int = 3  # onnxruntime-fast's interval: a full U-Net pass every N steps
    runs: int = 3
    warmup: int = 1
    steps: int = 20
    height: int | None = None  # None: the artifact's default size
    width: int | None = None
    batch: int = 1
    guidance: float = 7.5
    scheduler: str | None = None  # None: the model's own scheduler
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str | None = None
    seed: int = 0
    threads: int | None = None  # None: physical cores
    precision: str = "fp32"  # export precision when MODEL is a model id
    name: str | None = None  # the named config this came from
    description: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def backend_list(self) -> list[str]:
        """The backends to run, in table order, torch-compile added by `compile`, onnxruntime-fast by `fast`."""
        wanted = set(self.backends) | ({"torch-compile"} if self.compile else set()) | (
            {"onnxruntime-fast"} if self.fast else set())
        return [b for b in BACKENDS if b in wanted]


FIELDS = {f.name for f in dataclasses.fields(BenchConfig)}


def configs_dir() -> Path:
    """`benchmarks/configs` of the source checkout, else of the current directory."""
    return benchmarks_dir() / "configs"


def benchmarks_dir() -> Path:
    repo = Path(__file__).resolve().parents[2] / "benchmarks"
    return repo if repo.is_dir() else Path.cwd() / "benchmarks"


def named_configs() -> list[str]:
    folder = configs_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_config_file(name: str) -> dict[str, Any]:
    """A named config (`tiny-cpu`) or a path to a .json file, as a dict of BenchConfig fields."""
    path = Path(name).expanduser()
    if not (name.endswith(".json") or "/" in name):
        path = configs_dir() / f"{name}.json"
    if not path.is_file():
        known = ", ".join(named_configs()) or "none found"
        raise SdoptError(f"no benchmark config {name!r} ({path} does not exist)",
                         f"use one of: {known}; or pass a path to a .json config")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SdoptError(f"benchmark config {path} is unreadable ({e})", "fix the JSON") from None
    if not isinstance(raw, dict):
        raise SdoptError(f"benchmark config {path} is not a JSON object", "write {\"model\": ..., \"steps\": ...}")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise SdoptError(f"benchmark config {path} has unknown keys: {', '.join(unknown)}",
                         f"use only: {', '.join(sorted(FIELDS))}")
    if isinstance(raw.get("backends"), str):
        raw["backends"] = parse_backends(raw["backends"])
    raw.setdefault("name", path.stem)
    return raw


def parse_backends(value: str | list[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [b.strip().lower() for b in items if b.strip()]


def make_config(config_name: str | None = None, **overrides: Any) -> BenchConfig:
    """Defaults, then the named config, then every override that is not None; validated."""
    values: dict[str, Any] = {}
    if config_name:
        values.update(load_config_file(config_name))
    for key, value in overrides.items():
        if key not in FIELDS:
            raise TypeError(f"unknown BenchConfig field {key!r}")
        if value is not None:
            values[key] = parse_backends(value) if key == "backends" else value
    try:
        config = BenchConfig(**values)
    except TypeError as e:  # pragma: no cover - guarded by the FIELDS check above
        raise SdoptError(f"bad benchmark config: {e}", "check the config's keys") from None
    validate(config)
    return config


def validate(config: BenchConfig) -> None:
    """Every check that needs no model: counts, sizes, names. Raises SdoptError."""
    from sdopt.runtime.schedulers import SCHEDULER_NAMES

    if not config.backends and not config.compile and not config.fast:
        raise SdoptError("no backends to benchmark", f"pass --backends with some of: {', '.join(BACKENDS)}")
    for b in config.backends:
        if b not in BACKENDS:
            raise SdoptError(f"unknown backend {b!r}", f"choose from: {', '.join(BACKENDS)} (comma-separated)")
    if len(set(config.backends)) != len(config.backends):
        raise SdoptError(f"backend listed twice in {','.join(config.backends)}", "list each backend once")
    _int_at_least("runs", config.runs, 1, "use --runs 3 (or more for tighter statistics)")
    _int_at_least("warmup", config.warmup, 0, "use --warmup 1")
    _int_at_least("steps", config.steps, 1, "use e.g. --steps 20")
    _int_at_least("batch", config.batch, 1, "use --batch 1 or more")
    _int_at_least("deepcache", config.deepcache, 1, "use --deepcache 3")
    if config.threads is not None:
        _int_at_least("threads", config.threads, 1, "leave --threads out to use every physical core")
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 8:
            fix = max(8, round(value / 8) * 8) if isinstance(value, (int, float)) else 512
            raise SdoptError(f"--{name} {value} is not a positive multiple of 8", f"use e.g. --{name} {fix}")
    if not isinstance(config.guidance, (int, float)) or config.guidance < 0:
        raise SdoptError(f"--guidance {config.guidance} must be a number >= 0", "use e.g. 7.5 (1 or less disables CFG)")
    if config.scheduler is not None and config.scheduler not in SCHEDULER_NAMES:
        raise SdoptError(f"unknown scheduler {config.scheduler!r}", f"choose one of: {', '.join(SCHEDULER_NAMES)}")
    if config.precision not in PRECISIONS:
        raise SdoptError(f"unknown precision {config.precision!r}", "use fp32 or fp16")
    if not config.prompt:
        raise SdoptError("empty prompt", "pass --prompt TEXT")


def _int_at_least(name: str, value: Any, low: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SdoptError(f"--{name} must be an integer >= {low}, got {value!r}", fix)
