"""The weights part of a LoRA swap (file, B @ A, base weights, merge): two code versions side by side.

    python benchmarks/lora_swap_weights.py ARTIFACT --code before=/path/to/old/checkout --code after=. [--rounds 3]

What `set_loras` does before it creates sessions (`LoraSwapper.overrides`: `plan_deltas` or,
in older code, `compute_deltas`, then `build_overrides`), for the "style" LoRA of
benchmarks/lora_swap.py (rank 16, U-Net + text encoder), in fresh processes: call 0 is the first
swap in a process, call 1 the next. Each process imports the `sdopt` of its `--code` folder, and
the versions alternate round by round, so both see the same machine load. Records wall, user and
system CPU seconds, minor page faults and peak RSS per call (`getrusage`). No ONNX Runtime
session is created and no pipeline is loaded (peak RSS under 3 GB for sd15), so this is not the
whole swap: benchmarks/lora_swap.py measures that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

CHILD = """
import json, os, resource, sys, time
from pathlib import Path
import sdopt.lora.files as files
from sdopt.manifest import load_manifest
from sdopt.runtime.backends.onnxruntime import OnnxRuntimeBackend
from sdopt.runtime.lora_swap import build_overrides, manifest_targets

art, lora = Path(sys.argv[1]), Path(sys.argv[2])
manifest = load_manifest(art)
backend = OnnxRuntimeBackend(art, manifest)
plan = getattr(files, "plan_deltas", None) or files.compute_deltas  # older code: every delta at once
calls = []
for call in range(2):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    deltas = plan([files.LoraSpec(lora)], manifest_targets(manifest))
    out = build_overrides(art, manifest, deltas, backend.optimised_graph, manifest.runtime_components())
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    merged_gb = sum(v.nbytes for o in out.values() for v in o.initializers.values()) / 1e9
    calls.append(dict(call=call, wall_s=round(t1 - t0, 3), user_s=round(r1.ru_utime - r0.ru_utime, 3),
                      sys_s=round(r1.ru_stime - r0.ru_stime, 3), minor_faults=r1.ru_minflt - r0.ru_minflt,
                      merged_gb=round(merged_gb, 3)))
    del out, deltas
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
load = [round(x, 2) for x in os.getloadavg()]
print(json.dumps(dict(sdopt=files.__file__, calls=calls, peak_rss_gb=round(rss, 2), load_average=load)))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--code", action="append", required=True, help="NAME=FOLDER holding an sdopt package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    codes = dict(item.split("=", 1) for item in args.code)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parent / "results" / f"lora-swap-weights-sd15-cpu-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from lora_swap import STYLE_TEXT, STYLE_UNET, write_lora

    from sdopt.manifest import load_manifest

    lora = out / "style-rank16.safetensors"
    write_lora(
        load_manifest(args.artifact),
        lora,
        16,
        lambda c, mod: mod.split(".")[-1] in STYLE_TEXT or any(mod.endswith(t) for t in STYLE_UNET),
        seed=1,
    )
    runs = []
    for round_ in range(args.rounds):
        for name, folder in codes.items():
            env = {**os.environ, "PYTHONPATH": str(Path(folder).resolve())}
            proc = subprocess.run(  # run in the folder: `python -c` puts the working folder first on sys.path
                [sys.executable, "-c", CHILD, str(args.artifact.resolve()), str(lora.resolve())],
                cwd=Path(folder).resolve(),
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append({"round": round_, "code": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(json.dumps(runs[-1]), flush=True)
    lora.unlink()
    result = {"artifact": str(args.artifact), "codes": codes, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
