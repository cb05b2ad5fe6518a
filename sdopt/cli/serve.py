"""`sdopt serve` (an HTTP server on Ray Serve) and `sdopt bench-serve` (its load benchmark).

Ray, FastAPI and the HTTP client are imported inside the commands (the `[serve]` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from sdopt.cli.common import app, console, friendly_errors
from sdopt.errors import SdoptError

# Help texts too long to keep their option on one line.
_HOST_HELP = (
    "Address to listen on. Loopback by default; 0.0.0.0 exposes the server to the network and must be asked for."
)
_ADDRESS_HELP = (
    "Deploy onto a running Ray cluster: 'auto' or "
    "'ray://HOST:PORT' (then exit; the app keeps running there). Default: "
    "start a local Ray instance and serve until Ctrl-C."
)
_WRITE_CONFIG_HELP = (
    "Write the Serve config YAML for `serve deploy` / a KubeRay RayService's serveConfigV2, then exit."
)
_REPLICAS_HELP = "Replicas (each loads the artifact once and batches on its own)."
_MAX_REPLICAS_HELP = "Autoscale: upper bound (target: --max-batch ongoing requests per replica)."
_THREADS_HELP = "ONNX Runtime threads per replica (default: physical cores)."
_MAX_BATCH_HELP = (
    "Images stacked into one U-Net call per replica (step-level continuous batching); 1 turns batching off."
)
_MAX_QUEUE_HELP = "Requests that may wait beyond what the replicas hold; the next gets 503 with Retry-After."
_API_KEY_ENV_HELP = (
    "Name of an environment variable holding an API key; requests must then send 'Authorization: Bearer <key>'."
)
_REQUEST_TIMEOUT_HELP = "Seconds a request may take; then 504 and its steps stop."
_MAX_SIZE_HELP = "Largest image side in pixels (the artifact's own range applies too)."
_LORA_HELP = (
    "A LoRA requests may use, as NAME=PATH[:SCALE] (a .safetensors file, diffusers/PEFT or kohya; scale default 1). "
    "Repeat for more. Requests name it ('lora': NAME, or a list to stack); paths never come from requests. "
    "Every file is read and matched against the artifact at start."
)


@app.command()
@friendly_errors
def serve(
    artifact: Path = typer.Argument(
        ..., help="Artifact folder written by `sdopt export` (fixed for the server's life)."
    ),
    host: str = typer.Option("127.0.0.1", help=_HOST_HELP),
    port: int = typer.Option(8000, help="HTTP port."),
    address: Optional[str] = typer.Option(None, "--address", help=_ADDRESS_HELP),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help=_WRITE_CONFIG_HELP),
    replicas: int = typer.Option(1, help=_REPLICAS_HELP),
    min_replicas: Optional[int] = typer.Option(None, help="Autoscale: lower bound (with --max-replicas)."),
    max_replicas: Optional[int] = typer.Option(None, help=_MAX_REPLICAS_HELP),
    cpus_per_replica: float = typer.Option(1.0, help="CPUs Ray reserves per replica."),
    threads: Optional[int] = typer.Option(None, help=_THREADS_HELP),
    max_batch: int = typer.Option(8, help=_MAX_BATCH_HELP),
    max_queue: int = typer.Option(16, help=_MAX_QUEUE_HELP),
    provider: str = typer.Option("cpu", help="cpu, cuda (onnxruntime-gpu) or tensorrt."),
    api_key_env: Optional[str] = typer.Option(None, help=_API_KEY_ENV_HELP),
    request_timeout: float = typer.Option(600.0, help=_REQUEST_TIMEOUT_HELP),
    max_steps: int = typer.Option(100, help="Largest num_inference_steps a request may ask for."),
    max_size: int = typer.Option(1024, help=_MAX_SIZE_HELP),
    max_images: int = typer.Option(4, help="Largest n (images per request)."),
    max_body_bytes: int = typer.Option(16 * 1024 * 1024, help="Largest request body in bytes; beyond: 413."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", metavar="NAME=PATH[:SCALE]", help=_LORA_HELP),
) -> None:
    """Serve an artifact over HTTP (OpenAI Images API shape) on Ray Serve, with step-level batching."""
    from sdopt.serve.config import ServeConfig, ServeLimits, ServeLora

    limits = ServeLimits(max_steps=max_steps, max_size=max_size, max_images=max_images, max_body_bytes=max_body_bytes)
    config = ServeConfig(
        artifact=str(artifact.expanduser().resolve()),
        provider=provider,
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        cpus_per_replica=cpus_per_replica,
        threads=threads,
        host=host,
        port=port,
        max_batch=max_batch,
        max_queue=max_queue,
        api_key_env=api_key_env,
        request_timeout_s=request_timeout,
        limits=limits,
        loras=tuple(ServeLora.parse(text) for text in lora or []),
    )
    config.check()
    if config.loras and not write_config and (artifact / "sdopt.json").is_file():
        from sdopt.serve.lora_groups import LoraCatalog

        LoraCatalog(config.loras).check_files(artifact)  # before Ray starts: one clear error
    _serve_or_deploy(config, artifact, address, write_config, api_key_env)


def _serve_or_deploy(
    config: Any, artifact: Path, address: Optional[str], write_config: Optional[Path], api_key_env: Optional[str]
) -> None:
    """After the config checks: write the Serve config file, deploy onto a cluster, or serve locally."""
    if not (artifact / "sdopt.json").is_file() and not write_config:
        raise SdoptError(
            f"{artifact} is not an sdopt artifact (no sdopt.json)", "pass a folder written by `sdopt export`"
        )
    try:
        from sdopt.serve import deploy
    except ImportError as e:
        raise SdoptError(f"serving needs Ray Serve and FastAPI ({e})", "pip install 'sdopt[serve]'") from None
    if api_key_env and not write_config and not os.environ.get(api_key_env):
        if not address:  # the local Ray instance's replicas inherit this environment
            raise SdoptError(f"--api-key-env {api_key_env}: the variable is not set", f"export {api_key_env}=<key>")
        console.print(f"note: {api_key_env} is not set here; the cluster's workers must have it")
    if write_config:
        path = deploy.write_config(config, write_config)
        console.print(f"wrote {path}: `serve deploy {path}`, or its applications into a RayService's serveConfigV2")
        return
    _run(config, address, deploy)


def _run(config: Any, address: Optional[str], deploy: Any) -> None:
    import signal
    import threading

    try:
        url = deploy.start(config, address)
    except BaseException:
        if not address:  # leave no local Ray instance behind
            deploy.stop()
        raise
    if address:
        console.print(
            f"deployed on the Ray cluster at {address}: {url} (the cluster's HTTP proxy). "
            "Remove it with `serve shutdown`.",
            soft_wrap=True,
        )
        return
    console.print(
        f"sdopt serving {config.artifact} at {url} (POST {url}/v1/images/generations, docs {url}/docs); "
        f"local Ray instance {deploy.ray_address()}; Ctrl-C stops",
        soft_wrap=True,
        highlight=False,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        console.print("shutting down")
        deploy.stop()


@app.command("bench-serve")
@friendly_errors
def bench_serve(
    url: str = typer.Argument(..., help="Base URL of a running `sdopt serve` on this machine (loopback only)."),
    requests: int = typer.Option(16, "--requests", "-n", help="Requests to send."),
    concurrency: int = typer.Option(4, "--concurrency", "-c", help="Requests in flight at once."),
    steps: int = typer.Option(8, help="num_inference_steps per request."),
    size: Optional[str] = typer.Option(None, help="'WxH' (default: the server's)."),
    guidance: float = typer.Option(7.5, help="guidance_scale per request."),
    time_limit: float = typer.Option(
        600.0, help="Stop sending after this many seconds; unanswered requests count as 'timeout'."
    ),
    api_key_env: Optional[str] = typer.Option(None, help="Environment variable holding the server's API key."),
    out: Optional[Path] = typer.Option(None, help="Also write the result as JSON here."),
    label: str = typer.Option("", help="Free text stored with the result (e.g. the server's options)."),
) -> None:
    """Load-test a running server: N requests at concurrency C; images/s, p50/p90/p99, counts by status."""
    from sdopt.serve.bench import BenchServeOptions, run_bench_serve, write_result

    options = BenchServeOptions(
        url=url,
        requests=requests,
        concurrency=concurrency,
        steps=steps,
        size=size,
        guidance=guidance,
        time_limit_s=time_limit,
        api_key_env=api_key_env,
        label=label,
    )
    result = run_bench_serve(options)
    console.print(result.summary())
    if out:
        console.print(f"wrote {write_result(result, out)}")
