"""The Ray Serve side: the replica deployment, the application builder, start/stop, config files.

- `SdoptServer`: the ingress deployment; each replica loads the artifact once and serves the
  FastAPI app of sdopt.serve.app. Ray Serve's health check calls `check_health`; a replica
  whose engine died is replaced.
- `app_builder(args)`: what `serve deploy` / KubeRay's `serveConfigV2` import
  (`import_path: sdopt.serve.deploy:app_builder`, `args:` a ServeConfig as a dict).
- `start(config, address)`: `sdopt serve`'s path: a local Ray instance (or `ray.init(address=...)`),
  `serve.start` with the HTTP host/port, `serve.run`.
- `write_config(config, path)`: the Serve config file `serve deploy` and a RayService take.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve

from sdopt.errors import SdoptError
from sdopt.serve.app import ReplicaState, create_app
from sdopt.serve.config import APP_NAME, DEPLOYMENT_NAME, ServeConfig

IMPORT_PATH = "sdopt.serve.deploy:app_builder"
DEFAULT_OBJECT_STORE_MB = 256


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SdoptServer:
    """One replica: the artifact's Pipeline, its step batcher and the HTTP API over them."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.state = ReplicaState.load(ServeConfig.from_args(args))

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.state)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: an engine that died marks the replica unhealthy."""
        if not self.state.engine.alive:
            raise RuntimeError(f"the step batcher stopped: {self.state.engine.error!r}")

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None:
            state.engine.close(timeout=2.0)


def build_app(config: ServeConfig) -> Any:
    """The Serve application (a bound deployment) for `config`.

    Args:
        config: A checked ServeConfig.

    Returns:
        A `ray.serve.Application` for `serve.run`.
    """
    return SdoptServer.options(**config.deployment_options(), backpressure_config=config.backpressure()).bind(
        config.to_args()
    )


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files: `args` is a ServeConfig as written by `write_config`."""
    config = ServeConfig.from_args(dict(args))
    config.check()
    return build_app(config)


def serve_config(config: ServeConfig) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema) that runs `config` on any Ray cluster.

    Args:
        config: A checked ServeConfig.

    Returns:
        A dict in the format of `serve build` output, validated with Ray's own schema.
    """
    from ray.serve.schema import ServeDeploySchema

    deployment = {"name": DEPLOYMENT_NAME, **config.deployment_options(), "backpressure_config": config.backpressure()}
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": config.to_args(),
                "deployments": [deployment],
            }
        ],
    }
    ServeDeploySchema.model_validate(doc)
    return doc


def write_config(config: ServeConfig, path: Path) -> Path:
    """Write `serve_config(config)` as YAML, atomically.

    Args:
        config: A checked ServeConfig.
        path: The YAML file to write.

    Returns:
        The path written.
    """
    import yaml

    header = (
        "# Ray Serve config written by `sdopt serve --write-config`.\n"
        "# Deploy: `serve deploy THIS_FILE` (a running Ray cluster with sdopt[serve] installed on every node,\n"
        "# and the artifact at the same path on every node), or paste everything from `applications:` into a\n"
        "# KubeRay RayService's spec.serveConfigV2. The API key (if any) is read from the named variable\n"
        "# in the workers' environment; it is never written here.\n"
    )
    text = header + yaml.safe_dump(serve_config(config), sort_keys=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def start(config: ServeConfig, address: str | None = None, object_store_mb: int = DEFAULT_OBJECT_STORE_MB) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on config.host:port, deploy and wait until it runs.

    Args:
        config: A checked ServeConfig.
        address: None for a new local Ray instance; "auto" or "ray://HOST:PORT" for a running cluster.
        object_store_mb: Object store size of a new local instance.

    Returns:
        The application's base URL.

    Raises:
        SdoptError: Ray or the application failed to start (the replica's own error included).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        if address:
            env = {config.api_key_env: os.environ[config.api_key_env]} if config.api_key_env in os.environ else {}
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=False)
        else:
            needed = config.cpus_per_replica * (config.max_replicas or config.replicas)
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                include_dashboard=False,
                object_store_memory=object_store_mb * 1024 * 1024,
                log_to_driver=False,
            )
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 - replica construction errors arrive wrapped by Ray
        raise _startup_error(e) from e
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


def _startup_error(error: Exception) -> SdoptError:
    """One readable line from Ray's wrapped replica-constructor failure (its SdoptError if there is one)."""
    text = str(error)
    try:  # the replica's own traceback is in the deployment's status message
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            text += "\n" + app.message + "\n" + "\n".join(d.message for d in app.deployments.values())
    except Exception:  # noqa: BLE001 - best effort: the generic line below still explains
        pass
    for line in reversed(text.splitlines()):
        if "SdoptError: " in line:
            problem, _, fix = line.split("SdoptError: ", 1)[1].partition(" — ")
            return SdoptError(f"a replica failed to start: {problem}", fix or None)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return SdoptError(
        f"the sdopt application failed to start: {lines[-1] if lines else type(error).__name__}",
        "`sdopt --debug serve ...` shows Ray's whole error",
    )


def ray_address() -> str:
    """The GCS address of the Ray instance this process is connected to (for `--address` and `ray status`)."""
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else ""


def stop(shutdown_ray: bool = True) -> None:
    """Delete the application and Serve's actors; shut the local Ray instance down too."""
    import ray

    if ray.is_initialized():
        serve.shutdown()
        if shutdown_ray:
            ray.shutdown()


def replica_actor_names() -> list[str]:
    """Named actors of this app's replicas (Ray's own API; e.g. to `ray.kill` one in a drill)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
