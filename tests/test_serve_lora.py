"""`sdopt serve --lora NAME=PATH[:SCALE]`: requests name LoRAs configured at start, never paths.

One real `sdopt serve` process (local Ray instance, tiny artifact, two LoRA files) is shared by
the module and driven by a real HTTP client on loopback. References: the same artifact's
`Pipeline` in this process with `set_loras` of the same files and scales, same arguments and
seed. Tolerance: 1 of 255 per 8-bit channel, as in test_serve.py: ONNX Runtime may differ in the
last float bits between batch sizes, which can flip one rounding; measured 0 here. A LoRA moves
these images by far more (asserted: > 8 of 255), so a request that ran on another request's
weights, or shared a U-Net call with one, fails the comparison.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("peft")
requests = pytest.importorskip("requests")

from lora_files import make_peft_lora  # noqa: E402
from PIL import Image  # noqa: E402
from serve_process import serve_process  # noqa: E402

from sdopt.errors import SdoptError  # noqa: E402
from sdopt.serve.config import ServeConfig, ServeLora  # noqa: E402
from sdopt.serve.lora_groups import LoraCatalog, LoraTurns  # noqa: E402

TOL = 1  # of 255, see the module docstring
MOVES = 8  # of 255: each LoRA changes the image by more than this, or the comparison proves nothing
STEPS = 4


@pytest.fixture(scope="module")
def lora_paths(tmp_path_factory):
    """style: U-Net (attention, ff, proj, conv) + text encoder, rank 4; detail: U-Net only, rank 2."""
    root = tmp_path_factory.mktemp("serve-loras")
    style = make_peft_lora("tiny", root / "style.safetensors", ("unet", "text_encoder"), seed=0, conv=True)
    detail = make_peft_lora("tiny", root / "detail.safetensors", ("unet",), rank=2, alpha=1.0, seed=1, std=0.2)
    return {"style": (style, 1.0), "detail": (detail, 0.5)}


@pytest.fixture(scope="module")
def server(tiny_artifact, lora_paths, tmp_path_factory):
    args = ["--max-batch", "4", "--threads", "1", "--max-size", "256"]
    for name, (path, scale) in lora_paths.items():
        args += ["--lora", f"{name}={path}:{scale}"]
    log = tmp_path_factory.mktemp("serve-lora") / "serve.log"
    with serve_process(str(tiny_artifact("tiny")), args, log) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_artifact, lora_paths):
    """reference(body) -> the 8-bit image `Pipeline` gives in-process with set_loras of the body's LoRAs."""
    from sdopt.runtime import Pipeline

    pipe = Pipeline.load(tiny_artifact("tiny"), threads=1)

    def get(body: dict) -> np.ndarray:
        names = body.get("lora") or []
        names = [names] if isinstance(names, str) else names
        order = [n for n in lora_paths if n in names]  # the server stacks in configured order
        pipe.set_loras([lora_paths[n] for n in order])
        image = pipe(body["prompt"], num_inference_steps=STEPS, seed=body["seed"], output_type="np").images[0]
        return (image * 255).round().astype(np.int16)

    return get


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text[:500]
    raw = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(np.int16)


def compare(record_metric, case: str, got: np.ndarray, want: np.ndarray) -> None:
    diff = float(np.abs(got - want).max())
    record_metric("serve LoRA: max 8-bit diff vs in-process set_loras", case, diff)
    assert diff <= TOL, f"{case}: {diff:g} of 255"


def test_lora_request_matches_set_loras_and_base_comes_back(server, reference, record_metric):
    body = {"prompt": "a lighthouse", "seed": 21, "num_inference_steps": STEPS}
    assert server.post({**body, "seed": 0}).status_code == 200  # whatever ran before: base weights now
    swaps = server.metric("sdopt_lora_swaps_total")
    base = server.post(body)
    styled = server.post({**body, "lora": "style"})
    again = server.post(body)
    got = pixels(styled)
    compare(record_metric, "style alone", got, reference({**body, "lora": "style"}))
    timings = styled.json()["timings"]
    assert 0 < timings["lora_swap"] <= timings["queue"]  # it waited for the swap to style
    assert "lora_swap" not in base.json()["timings"]  # no swap before it
    assert np.abs(got - pixels(base)).max() > MOVES  # the LoRA really applied
    # Restoring re-creates the base sessions exactly as at load: the PNG bytes are the same.
    assert again.json()["data"][0]["b64_json"] == base.json()["data"][0]["b64_json"]
    assert server.metric("sdopt_lora_swaps_total") - swaps >= 2  # to style and back
    assert server.metric("sdopt_lora_swap_seconds_count") >= 2


def test_interleaved_requests_each_run_on_their_own_loras(server, reference, record_metric):
    """Concurrent requests for two LoRAs, their stack and the base: each image is its set's reference."""
    sets = [None, "style", "detail", ["detail", "style"], "style", None, "detail", []]
    bodies = [
        {"prompt": f"a garden {i}", "seed": 100 + i, "num_inference_steps": STEPS, "lora": s}
        for i, s in enumerate(sets)
    ]
    swaps = server.metric("sdopt_lora_swaps_total")
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(server.post, bodies))
    done = server.metric("sdopt_lora_swaps_total") - swaps
    record_metric("serve LoRA: swaps for 8 concurrent requests over 4 LoRA sets", "swaps", done)
    for body, response in zip(bodies, responses, strict=True):
        got = pixels(response)
        compare(record_metric, f"interleaved {body['lora']}, seed {body['seed']}", got, reference(body))
        if body["lora"]:
            assert np.abs(got - reference({**body, "lora": None})).max() > MOVES, body
    assert 1 <= done <= len(bodies)


def test_unknown_lora_400_lists_the_names(server):
    for lora, words in (("nope", ["'nope'", "style, detail"]), (["style", "style"], ["repeat"]), (3, ["lora"])):
        r = server.post({"prompt": "x", "num_inference_steps": 2, "lora": lora})
        assert r.status_code == 400, (lora, r.text)
        error = r.json()["error"]
        assert all(w in error["message"] for w in words) and error["fix"], error
    ready = requests.get(server.url + "/ready", timeout=10).json()
    assert ready["loras"] == ["style", "detail"]
    assert set(ready["lora_applied"]) <= {"style", "detail"}


def test_bad_lora_file_fails_at_start(tiny_artifact, lora_paths, tmp_path):
    """A bad file: one SdoptError naming the LoRA, before Ray starts (CLI) and where a replica starts (config)."""
    from safetensors.numpy import save_file

    artifact = tiny_artifact("tiny")
    alien = tmp_path / "alien.safetensors"
    save_file(
        {"unet.no_such_block.to_q.lora_A.weight": np.zeros((2, 8), np.float32)}, str(alien)
    )  # names no module of this model
    pickle = tmp_path / "old.safetensors"
    pickle.write_bytes(b"\x80\x04K\x01.")
    cases = [(alien, "no_such_block"), (pickle, "pickle"), (tmp_path / "missing.safetensors", "does not exist")]
    for path, word in cases:
        with pytest.raises(SdoptError, match=f"--lora bad: .*{word}"):
            LoraCatalog((ServeLora("ok", str(lora_paths["style"][0])), ServeLora("bad", str(path)))).check_files(
                artifact
            )
    done = subprocess.run(
        [sys.executable, "-m", "sdopt", "serve", str(artifact), "--lora", f"bad={alien}", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "--lora bad:" in out and "Traceback" not in out, out[-2000:]
    assert "Ray" not in out  # refused before any Ray instance started
    from sdopt.serve.app import ReplicaState

    with pytest.raises(SdoptError, match="--lora bad: .*does not exist"):  # a config file's path: the replica
        ReplicaState.load(ServeConfig(str(artifact), loras=(ServeLora("bad", str(tmp_path / "x.safetensors")),)))


def test_lora_config_parse_and_round_trip(tmp_path):
    import yaml

    from sdopt.serve.deploy import write_config

    lora = ServeLora.parse("style=rel/style.safetensors:0.75")
    assert lora.name == "style" and lora.scale == 0.75 and lora.path.startswith("/")
    assert ServeLora.parse("plain=/a/b.safetensors").scale == 1.0
    for bad, word in (("noname.safetensors", "NAME=PATH"), ("=x.safetensors", "NAME=PATH")):
        with pytest.raises(SdoptError, match=word):
            ServeLora.parse(bad)
    with pytest.raises(SdoptError, match="twice"):
        ServeConfig("a", loras=(ServeLora("x", "/p"), ServeLora("x", "/q"))).check()
    with pytest.raises(SdoptError, match="not usable"):
        ServeConfig("a", loras=(ServeLora("has space", "/p"),)).check()
    config = ServeConfig("/models/a", loras=(lora, ServeLora("b", "/l/b.safetensors")))
    config.check()
    args = yaml.safe_load(write_config(config, tmp_path / "serve.yaml").read_text())["applications"][0]["args"]
    assert args["loras"][0] == {"name": "style", "path": lora.path, "scale": 0.75}
    assert ServeConfig.from_args(args) == config
    with pytest.raises(SdoptError, match="LoRA entry"):
        ServeConfig.from_args({**args, "loras": [{"name": "x", "file": "/p"}]})


class _Job:
    def __init__(self, seq: int, lora: tuple[str, ...]) -> None:
        self.seq, self.lora = seq, lora


def test_turns_group_by_lora_and_never_starve():
    """The turn policy itself: a turn takes every waiting job of its set; jobs of that set arriving
    while another set waits do not extend the turn past it."""
    a, b = ("a",), ("b",)
    turns = LoraTurns()
    waiting = [_Job(0, a), _Job(1, b), _Job(2, a), _Job(3, ())]
    assert turns.next_set(waiting) == a
    turns.begin(a, 4)
    assert [j.seq for j in turns.admissible(waiting)] == [0, 2]  # both a's, though b waits between them
    waiting = [_Job(1, b), _Job(3, ()), _Job(4, a), _Job(5, a)]  # new a's arrive while b and base wait
    assert turns.admissible(waiting) == []  # the turn ends once its jobs finish
    assert turns.next_set(waiting) == b
    turns.begin(b, 6)
    assert [j.seq for j in turns.admissible(waiting)] == [1]
    turns.begin((), 6)
    assert [j.seq for j in turns.admissible([_Job(6, ()), _Job(7, ())])] == [6, 7]  # nothing else waits: all
