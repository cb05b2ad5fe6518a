"""`sdopt serve`: an artifact over HTTP on Ray Serve, with step-level continuous batching.

config (ServeConfig, limits, LoRAs), schema (request/response bodies), engine (the step batcher),
lora_groups (LoRA names, and which requests may run together),
metrics (Prometheus), app (the FastAPI app of one replica), deploy (the Ray Serve deployment,
application builder, start/stop, config files), bench (`sdopt bench-serve`), process (`sdopt serve` as a
child process: the Server scenario, benchmarks and tests). Needs the
`[serve]` extra; nothing here is imported by `sdopt.runtime`.
"""
