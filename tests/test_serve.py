"""`sdopt serve`: the real server (Ray Serve + FastAPI) on loopback, driven by a real HTTP client.

One `sdopt serve` process (its own local Ray instance, tiny artifact) is shared by the module;
the last test stops it with Ctrl-C and checks that nothing is left. Every request has a client
timeout, so nothing here can hang.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402
from serve_process import CLIENT_TIMEOUT, Server, free_port, serve_process  # noqa: E402

from sdopt.errors import SdoptError  # noqa: E402
from sdopt.serve.config import ServeConfig  # noqa: E402

KEY_ENV = "SDOPT_TEST_SERVE_KEY"
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


SERVE_ARGS = [
    "--max-batch",
    "4",
    "--max-queue",
    "8",
    "--threads",
    "1",
    "--api-key-env",
    KEY_ENV,
    "--max-steps",
    "60",
    "--max-size",
    "256",
    "--max-body-bytes",
    "300000",
]


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    """`sdopt serve ARTIFACT` exactly as a user runs it: a local Ray instance, loopback, Ctrl-C to stop."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(str(tiny_artifact("tiny")), SERVE_ARGS, log, env={KEY_ENV: KEY}, headers=AUTH) as server:
        yield server
        _assert_clean_shutdown(server)


def _assert_clean_shutdown(server: Server) -> None:
    """Ctrl-C: Serve and the local Ray instance stop, the port closes, no process is left behind.

    Run as the module fixture's teardown, so it checks the shutdown whatever order the tests ran in."""
    import psutil

    children = psutil.Process(server.proc.pid).children(recursive=True)

    def cmdline(p):
        try:
            return " ".join(p.cmdline())
        except psutil.Error:
            return ""

    assert any("raylet" in cmdline(c) for c in children)  # the local Ray instance belongs to the CLI process
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(90) == 0, server.log.read_text()[-3000:]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.url + "/health", timeout=5)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [cmdline(p)[:200] for p in alive]


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


# -- contract pieces without Ray ------------------------------------------------------------------
def test_config_checks_and_serve_config_file(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from sdopt.serve.deploy import app_builder, write_config

    with pytest.raises(SdoptError, match="0.0.0.0"):
        ServeConfig(artifact="x", host="example.com").check()
    with pytest.raises(SdoptError, match="both"):
        ServeConfig(artifact="x", min_replicas=1).check()
    with pytest.raises(SdoptError, match="NAME"):
        ServeConfig(artifact="x", api_key_env="sk-abc def").check()
    config = ServeConfig(artifact="/models/sd15", min_replicas=1, max_replicas=4, host="0.0.0.0", api_key_env="K")
    config.check()
    path = write_config(config, tmp_path / "serve.yaml")
    import yaml

    doc = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(doc)  # the format `serve deploy` and RayService.serveConfigV2 take
    app = doc["applications"][0]
    assert app["import_path"] == "sdopt.serve.deploy:app_builder"
    assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == 4
    assert "K" == app["args"]["api_key_env"] and KEY not in path.read_text()
    assert ServeConfig.from_args(app["args"]) == config
    app_builder(app["args"])  # builds the Application (Ray not started)
    with pytest.raises(SdoptError, match="unknown"):
        ServeConfig.from_args({**app["args"], "replica": 2})


def test_bench_serve_refuses_non_loopback():
    from sdopt.serve.bench import check_loopback

    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000")
    for url in ("http://10.1.2.3:8000", "http://8.8.8.8", "ftp://127.0.0.1"):
        with pytest.raises(SdoptError):
            check_loopback(url)


def test_serving_path_imports_no_torch(tiny_artifact):
    """The replica's modules (Ray Serve deployment, app, engine, runtime) stay torch-free."""
    code = textwrap.dedent(f"""
        import sys
        import sdopt.serve.deploy  # the replica's module: Ray Serve + the app
        from sdopt.serve.app import ReplicaState, create_app
        from sdopt.serve.config import ServeConfig
        state = ReplicaState.load(ServeConfig(artifact={str(tiny_artifact("tiny"))!r}, threads=1))
        create_app(state)
        state.engine.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        print("LOADED", loaded)
        sys.exit(1 if loaded else 0)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_request_timeout_504_and_cancel(tiny_artifact):
    """The same FastAPI app under plain uvicorn: past --request-timeout -> 504, its steps stop."""
    import uvicorn

    from sdopt.serve.app import ReplicaState, create_app

    config = ServeConfig(artifact=str(tiny_artifact("tiny")), threads=1, request_timeout_s=0.5, max_batch=2)
    state = ReplicaState.load(config)
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(state), host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        r = requests.post(url, json={"prompt": "slow", "num_inference_steps": 100, "n": 2}, timeout=CLIENT_TIMEOUT)
        assert r.status_code == 504, r.text
        assert "timeout" in r.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while state.engine.load() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.engine.load() == (0, 0)  # the timed-out jobs left the batch
        assert state.metrics.registry.get_sample_value("sdopt_images_total") == 0  # and never finished
    finally:
        srv.should_exit = True
        thread.join(10)
        state.engine.close()


# -- the real server ------------------------------------------------------------------------------
CASES = [  # varied on purpose: they share U-Net calls at different steps, with and without CFG
    {"prompt": "a red fox", "seed": 1, "num_inference_steps": 6, "n": 2},
    {"prompt": "a blue car", "seed": 2, "num_inference_steps": 4, "guidance_scale": 1.0, "scheduler": "euler-a"},
    {"prompt": "a castle", "seed": 3, "num_inference_steps": 8, "scheduler": "dpm++2m", "negative_prompt": "fog"},
    {"prompt": "a boat", "seed": 4, "num_inference_steps": 5, "size": "64x128", "scheduler": "ddim"},
    {"prompt": "a tree", "seed": 5, "num_inference_steps": 7, "scheduler": "pndm"},
    {"prompt": "a lamp", "seed": 6, "num_inference_steps": 3},
]


def test_concurrent_requests_match_pipeline(server, tiny_artifact):
    """Concurrent requests all come back, and each image equals Pipeline's for its seed, however batched."""
    from sdopt.runtime import Pipeline

    calls_before = server.metric("sdopt_unet_batch_images_count")
    images_before = server.metric("sdopt_unet_batch_images_sum")
    with ThreadPoolExecutor(len(CASES)) as pool:
        responses = list(pool.map(server.post, CASES))
    assert [r.status_code for r in responses] == [200] * len(CASES), [
        r.text[:300] for r in responses if r.status_code != 200
    ]
    calls = server.metric("sdopt_unet_batch_images_count") - calls_before
    stacked = server.metric("sdopt_unet_batch_images_sum") - images_before
    assert stacked > calls, "no U-Net call stacked two requests: batching did not happen"

    pipe = Pipeline.load(tiny_artifact("tiny"))
    for case, response in zip(CASES, responses, strict=True):
        body = response.json()
        assert len(body["data"]) == case.get("n", 1)
        assert {"queue", "text_encoder", "unet", "vae_decoder", "total"} <= set(body["timings"])
        for i, item in enumerate(body["data"]):
            assert item["seed"] == case["seed"] + i
            w, h = map(int, case.get("size", "128x128").split("x"))
            ref = pipe(
                case["prompt"],
                negative_prompt=case.get("negative_prompt"),
                height=h,
                width=w,
                num_inference_steps=case["num_inference_steps"],
                guidance_scale=case.get("guidance_scale", 7.5),
                scheduler=case.get("scheduler"),
                seed=item["seed"],
                output_type="np",
            ).images[0]
            ref8 = (ref * 255).round().astype(np.int16)
            got = png_pixels(item["b64_json"]).astype(np.int16)
            # Tolerance 1/255: ONNX Runtime may differ in the last float bits between batch sizes, which can
            # flip one 8-bit rounding; measured 0.0 (float) on this tiny fp32 artifact, see README "Serving".
            assert np.abs(got - ref8).max() <= 1, (case, i)


def test_mlperf_server_scenario_over_http(server, tiny_artifact, tmp_path, monkeypatch):
    """`sdopt bench`'s Server scenario (sdopt.bench.server_scenario) against this real server: N Poisson-timed
    queries as real HTTP requests; all answered, latencies positive, each image the runtime's for its seed."""
    from sdopt.bench.records import Job
    from sdopt.bench.server_scenario import BATCH_METRICS, batching, query_bodies, send_queries
    from sdopt.runtime import Pipeline
    from sdopt.serve.bench import read_metrics

    monkeypatch.setenv(KEY_ENV, KEY)
    job = Job("unused", "blurry", 3, 7.5, 64, 64, 1, 0, "euler", 1, [1, 4, 8, 8])
    items = [(f"a lighthouse, variation {i}", 100 + i) for i in range(6)]
    before = read_metrics(server.url, BATCH_METRICS)
    result = send_queries(
        server.url, query_bodies(items, job), qps=50.0, target_s=60.0, seed=3, api_key_env=KEY_ENV, folder=tmp_path
    )
    stacked = batching(before, read_metrics(server.url, BATCH_METRICS))
    # 6 images x 3 Euler steps: 18 image-steps went through the U-Net, however they were stacked.
    assert stacked is not None and stacked["unet_images"] == 18 and stacked["unet_calls"] >= 1
    assert result.transport == f"HTTP POST {server.url}/v1/images/generations", result
    assert result.statuses == {"200": 6}, result
    assert result.completed == result.queries == 6 and result.met is True
    assert 0 < result.latency_p50_s <= result.latency_p99_s < 60
    ref = Pipeline.load(tiny_artifact("tiny"))(
        items[5][0],
        negative_prompt="blurry",
        height=64,
        width=64,
        num_inference_steps=3,
        scheduler="euler",
        seed=105,
        output_type="np",
    ).images[0]
    got = np.asarray(Image.open(tmp_path / "00005.png").convert("RGB")).astype(np.int16)
    # 1/255: batch-size-dependent last-bit differences may flip one 8-bit rounding (as above).
    assert np.abs(got - (ref * 255).round().astype(np.int16)).max() <= 1
    with pytest.raises(SdoptError, match="SDOPT_TEST_UNSET_KEY is not set"):
        send_queries(server.url, query_bodies(items[:1], job), 50.0, 60.0, api_key_env="SDOPT_TEST_UNSET_KEY")
    # `sdopt bench-serve` shares the client (post_generation): it still counts images and statuses.
    from sdopt.serve.bench import BenchServeOptions, run_bench_serve

    load = run_bench_serve(BenchServeOptions(server.url, requests=2, concurrency=2, steps=2, api_key_env=KEY_ENV))
    assert load.statuses == {"200": 2} and load.images == 2 and {"unet", "total"} <= set(load.server_timings_s)


def test_bench_server_scenario_to_server_url(server, tmp_path, monkeypatch):
    """`sdopt bench --quality N --server-url URL --server-api-key-env VAR`: the Server scenario goes to this server."""
    pytest.importorskip("torchmetrics", reason="sdopt[quality] is not installed")
    from bench_cli import invoke

    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "out"
    result = invoke(
        server.artifact,
        *("--backends", "onnxruntime", "--runs", "1", "--warmup", "0", "--steps", "2", "--height", "64"),
        *("--width", "64", "--quality", "3", "--server-url", server.url, "--server-api-key-env", KEY_ENV),
        *("--server-qps", "20", "--scheduler", "euler", "--out", str(out)),
    )
    assert result.exit_code == 0, result.output
    sv = json.loads((out / "results.json").read_text())["quality"]["server"]
    assert (sv["started_by"], sv["url"]) == ("--server-url", server.url)
    assert (sv["statuses"], sv["completed"]) == ({"200": 3}, 3)
    assert sv["ready"]["family"] == "sd1" and sv["latency_p50_s"] > 0 and "vs_offline" not in sv
    # 3 images x 2 Euler steps (one U-Net pass per step; PNDM would add a warm-up pass per image)
    assert sv["batching"]["unet_images"] == 3 * 2


def test_bad_requests_400(server):
    bad = [
        ({"prompt": "x", "sizee": "64x64"}, "sizee"),
        ({"prompt": "x", "num_inference_steps": 61}, "limit"),
        ({"prompt": "x", "size": "100x100"}, "multiple"),
        ({"prompt": "x", "size": "big"}, "WIDTHxHEIGHT"),
        ({"prompt": "x", "n": 5}, "limit"),
        ({"prompt": "x", "scheduler": "nope"}, "scheduler"),
        ({"prompt": "x", "response_format": "url"}, "response_format"),
        ({"prompt": "x", "mask": "aGk="}, "mask"),
        ({"prompt": "x", "image": "not base64!"}, "base64"),
        ({"prompt": "x", "image_path": "/etc/passwd"}, "image_path"),  # no server file paths, ever
    ]
    for body, word in bad:
        r = server.post(body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert word in error["message"] and error["fix"], (body, error)
    r = requests.post(server.url + "/v1/images/generations", data=b"{not json", headers=AUTH, timeout=10)
    assert r.status_code == 400


def test_img2img_over_http(server):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(buf, format="PNG")
    body = {
        "prompt": "x",
        "image": base64.b64encode(buf.getvalue()).decode(),
        "strength": 0.5,
        "num_inference_steps": 4,
        "seed": 0,
    }
    r = server.post(body)
    assert r.status_code == 200, r.text
    assert png_pixels(r.json()["data"][0]["b64_json"]).shape == (64, 64, 3)  # img2img keeps the input size


def test_auth_401(server):
    assert server.post({"prompt": "x"}, headers={}).status_code == 401
    r = server.post({"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    assert requests.get(server.url + "/health", timeout=10).status_code == 200  # probes need no key


def test_body_too_large_413(server):
    r = server.post({"prompt": "x", "image": "A" * 400_000})
    assert r.status_code == 413, r.text


def test_queue_full_503_with_retry_after(server):
    """More requests than replica slots (2 x max_batch) + proxy queue (max_queue): the rest get 503."""
    # The server's step limit (60), so that no request finishes before all 30 have arrived: with
    # shorter requests a fast machine drained the queue as the client filled it (all 200, no 503).
    with ThreadPoolExecutor(30) as pool:
        responses = list(
            pool.map(lambda i: server.post({"prompt": f"p{i}", "num_inference_steps": 60, "seed": i}), range(30))
        )
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 8 and codes.count(503) >= 1, codes
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 503)


def test_ops_endpoints(server):
    assert requests.get(server.url + "/ready", timeout=10).json()["ready"] is True
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert "/v1/images/generations" in spec["paths"]
    assert requests.get(server.url + "/docs", timeout=10).status_code == 200
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in (
        "sdopt_requests_total",
        "sdopt_queue_depth",
        "sdopt_unet_batch_images",
        "sdopt_step_seconds",
        "sdopt_images_per_second",
    ):
        assert name in text


def test_client_disconnect_cancels_remaining_steps(server):
    """The client hangs up once its request is running: the replica stops its steps and counts a 499.

    The hang-up waits until /ready shows the request active: a fixed client timeout raced Ray's proxy
    on a loaded machine (the client left before the replica saw the request, so nothing was counted)."""
    images = server.metric("sdopt_images_total")
    gone = server.metric('sdopt_requests_total{status="499"}')
    url = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=CLIENT_TIMEOUT)
    body = json.dumps({"prompt": "gone", "num_inference_steps": 60, "n": 4})
    conn.request("POST", "/v1/images/generations", body, {**server.headers, "Content-Type": "application/json"})

    def ready() -> dict:
        return requests.get(server.url + "/ready", timeout=10).json()

    deadline = time.monotonic() + 30
    while ready()["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready()["active"] >= 1, "the request never started"
    conn.close()  # the client hangs up mid-request
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = ready()
        if (state["active"], state["waiting"]) == (0, 0) and server.metric(
            'sdopt_requests_total{status="499"}'
        ) > gone:
            break
        time.sleep(0.1)
    assert (state["active"], state["waiting"]) == (0, 0)
    assert server.metric("sdopt_images_total") == images  # its 4 images were never finished
    assert server.metric('sdopt_requests_total{status="499"}') == gone + 1


def ray_driver(server: Server, code: str, **popen: Any) -> subprocess.Popen:
    """Start Ray API calls as a separate driver on the server's Ray instance.

    Joining by explicit address needs Ray's token mode in the environment before Ray starts
    (RAY_AUTH_MODE=token; the token is ~/.ray/auth_token, written by the server's ray.init).
    """
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    prologue = f"import ray\nray.init(address={server.ray_address()!r}, log_to_driver=False)\n"
    return subprocess.Popen([sys.executable, "-c", prologue + textwrap.dedent(code)], env=env, text=True, **popen)


def ray_api(server: Server, code: str) -> str:
    """Run Ray API calls as a separate driver on the server's Ray instance; returns its stdout."""
    driver = ray_driver(server, code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, out[-2000:] + err[-2000:]
    return out


REPLICAS = "from sdopt.serve.deploy import replica_actor_names\nprint(*replica_actor_names())\n"
KILL_ON_CUE = """
import sys
actor = ray.get_actor({name!r}, namespace="serve")
print("ready", flush=True)
sys.stdin.readline()
ray.kill(actor, no_restart=True)
print("killed", flush=True)
"""


def test_replica_killed_mid_load(server):
    """Kill the replica through Ray's API under load: the requests it held end with a 5xx, none hangs,
    the requests still queued at Ray's proxy are served by the replacement replica."""
    names = ray_api(server, REPLICAS).split()
    assert len(names) == 1
    results: list = []
    held = 2 * 4  # the replica holds 2 x --max-batch requests; the 2 beyond wait at the proxy

    def one(i):
        try:
            results.append(server.post({"prompt": f"k{i}", "num_inference_steps": 30, "seed": i}).status_code)
        except requests.exceptions.RequestException as e:  # a hang would show as ReadTimeout
            results.append(type(e).__name__)

    # Joining Ray takes seconds on a loaded machine, longer than these requests: join first, kill on cue.
    killer = ray_driver(server, KILL_ON_CUE.format(name=names[0]), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert killer.stdout.readline().strip() == "ready"
    threads = [threading.Thread(target=one, args=(i,)) for i in range(held + 2)]
    for t in threads:
        t.start()

    def active() -> int:
        # Under this load Ray's proxy may itself answer /ready with a plain-text 503 (queue full):
        # that counts as "not known yet", not as a failure.
        r = requests.get(server.url + "/ready", timeout=10)
        return r.json()["active"] if r.headers.get("content-type", "").startswith("application/json") else 0

    deadline = time.monotonic() + 20
    while active() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    killer.stdin.write("kill\n")  # the driver joined Ray before the load: the kill itself is immediate
    killer.stdin.flush()
    assert killer.stdout.readline().strip() == "killed"
    killer.wait(timeout=60)
    for t in threads:
        t.join(CLIENT_TIMEOUT + 10)
    print("statuses after the kill:", results)
    assert len(results) == held + 2 and all(isinstance(r, int) for r in results), results  # all answered
    assert all(r == 200 or 500 <= r < 600 for r in results), results
    assert 1 <= sum(r >= 500 for r in results) <= held, results  # only requests the dead replica held failed
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve's controller replaces the replica
        try:
            if server.post({"prompt": "back", "num_inference_steps": 2}, timeout=10).status_code == 200:
                break
        except requests.exceptions.RequestException:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the replica did not come back within 90 s")
    new = ray_api(server, REPLICAS).split()
    assert len(new) == 1 and new != names


def test_address_deploys_onto_running_cluster(server):
    """`sdopt serve --address` deploys onto a running Ray cluster (here the server's own) and exits."""
    args = list(SERVE_ARGS)
    args[args.index("--max-batch") + 1] = "2"
    port = server.url.rsplit(":", 1)[1]
    cmd = [
        sys.executable,
        "-m",
        "sdopt",
        "serve",
        server.artifact,
        "--address",
        server.ray_address(),
        "--port",
        port,
        *args,
    ]
    env = {**os.environ, KEY_ENV: KEY, "RAY_AUTH_MODE": "token"}  # explicit address: Ray's token mode, see ray_api
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "deployed on the Ray cluster" in done.stdout
    deadline = time.monotonic() + 60
    while requests.get(server.url + "/ready", timeout=10).json()["max_batch"] != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert requests.get(server.url + "/ready", timeout=10).json()["max_batch"] == 2
    assert server.post({"prompt": "redeployed", "num_inference_steps": 2}).status_code == 200
