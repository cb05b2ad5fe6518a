"""The artifact manifest (`sdopt.json`): the one contract between export and runtime.

The exporter writes it last, after every component is exported and verified; the runtime
trusts nothing in an artifact folder that it does not describe. Pure python (json +
dataclasses) so that both sides can import it. Bump `MANIFEST_VERSION` on any change a
reader of the previous version would misread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError
from sdopt.manifest_engines import EngineEntry, EngineFlags, ShapeRange  # noqa: F401  (part of the contract)

MANIFEST_NAME = "sdopt.json"
MANIFEST_FORMAT = "sdopt-artifact"
MANIFEST_VERSION = 2  # 2: unet_deep beside unet, output aliases (Optimum's graph interface)
READABLE_VERSIONS = (1, 2)  # version 1 artifacts run unchanged (their unet has deep_feature)

FAMILIES = ("sd1", "sd2", "sdxl")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "unet_deep", "unet_shallow", "vae_decoder", "vae_encoder")
# `unet` is Optimum's interface (one output, out_sample); `unet_deep` is the same graph with the
# DeepCache `deep_feature` output too, in this file beside it and over the same weights file.
# The runtime loads one of the two (`Manifest.runtime_components`): one copy of the weights.
UNET_DEEP_FILE = "model_deep.onnx"


@dataclass
class TensorSpec:
    """One graph input or output. `shape` entries are ints or names of `Component.dims`."""

    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: list[int | str]


@dataclass
class DimRange:
    """A dynamic dimension's range; `opt` is what TensorRT profiles tune for."""

    min: int
    opt: int
    max: int

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass
class Verification:
    """ONNX Runtime (CPU) vs the PyTorch module on the same seeded inputs."""

    max_abs_err: float
    max_rel_err: float
    tolerance: float
    passed: bool
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class WeightRef:
    """Where one torch weight (a LoRA target) lives in a component's ONNX graph: the
    initializer holding it, as-is or transposed (MatMul). `initializer` is empty where the
    exporter folded the weight into another constant (no runtime LoRA swap there)."""

    initializer: str
    shape: list[int]  # the torch weight's shape
    transposed: bool = False
    # The saved ORT-optimised CPU graph holds it too: under `ort_cpu_initializer`, in
    # `ort_cpu_layout` ("" = as in model.onnx; NCHWc blocked filters: sdopt/lora/layout.py).
    ort_cpu: bool = False
    ort_cpu_initializer: str = ""
    ort_cpu_layout: str = ""


@dataclass
class Component:
    name: str
    path: str  # relative to the artifact root, e.g. "unet/model.onnx"
    precision: str  # fp32 | fp16 (fp16 may keep fp32 islands, listed in fp32_ops)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimRange]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    verification: Verification | None = None
    fp32_ops: list[str] = field(default_factory=list)
    export_seconds: float = 0.0
    # ONNX Runtime's fully optimised CPU graph, saved at export so sessions load in seconds.
    # It holds layouts for one CPU instruction set: used only where `ort_cpu_target` matches.
    ort_cpu_path: str | None = None
    ort_cpu_target: str | None = None
    # Runtime role -> graph output name, e.g. {"pooled": "text_embeds", "penultimate_hidden_state":
    # "hidden_states.11"}: the graphs keep Optimum's output names, the runtime reads roles.
    aliases: dict[str, str] = field(default_factory=dict)
    # LoRA: "<module>.weight" (diffusers/transformers naming) -> its initializer (sdopt/export/weight_map.py).
    weights: dict[str, WeightRef] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def concrete_shape(self, spec: TensorSpec, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else values[d] for d in spec.shape)


@dataclass
class ImageSpec:
    """Image sizes and batch the exported graphs accept (pixels; latents are /vae scale)."""

    min_size: int | None  # None: not recorded (an Optimum export: the graphs' sizes are dynamic)
    max_size: int | None
    multiple: int  # height and width must be multiples (VAE scale x U-Net downsampling)
    default_height: int
    default_width: int
    max_batch: int | None  # images per call; the U-Net and text encoders see 2x for CFG. None: not recorded

    def check(
        self, height: int, width: int, batch: int | None = None, flag: str = "", where: str = "the exported"
    ) -> None:
        """The one image-size rule, for export, runtime, TensorRT builds and the benchmark.

        Sizes must be positive multiples of 8 (the VAE's downsampling) and of `multiple` (the
        U-Net's), inside the exported range; a batch must be 1..max_batch. Odd sizes would
        otherwise fail deep inside an engine.

        Args:
            height: Image height in pixels.
            width: Image width in pixels.
            batch: Images per call, or None to skip the batch check.
            flag: Prefix of the names in messages, e.g. "--" where the values came from CLI flags.
            where: Whose limits these are, in messages ("the exported", "synthetic:tiny's").

        Raises:
            SdoptError: naming the first value that breaks the rule and a value that would not.
        """
        for name, value in ((f"{flag}height", height), (f"{flag}width", width)):
            check_multiple(name, value, 8)
            check_multiple(name, value, self.multiple)
            lo, hi = self.min_size, self.max_size  # None: not recorded (an Optimum export)
            if lo is not None and hi is not None and not lo <= value <= hi:
                raise SdoptError(
                    f"{name} {value} is outside {where} range {self.min_size}..{self.max_size}",
                    f"use a size in range, or re-export with --min-size/--max-size covering {value}",
                )
        too_many = batch is not None and self.max_batch is not None and batch > self.max_batch
        if batch is not None and (batch < 1 or too_many):
            raise SdoptError(
                f"{batch} images per call exceed {where} maximum batch {self.max_batch}"
                if too_many
                else f"images per call must be at least 1, got {batch}",
                f"generate 1..{self.max_batch} at once, or re-export with --max-batch {max(batch, 1)}"
                if self.max_batch is not None
                else "generate at least one image",
            )


def check_multiple(name: str, value: int, multiple: int) -> None:
    """`value` must be a positive multiple of `multiple`; the error suggests the nearest one."""
    if value <= 0 or value % multiple:
        raise SdoptError(
            f"{name} {value} is not a positive multiple of {multiple}",
            f"use e.g. {max(multiple, round(value / multiple) * multiple)}",
        )


@dataclass
class VaeSpec:
    scaling_factor: float
    shift_factor: float | None
    scale: int  # pixels per latent
    latent_channels: int
    force_upcast: bool = False


FULL_UNETS = ("unet", "unet_deep")  # U-Net graphs the residual U-Net stands in for (ControlNet)


# -- ControlNet (issue 15; sdopt/export/controlnet*.py writes it, sdopt/runtime/controlnet.py reads it) --
@dataclass
class ControlNetSpec:
    """One exported ControlNet: its graph is `Manifest.components[component]`."""

    name: str  # what `controlnet=` / `--controlnet` selects: the source folder's name, or NAME= at export
    component: str  # "controlnet.<name>"; its graph is controlnet/<name>/model.onnx
    source: dict[str, str]
    conditioning_channels: int = 3


@dataclass
class ControlNetSection:
    """The artifact's ControlNets and the U-Net graph that takes their residuals.

    Each ControlNet graph maps (sample, timestep, encoder_hidden_states [, text_embeds, time_ids],
    controlnet_cond, conditioning_scale[batch, len(residuals)]) to the scaled residuals named in
    `residuals`, which are also the extra inputs of the `unet` component (unet/control.onnx).
    That graph reads its weights from `shared_weights`, the same file as unet/model.onnx.
    """

    unet: str  # component key of the residual-taking U-Net, "unet_control"
    residuals: list[str]  # down_block_additional_residual_0..N-1, then mid_block_additional_residual
    controlnets: list[ControlNetSpec]
    shared_weights: str  # e.g. "unet/model.onnx.data"
    shared_bytes: int = 0  # bytes of unet_control's weights read from shared_weights
    own_bytes: int = 0  # bytes stored in unet/control.onnx itself (tensors the plain U-Net lacks)

    def get(self, name: str) -> ControlNetSpec | None:
        return next((c for c in self.controlnets if c.name == name), None)

    def components_to_load(self, names: list[str], controlnet: bool = True) -> list[str]:
        """What a runtime (or a TensorRT build for it) loads of `names`: with ControlNets, the
        residual U-Net in place of every full U-Net graph (same weights: one U-Net in memory)
        plus the ControlNets; without, everything but those."""
        control = [self.unet, *(c.component for c in self.controlnets)]
        names = [n for n in names if n not in control]
        return [n for n in names if n not in FULL_UNETS] + control if controlnet else names


@dataclass
class LoraRecord:
    """A LoRA merged into the weights at export (`sdopt export --lora PATH[:SCALE]`)."""

    file: str  # the file's name as given
    sha256: str
    scale: float


@dataclass
class Manifest:
    family: str
    source: dict[str, str]
    prediction_type: str
    precision: str
    opset: int
    exporter: str
    image: ImageSpec
    vae: VaeSpec
    components: dict[str, Component]
    text_max_length: int = 77
    unet_in_channels: int = 4
    # SDXL pipeline settings that change the numbers (diffusers' StableDiffusionXLPipeline).
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    tokenizers: list[str] = field(default_factory=lambda: ["tokenizer"])
    scheduler_config: str = "scheduler/scheduler_config.json"
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    engines: list[EngineEntry] = field(default_factory=list)  # TensorRT builds
    controlnet: ControlNetSection | None = None  # exported with --controlnet (issue 15)
    loras: list[LoraRecord] = field(default_factory=list)  # merged at export, in order
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def runtime_components(self) -> list[str]:
        """The components the runtime loads: all but `unet` where `unet_deep` (the same graph over
        the same weights, plus DeepCache's output) is there, so memory holds one U-Net."""
        return [n for n in self.components if not (n == "unet" and "unet_deep" in self.components)]

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, root: Path) -> None:
        (Path(root) / MANIFEST_NAME).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["image"] = ImageSpec(**d["image"])
        d["vae"] = VaeSpec(**d["vae"])
        d["components"] = {k: _component(v) for k, v in d["components"].items()}
        d["loras"] = [LoraRecord(**x) for x in d.get("loras", [])]
        d["engines"] = [EngineEntry.from_dict(e) for e in d.get("engines", [])]
        if d.get("controlnet"):  # ControlNet section (issue 15)
            cn = dict(d["controlnet"])
            cn["controlnets"] = [ControlNetSpec(**c) for c in cn["controlnets"]]
            d["controlnet"] = ControlNetSection(**cn)
        return cls(**d)


def _component(d: dict[str, Any]) -> Component:
    d = dict(d)
    d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
    d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
    d["dims"] = {k: DimRange(**v) for k, v in d["dims"].items()}
    if d.get("verification"):
        d["verification"] = Verification(**d["verification"])
    d["weights"] = {k: WeightRef(**v) for k, v in d.get("weights", {}).items()}
    return Component(**d)


def load_manifest(root: str | Path) -> Manifest:
    """Read and check an artifact's manifest; every failure names the fix."""
    root = Path(root)
    rebuild = f"re-export it: sdopt export MODEL --out {root} --force"
    if not root.is_dir():
        raise SdoptError(
            f"artifact folder {root} does not exist", "run `sdopt export` first, or pass the folder it wrote"
        )
    path = root / MANIFEST_NAME
    if not path.is_file():
        from sdopt.optimum_layout import is_optimum_folder, optimum_manifest  # imports this module

        if is_optimum_folder(root):
            return optimum_manifest(root)
        raise SdoptError(
            f"{root} is not an sdopt artifact (no {MANIFEST_NAME})",
            "pass a folder written by `sdopt export` or `optimum-cli export onnx`",
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SdoptError(f"{path} is unreadable ({e})", rebuild) from e
    if raw.get("format") != MANIFEST_FORMAT:
        raise SdoptError(f"{path} is not an sdopt manifest", "pass a folder written by `sdopt export`")
    if raw.get("version") not in READABLE_VERSIONS:
        raise SdoptError(
            f"{path} has manifest version {raw.get('version')}, this sdopt reads version {MANIFEST_VERSION}", rebuild
        )
    try:
        return Manifest.from_dict(raw)
    except (KeyError, TypeError) as e:
        raise SdoptError(f"{path} is malformed ({e})", rebuild) from e


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(root: str | Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check that every file of the named components exists and has its recorded hash."""
    root = Path(root)
    files = {  # a weights file that several graphs share is checked once
        rel: digest
        for name in names or list(manifest.components)
        for rel, digest in manifest.components[name].files.items()
    }
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise SdoptError(
                f"{p} is missing from the artifact", f"re-export: sdopt export MODEL --out {root} --force"
            )
        if sha256_file(p) != digest:
            raise SdoptError(
                f"{p} does not match the hash in {MANIFEST_NAME} (modified or corrupt)",
                f"re-export: sdopt export MODEL --out {root} --force",
            )
