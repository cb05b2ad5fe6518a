"""Build TensorRT engines from an artifact's verified ONNX files, into the artifact itself.

Engines are specific to a GPU model and TensorRT version, so they live under
`engines/<gpu>_sm<cc>_trt<version>/<component>.plan` (with that folder's own timing cache) and
each one is recorded as a `sdopt.manifest.EngineEntry`, which the runtime checks before it
deserializes anything. Networks are strongly typed: precision comes from
the ONNX (an fp16 export gives fp16 engines with its fp32 islands), never from builder
flags, which is the only mode TensorRT 11 has and the opt-in `STRONGLY_TYPED` mode of 10.x.

Importing this module does not import TensorRT. The profile and path logic is pure and
CPU-tested; the TensorRT calls were written against the documented Python API of TensorRT
10.x/11.x and have not been executed in this repository's CI.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sdopt.engines.trt import import_tensorrt, trt_logger
from sdopt.errors import SdoptError
from sdopt.export.controlnet_trt import with_derived_dims  # ControlNet hook (issue 15)
from sdopt.hardware import GpuFacts, gpu_facts
from sdopt.manifest import (
    MANIFEST_NAME,
    EngineEntry,
    EngineFlags,
    Manifest,
    ShapeRange,
    load_manifest,
    sha256_file,
    verify_files,
)

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
Progress = Callable[[str, str, str], None]  # (component, stage, detail); stages: parse, build, done

# Components whose batch the caller chooses (prompts encoded per call, input images), not the
# image count: even static builds give them a batch range, or valid calls would not fit.
CALLER_BATCH = ("text_encoder", "text_encoder_2", "vae_encoder")
OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level


@dataclass
class BuildOptions:
    static: bool = False  # min = opt = max at batch/height/width (default: the manifest's opt)
    batch: int | None = None  # images per call (the U-Net sees twice this with guidance)
    height: int | None = None  # pixels; dynamic builds tune for it (profile opt)
    width: int | None = None
    opt_level: int = 3  # builder optimization level 0..5: higher builds slower, may run faster
    workspace_gb: float | None = None  # workspace memory pool limit; None: TensorRT's default
    timing_cache: Path | None = None  # None: timing.cache in the engines' own folder (read and updated)
    refittable: bool = False  # BuilderFlag.REFIT: weights can be replaced later (sdopt.engines.trt.refit_engine)
    version_compatible: bool = False  # loads in later TensorRT versions; embeds host code
    tf32: bool = True  # TensorRT's default; False clears BuilderFlag.TF32 (full fp32 matmuls and convolutions)
    components: list[str] | None = None  # None: every component the runtime loads
    force: bool = False  # replace engines already built for this GPU and TensorRT version


# -- pure parts ---------------------------------------------------------------------------------
def check_build_options(options: BuildOptions) -> None:
    """What can be checked without the artifact (before a long `export --tensorrt`)."""
    if options.opt_level not in OPT_LEVELS:
        raise SdoptError(
            f"--opt-level {options.opt_level} is not in 0..5",
            "use 3 (the default), or 5 for the slowest, most thorough search",
        )
    if options.workspace_gb is not None and options.workspace_gb <= 0:
        raise SdoptError(
            f"--workspace-gb {options.workspace_gb} must be positive", "omit it to let TensorRT use what it needs"
        )


def dim_ranges(
    manifest: Manifest,
    component: str,
    static: bool = False,
    batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dim of `component`.

    Dynamic: the manifest's ranges, with opt moved to the requested batch/size. Static: the
    requested (or default) values, with the batch doubled where the manifest's batch range is
    (guidance runs the conditional and unconditional halves in one call).
    """
    img, comp = manifest.image, manifest.components[component]
    images, h, w = batch or 1, height or img.default_height, width or img.default_width
    img.check(h, w, batch, flag="--")  # the one size rule (sdopt.manifest.ImageSpec)
    factor = max(1, comp.dims["batch"].max // img.max_batch) if "batch" in comp.dims else 1
    values = {
        "batch": images * factor,
        "height": h,
        "width": w,
        "latent_height": h // manifest.vae.scale,
        "latent_width": w // manifest.vae.scale,
    }
    given = {"batch": batch, "height": height, "width": width, "latent_height": height, "latent_width": width}
    out: dict[str, tuple[int, int, int]] = {}
    for name, r in comp.dims.items():
        v = values.get(name, r.opt)
        if not r.contains(v):
            raise SdoptError(
                f"{component} {name} {v} is outside the exported range {r.min}..{r.max}",
                "choose a batch and size inside the artifact's ranges (`sdopt inspect`)",
            )
        if static and name == "batch" and component in CALLER_BATCH:
            out[name] = (r.min, min(max(images, r.min), v), v)
        elif static:
            out[name] = (v, v, v)
        else:
            out[name] = (r.min, v if given.get(name) is not None else r.opt, r.max)
    return with_derived_dims(out)  # ControlNet hook: residual dims follow the latent dims


def engine_profiles(
    manifest: Manifest,
    component: str,
    static: bool = False,
    batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> list[Profile]:
    """The optimization profile(s) of one component: (min, opt, max) shape per graph input."""
    if component not in manifest.components:
        raise SdoptError(f"the artifact has no {component}", f"choose from {', '.join(manifest.components)}")
    ranges = dim_ranges(manifest, component, static, batch, height, width)
    profile: Profile = {}
    for spec in manifest.components[component].inputs:
        per_dim = [(d, d, d) if isinstance(d, int) else ranges[d] for d in spec.shape]
        lo, opt, hi = (tuple(t[i] for t in per_dim) for i in range(3))
        profile[spec.name] = (lo, opt, hi)
    return [profile]


def engine_dir(trt_version: str, gpu_name: str, compute_capability: str) -> str:
    """`engines/<gpu-slug>_sm<major><minor>_trt<version>`, relative to the artifact root."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    version = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    return f"engines/{slug}_sm{compute_capability.replace('.', '')}_trt{version}"


def _atomic_write(path: Path, data: Any) -> None:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _record(root: Path, entries: list[EngineEntry]) -> Manifest:
    """Merge `entries` into the manifest on disk (re-read, so a concurrent build's are kept)."""
    manifest = load_manifest(root)
    paths = {e.path for e in entries}
    manifest.engines = [e for e in manifest.engines if e.path not in paths] + entries
    _atomic_write(root / MANIFEST_NAME, manifest.to_json().encode())
    return manifest


# -- TensorRT ------------------------------------------------------------------------------------
def preflight() -> tuple[Any, GpuFacts]:
    """The tensorrt module and this host's GPU, or the error saying what is missing."""
    trt = import_tensorrt()
    return trt, gpu_facts(0)  # TensorRT builds on the current CUDA device (0 unless CUDA_VISIBLE_DEVICES)


def build_engines(
    artifact_dir: str | Path, options: BuildOptions, progress: Progress | None = None
) -> list[EngineEntry]:
    """Build one engine per component into the artifact and record them in its manifest.

    Args:
        artifact_dir: an artifact folder written by `sdopt export`.
        options: what to build (see BuildOptions).
        progress: called with (component, stage, detail) as each engine is parsed, built and done.
    Returns:
        The new manifest entries, one per component built.
    """
    root = Path(artifact_dir).expanduser().resolve()
    progress = progress or (lambda *_: None)
    check_build_options(options)
    manifest = load_manifest(root)
    names = options.components or manifest.runtime_components()  # one U-Net engine: unet_deep where present
    if manifest.controlnet and not options.components:  # ControlNet hook: the residual U-Net is that engine
        names = manifest.controlnet.components_to_load(names)
    profiles = {
        n: engine_profiles(manifest, n, options.static, options.batch, options.height, options.width) for n in names
    }
    trt, gpu = preflight()
    folder = engine_dir(trt.__version__, gpu.name, gpu.compute_capability)
    clash = [e.component for e in manifest.engines if e.path in {f"{folder}/{n}.plan" for n in names}]
    if clash and not options.force:
        raise SdoptError(
            f"{root} already has {', '.join(clash)} engines for this GPU and TensorRT {trt.__version__}",
            f"pass --force to rebuild them: sdopt build {root} --force",
        )
    verify_files(root, manifest, names)  # build only from the ONNX the manifest vouches for

    builder = trt.Builder(trt_logger(trt))
    cache_path = timing_cache_path(root, folder, options)
    cache = None
    entries = []
    for name in names:
        config = builder.create_builder_config()
        if cache is None:
            cache = _load_timing_cache(config, cache_path)
        entries.append(
            _build_one(
                trt, builder, config, cache, root, manifest, name, profiles[name], folder, gpu, options, progress
            )
        )
        _atomic_write(cache_path, cache.serialize())  # after each engine: a later failure keeps the timings
    _record(root, entries)
    return entries


def timing_cache_path(root: Path, folder: str, options: BuildOptions) -> Path:
    """`--timing-cache`, else `timing.cache` in the engine folder (one per GPU model and TensorRT version).

    Builds on other GPUs or TensorRT versions write their own folder's cache, so none replaces
    another's: each is read with ignore_mismatch=False and only ever holds timings it can use.
    """
    return options.timing_cache or root / folder / "timing.cache"


def _load_timing_cache(config: Any, path: Path) -> Any:
    """The persisted timing cache, or an empty one when absent or unreadable."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - unreadable cache: start afresh
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
    return cache


def _parse(trt: Any, builder: Any, onnx_path: Path) -> tuple[Any, Any]:
    """(network, parser) of one ONNX file, strongly typed; keep the parser while the network is in use."""
    # STRONGLY_TYPED: opt-in on 10.x; on 11.x always on, the flag kept (ignored) for compatibility.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, trt_logger(trt))
    if hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # no plugin: version-compatible engines allow none
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weight data is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SdoptError(
            f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors[:500]}",
            "re-export with a supported opset (`sdopt export --opset 17`), or update TensorRT",
        )
    return network, parser


def add_profiles(builder: Any, config: Any, network: Any, profiles: list[Profile], what: str) -> None:
    """Add each profile to `config`; TensorRT answers -1 for an invalid one, which is raised here.

    Args:
        builder: the trt.Builder (makes the IOptimizationProfile objects).
        config: the IBuilderConfig to add them to.
        network: the parsed network (its inputs name the shapes; static inputs take none).
        profiles: input name -> (min, opt, max) per profile.
        what: the ONNX file, for messages.
    """
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name not in shapes:
                raise SdoptError(f"{what} input {tensor.name} is not in the manifest", "re-export the artifact")
            if any(d < 0 for d in tuple(tensor.shape)):  # only dynamic inputs take a profile
                profile.set_shape(tensor.name, *shapes[tensor.name])
        if config.add_optimization_profile(profile) < 0:
            shown = ", ".join(
                f"{k} min {list(lo)} opt {list(opt)} max {list(hi)}" for k, (lo, opt, hi) in shapes.items()
            )
            raise SdoptError(
                f"TensorRT rejected the optimization profile of {what}: {shown}",
                "each input needs min <= opt <= max inside the exported ranges; check `sdopt inspect`",
            )


def configure(trt: Any, config: Any, options: BuildOptions) -> None:
    """Builder flags and limits of `options` on one IBuilderConfig."""
    config.builder_optimization_level = options.opt_level
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    if options.refittable:
        # REFIT, not REFIT_IDENTICAL: sdopt refits to change weights (LoRA), which REFIT_IDENTICAL forbids.
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if hasattr(trt.BuilderFlag, "DISABLE_COMPILATION_CACHE"):
        config.set_flag(trt.BuilderFlag.DISABLE_COMPILATION_CACHE)  # keep JIT code out of the timing cache


def _build_one(
    trt: Any,
    builder: Any,
    config: Any,
    cache: Any,
    root: Path,
    manifest: Manifest,
    name: str,
    profiles: list[Profile],
    folder: str,
    gpu: GpuFacts,
    options: BuildOptions,
    progress: Progress,
) -> EngineEntry:
    t0 = time.perf_counter()
    onnx_path = root / manifest.components[name].path
    progress(name, "parse", str(onnx_path))
    network, _parser = _parse(trt, builder, onnx_path)  # the parser owns weights the network points at
    add_profiles(builder, config, network, profiles, str(onnx_path))
    configure(trt, config, options)
    config.set_timing_cache(cache, ignore_mismatch=False)

    progress(name, "build", f"opt level {options.opt_level}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SdoptError(
            f"TensorRT failed to build the {name} engine (see its log above)",
            "try --workspace-gb with more memory, a lower --opt-level, or a narrower size range (--static)",
        )
    rel = f"{folder}/{name}.plan"
    _atomic_write(root / rel, serialized)
    seconds = round(time.perf_counter() - t0, 2)
    progress(name, "done", f"{seconds:.1f} s")
    return engine_entry(name, rel, root, trt.__version__, gpu, profiles, options, seconds)


def engine_entry(
    name: str,
    rel: str,
    root: Path,
    trt_version: str,
    gpu: GpuFacts,
    profiles: list[Profile],
    options: BuildOptions,
    seconds: float,
) -> EngineEntry:
    """The manifest entry of an engine file just written to `root / rel`."""
    return EngineEntry(
        component=name,
        path=rel,
        sha256=sha256_file(root / rel),
        bytes=(root / rel).stat().st_size,
        tensorrt=trt_version,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        profiles=[{k: ShapeRange(list(lo), list(opt), list(hi)) for k, (lo, opt, hi) in p.items()} for p in profiles],
        flags=EngineFlags(
            static=options.static,
            refittable=options.refittable,
            version_compatible=options.version_compatible,
            strongly_typed=True,
            tf32=options.tf32,
            opt_level=options.opt_level,
            workspace_gb=options.workspace_gb,
        ),
        build_seconds=seconds,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


__all__ = [
    "BuildOptions",
    "add_profiles",
    "build_engines",
    "check_build_options",
    "configure",
    "dim_ranges",
    "engine_dir",
    "engine_entry",
    "engine_profiles",
    "preflight",
    "timing_cache_path",
]
