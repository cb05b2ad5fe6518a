"""The HTTP API of one replica (FastAPI): generation, health, readiness, metrics, OpenAPI docs.

`create_app(state)` builds the app over a loaded `ReplicaState`; the Ray deployment
(sdopt.serve.deploy) hands it to Ray Serve, which runs it behind its HTTP proxy.

| condition                                   | answer                               |
|---------------------------------------------|--------------------------------------|
| bad parameters (schema, limits, SdoptError) | 400, the message and its fix         |
| missing or wrong Bearer key                 | 401                                  |
| body over --max-body-bytes                  | 413                                  |
| replica or proxy queue full                 | 503 with Retry-After                 |
| past --request-timeout                      | 504 (its remaining steps cancelled)  |
| client gone                                 | its remaining steps cancelled        |
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from sdopt.errors import SdoptError
from sdopt.serve.config import ServeConfig
from sdopt.serve.engine import Job, JobResult, QueueFull, StepBatcher
from sdopt.serve.lora_groups import LoraCatalog, LoraSet
from sdopt.serve.metrics import ServeMetrics
from sdopt.serve.schema import ErrorBody, ImagesRequest, ImagesResponse, encode_png, error_body, pipeline_calls

GENERATIONS = "/v1/images/generations"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad parameters"},
    401: {"model": ErrorBody, "description": "missing or wrong key"},
    413: {"model": ErrorBody, "description": "body too large"},
    503: {"model": ErrorBody, "description": "queue full (Retry-After)"},
    504: {"model": ErrorBody, "description": "past the request timeout"},
}
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


@dataclass
class ReplicaState:
    """What one replica serves from: the pipeline, its batching engine, metrics and the key."""

    config: ServeConfig
    pipe: Any  # sdopt.runtime.Pipeline
    engine: StepBatcher
    metrics: ServeMetrics
    api_key: str | None

    @classmethod
    def load(cls, config: ServeConfig) -> ReplicaState:
        """Load the artifact and start the engine.

        Args:
            config: The server's (checked) configuration.

        Returns:
            The replica's state, ready to serve.

        Raises:
            SdoptError: the API key variable is unset, the artifact cannot be loaded, or a configured
                LoRA file does not fit it.
        """
        from sdopt.runtime import Pipeline

        api_key = None
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise SdoptError(
                    f"--api-key-env {config.api_key_env} is not set (or empty) where the replica runs",
                    f"export {config.api_key_env}=<key> before `sdopt serve` (on a cluster: in the "
                    "workers' environment)",
                )
        options: dict[str, Any] = {"threads": config.threads} if config.threads and config.provider == "cpu" else {}
        loras = LoraCatalog(config.loras)
        loras.check_files(config.artifact)  # a bad file fails the replica at start, not the first request
        pipe = Pipeline.load(config.artifact, provider=config.provider, **options)
        engine_max = pipe.manifest.image.max_batch
        if config.provider == "tensorrt" and engine_max is not None and config.max_batch > engine_max:
            # TensorRT engines are built for a batch range; ONNX Runtime graphs take any batch.
            raise SdoptError(
                f"--max-batch {config.max_batch} exceeds the engines' maximum batch {engine_max}",
                f"use --max-batch {engine_max} or re-export and rebuild with a larger --max-batch",
            )
        metrics = ServeMetrics()
        engine = StepBatcher(
            pipe,
            config.max_batch,
            max_waiting=2 * config.max_batch * config.limits.max_images,
            observer=metrics,
            loras=loras,
        )
        return cls(config, pipe, engine, metrics, api_key)


def create_app(state: ReplicaState) -> FastAPI:
    """The replica's FastAPI app over `state`.

    Args:
        state: A loaded ReplicaState.

    Returns:
        The ASGI app (docs at /docs, schema at /openapi.json).
    """
    app = FastAPI(
        title="sdopt",
        version="1",
        description="Stable Diffusion images over HTTP (OpenAI Images API "
        "shape), step-level continuous batching inside each replica.",
    )
    schema = ImagesRequest.model_json_schema()

    @app.post(
        GENERATIONS,
        response_model=ImagesResponse,
        summary="Generate images (OpenAI Images API shape)",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        responses=ERROR_RESPONSES,
    )
    async def generations(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = await _generate(state, request, t0)
        except asyncio.CancelledError:
            state.metrics.request_done(499)  # the client went away; Ray cancels the handler
            raise
        state.metrics.request_done(response.status_code, time.perf_counter() - t0)
        return response

    @app.get("/health", summary="Liveness: the replica's engine thread runs")
    async def health() -> Response:
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/ready", summary="Readiness: the artifact is loaded and the engine takes requests")
    async def ready() -> Response:
        waiting, active = state.engine.load()
        m = state.pipe.manifest
        body = {
            "ready": state.engine.alive,
            "family": m.family,
            "source": m.source,
            "max_batch": state.config.max_batch,
            "loras": state.engine.loras.names,  # what requests may name in "lora"
            "lora_applied": list(state.engine.applied_loras),
            "waiting": waiting,
            "active": active,
        }
        return JSONResponse(body, status_code=200 if state.engine.alive else 503)

    @app.get("/metrics", summary="Prometheus metrics of the replica that answers")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _error(status: int, message: str, fix: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {
        401: "authentication_error",
        413: "invalid_request_error",
        503: "server_busy",
        504: "timeout",
        500: "server_error",
    }.get(status, "invalid_request_error")
    return JSONResponse(error_body(status, message, fix, kind), status_code=status, headers=headers)


async def _generate(state: ReplicaState, request: Request, t0: float) -> Response:
    """Authenticate, read and validate the body, run it through the engine, answer."""
    config = state.config
    if state.api_key is not None and not _authorized(request, state.api_key):
        return _error(
            401,
            "missing or wrong API key",
            "send the header 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    body = await _read_body(request, config.limits.max_body_bytes)
    if body is None:
        return _error(
            413,
            f"request body over the server's limit of {config.limits.max_body_bytes} bytes",
            "send smaller images (or fewer)",
        )
    try:  # image decoding and resizing run off the event loop
        lora, requests = await asyncio.to_thread(_validate, state, body)
    except ValidationError as e:
        return _error(400, _validation_message(e), "see the request schema at /docs")
    except SdoptError as e:
        return _error(400, e.problem, e.fix)
    jobs: list[Job] = []
    try:
        for r in requests:
            jobs.append(state.engine.submit(r, lora))
    except QueueFull as e:
        _cancel(state, jobs)
        return _error(503, e.problem, e.fix, {"Retry-After": str(config.retry_after_s)})
    except SdoptError as e:
        _cancel(state, jobs)
        return _error(400, e.problem, e.fix)
    return await _await_jobs(state, request, jobs, t0)


def _validate(state: ReplicaState, body: bytes) -> tuple[LoraSet, list[Any]]:
    """The body's LoRA set and its validated single-image GenerationRequests (raises ValidationError or
    SdoptError)."""
    limits = state.config.limits
    parsed = ImagesRequest.model_validate_json(body)
    lora = state.engine.loras.lora_set(parsed.lora)
    requests = [state.pipe.make_request(**call) for call in pipeline_calls(parsed, limits)]
    for r in requests:
        if max(r.height, r.width) > limits.max_size:
            raise SdoptError(
                f"{r.width}x{r.height} is over the server's limit of {limits.max_size} per side",
                "send a smaller image or size",
            )
    return lora, requests


async def _await_jobs(state: ReplicaState, request: Request, jobs: list[Job], t0: float) -> Response:
    timeout = state.config.request_timeout_s - (time.perf_counter() - t0)
    try:
        results = await _wait(jobs, request, timeout)
    except TimeoutError:
        _cancel(state, jobs)
        return _error(
            504,
            f"not done within the server's request timeout of {state.config.request_timeout_s:g} s",
            "retry later, or with fewer steps or images",
        )
    except asyncio.CancelledError:  # Ray Serve cancels the handler when the client disconnects
        _cancel(state, jobs)
        raise
    except SdoptError as e:
        _cancel(state, jobs)
        return _error(400, e.problem, e.fix)
    except Exception as e:  # noqa: BLE001 - an engine failure answers 500, the server goes on
        _cancel(state, jobs)
        return _error(500, f"generation failed: {type(e).__name__}: {e}", "retry; report it if it persists")
    if results is None:
        _cancel(state, jobs)
        return _error(499, "client disconnected", None)
    images: list[JobResult] = [r for job_results in results for r in job_results]
    data = await asyncio.to_thread(lambda: [{"b64_json": encode_png(r.image), "seed": r.seed} for r in images])
    stages = {k: max(r.timings.get(k, 0.0) for r in images) for k in images[0].timings}
    stages["total"] = time.perf_counter() - t0
    return JSONResponse({"created": int(time.time()), "data": data, "timings": stages})


async def _wait(jobs: list[Job], request: Request, timeout: float) -> list[list[JobResult]] | None:
    """All jobs' results; None as soon as the client is gone. Raises TimeoutError past `timeout`."""
    gathered = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
    deadline = time.perf_counter() + timeout
    try:
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait({gathered}, timeout=min(DISCONNECT_POLL_S, remaining))
            if done:
                return gathered.result()
            if await request.is_disconnected():
                return None
    finally:
        if not gathered.done():
            gathered.cancel()


def _cancel(state: ReplicaState, jobs: list[Job]) -> None:
    for job in jobs:
        state.engine.cancel(job)


def _authorized(request: Request, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed `limit` bytes (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        parts.append(f"{where}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)
