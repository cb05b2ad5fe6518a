"""What a server is started with: the artifact, limits, batching and Ray deployment options.

One `ServeConfig` is built by the CLI (or from a Serve config file's `args`), checked once
(`check`), and travels to every replica as a plain dict (`to_args` / `from_args`), so the
same values drive `sdopt serve`, `serve deploy` and a KubeRay `RayService`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sdopt.errors import SdoptError

APP_NAME = "sdopt"
DEPLOYMENT_NAME = "SdoptServer"
PROVIDERS = ("cpu", "cuda", "tensorrt")
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits: anything beyond them is refused before any engine runs."""

    max_steps: int = 100  # num_inference_steps
    max_size: int = 1024  # pixels per side (the artifact's own range applies too)
    max_images: int = 4  # n, images per request
    max_body_bytes: int = 16 * 1024 * 1024  # whole request body (base64 images included)

    def check(self) -> None:
        """Raises SdoptError for a limit below 1."""
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise SdoptError(f"--{f.name.replace('_', '-')} must be at least 1", "pass a positive number")


@dataclass(frozen=True)
class ServeLora:
    """A LoRA the server may apply: requests name it (`"lora": NAME`), never a path.

    Args:
        name: What requests call it (letters, digits, `_.-`; up to 64 characters).
        path: The `.safetensors` file on every replica's machine (absolute).
        scale: Its strength (diffusers' `lora_scale`).
    """

    name: str
    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ServeLora:
        """`NAME=PATH[:SCALE]` (the CLI's `--lora`) -> ServeLora with an absolute path.

        Raises:
            SdoptError: no `NAME=` in front.
        """
        from pathlib import Path

        from sdopt.lora.files import parse_lora_arg

        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise SdoptError(
                f"--lora {text!r} is not NAME=PATH[:SCALE]", "use e.g. --lora style=/loras/style.safetensors:0.8"
            )
        spec = parse_lora_arg(rest)
        return cls(name, str(Path(spec.path).resolve()), spec.scale)

    def check(self) -> None:
        """Raises SdoptError for a name requests could not use or a scale that is no number."""
        if not LORA_NAME.fullmatch(self.name):
            raise SdoptError(
                f"LoRA name {self.name!r} is not usable in requests",
                "use letters, digits, '_', '.', '-' (up to 64 characters), starting with a letter or digit",
            )
        if not math.isfinite(self.scale):
            raise SdoptError(f"LoRA {self.name}: scale {self.scale} is not a number", "use e.g. 0.8")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `sdopt serve` starts a Serve application with.

    `replicas` is the fixed replica count; with `min_replicas`/`max_replicas` set, Ray Serve
    autoscales between them instead (target `max_batch` ongoing requests per replica).
    """

    artifact: str
    provider: str = "cpu"
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    threads: int | None = None  # ONNX Runtime intra-op threads per replica (None: physical cores)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # images stacked into one U-Net call; 1 turns batching off
    max_queue: int = 16  # requests waiting at the proxy beyond what replicas hold; then 503
    api_key_env: str | None = None  # name of the env var holding the Bearer key (never the key)
    request_timeout_s: float = 600.0
    retry_after_s: int = 2
    limits: ServeLimits = field(default_factory=ServeLimits)
    loras: tuple[ServeLora, ...] = ()  # the only LoRAs requests may name (files checked at start)

    def check(self) -> None:
        """Raises SdoptError for the first option that cannot work, with its fix."""
        if self.provider not in PROVIDERS:
            raise SdoptError(f"unknown provider {self.provider!r}", f"use one of: {', '.join(PROVIDERS)}")
        for name in ("replicas", "max_batch", "max_queue", "port", "retry_after_s"):
            if getattr(self, name) < 1:
                raise SdoptError(f"--{name.replace('_', '-')} must be at least 1", "pass a positive number")
        if self.port > 65535:
            raise SdoptError(f"--port {self.port} is not a TCP port", "use 1..65535, e.g. 8000")
        if self.request_timeout_s <= 0:
            raise SdoptError("--request-timeout must be positive", "use e.g. 600 (seconds)")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise SdoptError("autoscaling needs both --min-replicas and --max-replicas", "pass both, or --replicas N")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and not (0 <= self.min_replicas <= self.max_replicas >= 1)
        ):
            raise SdoptError(
                f"bad autoscaling bounds {self.min_replicas}..{self.max_replicas}",
                "use 0 <= --min-replicas <= --max-replicas, with --max-replicas >= 1",
            )
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise SdoptError(
                f"--api-key-env {self.api_key_env!r} is not an environment variable name",
                "pass the variable's NAME (e.g. SDOPT_API_KEY), never the key itself",
            )
        check_host(self.host)
        self.limits.check()
        names = [lora.name for lora in self.loras]
        for lora in self.loras:
            lora.check()
            if names.count(lora.name) > 1:
                raise SdoptError(f"LoRA name {lora.name!r} is configured twice", "give each --lora its own NAME")

    def to_args(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict: the deployment's constructor argument and a Serve config's `args`."""
        args = asdict(self)
        args["loras"] = [dict(lora) for lora in args["loras"]]  # YAML has lists, not tuples
        return args

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeConfig:
        """The inverse of `to_args`; unknown keys are an error (a typo in a config file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise SdoptError(f"unknown sdopt serve option(s) {unknown}", f"use only: {', '.join(sorted(known))}")
        limits = args.get("limits") or {}
        limit_names = {f.name for f in fields(ServeLimits)}
        if set(limits) - limit_names:
            raise SdoptError(
                f"unknown limit(s) {sorted(set(limits) - limit_names)}", f"use only: {', '.join(sorted(limit_names))}"
            )
        return cls(**{**args, "limits": ServeLimits(**limits), "loras": _loras_from_args(args.get("loras") or [])})

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve deployment options (the keys of `@serve.deployment` and a config's `deployments:`).

        A replica holds up to 2 x max_batch requests: max_batch in the running batch and as many
        waiting to join at the next step boundary. Beyond that, requests wait at the proxy, up to
        max_queue of them; the next one gets 503 with Retry-After. Ray Serve counts every request
        not yet assigned to a replica, so a burst larger than max_queue can see 503s for a moment
        even while replicas have free slots: size max_queue for the bursts you expect.
        """
        opts: dict[str, Any] = {
            "max_ongoing_requests": 2 * self.max_batch,
            "max_queued_requests": self.max_queue,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
            "health_check_period_s": 2.0,
            "graceful_shutdown_timeout_s": 5.0,
        }
        if self.min_replicas is not None:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.max_batch,
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts

    def backpressure(self) -> dict[str, Any]:
        """Ray Serve's backpressure response: 503 with Retry-After."""
        return {"status_code": 503, "retry_after_s": float(self.retry_after_s)}


def _loras_from_args(items: list[Any]) -> tuple[ServeLora, ...]:
    """A config file's `loras:` list ({name, path, scale} each) -> ServeLoras."""
    known = {f.name for f in fields(ServeLora)}
    out = []
    for item in items:
        if not isinstance(item, dict) or not {"name", "path"} <= set(item) or set(item) - known:
            raise SdoptError(
                f"bad LoRA entry {item!r} in the serve config", "write each as {name: NAME, path: PATH, scale: 1.0}"
            )
        out.append(ServeLora(str(item["name"]), str(item["path"]), float(item.get("scale", 1.0))))
    return tuple(out)


def check_host(host: str) -> None:
    """Loopback by default; 0.0.0.0 (or another address) only when asked for explicitly."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise SdoptError(f"--host {host!r} is not an IP address", "use 127.0.0.1 (default) or 0.0.0.0") from None
