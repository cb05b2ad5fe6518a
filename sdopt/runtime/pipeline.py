"""The pipeline: load an artifact once, then generate from it, stage by stage.

`Pipeline.__call__` mirrors diffusers' StableDiffusion(XL)(Img2Img|Inpaint)Pipeline call; it
is a thin driver over the stages (`sdopt.runtime.stages`): a validated request
(`make_request`), prompt encoding and initial latents (`prepare`), the denoising loop as a
generator (`generate_latents`), and the decode. Callers that need the steps themselves
(previews, a server that batches requests at step boundaries) use those directly.

Threads: a Pipeline may be called from several threads at once. Engine sessions are created
once in `load` and are thread-safe; each call builds its own scheduler and RNG.

LoRA (`sdopt.runtime.lora_swap`): `load(..., loras=[(path, scale)])` and `set_loras([...])`
swap LoRA-merged weights into new sessions; a swap waits for in-flight calls (`__call__` and
`generate_latents` hold `self.lora.lock.reading()` throughout), so no call sees a mix of
weights. Callers driving `prepare`/`unet`/`decode` themselves hold that lock likewise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdopt.errors import SdoptError
from sdopt.lora.files import LoraSpec
from sdopt.manifest import Manifest, load_manifest, verify_files
from sdopt.runtime import controlnet as control_stage
from sdopt.runtime import images as imageops
from sdopt.runtime import stages
from sdopt.runtime.backends import Backend, EngineSession, open_backend
from sdopt.runtime.io_adapter import adapt
from sdopt.runtime.lora_swap import LoraSwapper
from sdopt.runtime.request import GenerationRequest, make_request
from sdopt.runtime.schedulers import DIFFUSERS_CLASS_NAMES, Scheduler, make_scheduler
from sdopt.runtime.stages import DenoiseState, Feeds
from sdopt.runtime.tokenizer import ClipTokenizer

StepCallback = Callable[[int, int], None]  # (step done, total steps)
CONTROL_ARGS = (
    "control_image",
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "guess_mode",
    "controlnet",
)  # ControlNet hook: `__call__` arguments for sdopt.runtime.controlnet


@dataclass
class GenerationResult:
    """What a call returns.

    Attributes:
        images: PIL images, or an NHWC float32 array in [0, 1] for output_type="np".
        seed: The seed used (drawn at random when the call passed none).
        timings: Seconds per stage (text_encoder, vae_encoder, unet, unet_per_step, vae_decoder) and "total".
    """

    images: Any
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Load once with `Pipeline.load(dir)`, then call like a diffusers pipeline."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        backend: Backend,
        sessions: dict[str, EngineSession],
        tokenizers: list[ClipTokenizer],
        scheduler_config: dict[str, Any],
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.sessions = sessions
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config
        # LoRA hot-swap state and lock (sdopt/runtime/lora_swap.py)
        self.lora = LoraSwapper(root, manifest, backend, session_entry(manifest), session_role)

    @classmethod
    def load(
        cls,
        path: str | Path,
        provider: str = "cpu",
        verify_hashes: bool = True,
        controlnet: bool = True,
        loras: list[LoraSpec] | list[tuple[str | Path, float]] | None = None,
        lora_ignore_unmatched: bool = False,
        **backend_options: Any,
    ) -> Pipeline:
        """Open an artifact folder and create one engine session per component.

        Args:
            path: The artifact folder written by `sdopt export`, or an `optimum-cli export onnx` folder.
            provider: "cpu" or "cuda" (ONNX Runtime), or "tensorrt".
            verify_hashes: Check every file's sha256 against the manifest first.
            controlnet: For artifacts exported with ControlNets: load them and the residual U-Net
                (in place of the plain one: same weights, so one U-Net in memory either way).
            loras: LoRA files to apply, as (path, scale) pairs or LoraSpec (see `set_loras`).
            lora_ignore_unmatched: Apply the LoRAs' other keys where some match no module.
            **backend_options: Passed to the backend, e.g. `threads=` for ONNX Runtime,
                `use_cuda_graph=` / `allow_host_code=` for TensorRT.

        Returns:
            The loaded pipeline.

        Raises:
            SdoptError: for a folder that is not a (matching) artifact, a bad hash, or a provider
                that is unknown or not installed.
        """
        root = Path(path).expanduser()
        manifest = load_manifest(root)
        names = manifest.runtime_components()  # one U-Net graph in memory: unet_deep where there is one
        if verify_hashes:
            verify_files(root, manifest)  # every file (a weights file two graphs share: hashed once)
        backend = open_backend(provider, root, manifest, **backend_options)
        names = control_stage.components_to_load(manifest, controlnet, names)  # ControlNet hook: one U-Net graph
        entry = session_entry(manifest)
        lora = LoraSwapper(root, manifest, backend, entry, session_role, names)  # LoRA'd components: LoRA sessions
        sessions = lora.start(loras or [], lora_ignore_unmatched)
        for name in names:
            if session_role(name) not in sessions:
                sessions.update([entry(name, backend.load(name))])
        tokenizers = [ClipTokenizer(root / t, manifest.text_max_length) for t in manifest.tokenizers]
        scheduler_config = json.loads((root / manifest.scheduler_config).read_text())
        pipe = cls(root, manifest, backend, sessions, tokenizers, scheduler_config)
        pipe.lora = lora
        return pipe

    def set_loras(
        self, loras: list[LoraSpec] | list[tuple[str | Path, float]], ignore_unmatched: bool = False
    ) -> None:
        """Apply these LoRAs (stacked) in place of the current ones; [] restores the base weights exactly.

        Only the sessions whose weights change are re-created; calls in flight finish first
        with the old weights, calls arriving meanwhile wait for the new ones.

        Args:
            loras: (path, scale) pairs or LoraSpec: diffusers/PEFT or kohya `.safetensors` files.
            ignore_unmatched: Apply the other keys where some match no module of this model.

        Raises:
            SdoptError: a file that is missing, not safetensors, or for another model; the
                current weights stay as they were.
        """
        self.lora.apply(self.sessions, loras, ignore_unmatched)

    @property
    def loras(self) -> list[LoraSpec]:
        """The LoRAs currently applied."""
        return list(self.lora.loras)

    # -- public call -------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
        image: imageops.ImageInput | None = None,
        mask_image: imageops.ImageInput | None = None,
        strength: float | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        deepcache: int = 1,
        control_image: control_stage.ControlImages | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        controlnet: str | list[str] | None = None,
    ) -> GenerationResult:
        """Generate images: txt2img, img2img (`image=`) or inpainting (`image=` + `mask_image=`).

        Args:
            prompt, negative_prompt: One prompt or a list; one negative prompt for all, or one per prompt.
            num_inference_steps: Denoising steps (img2img/inpaint run `strength` of them).
            guidance_scale: Classifier-free guidance; 1.0 or less skips the unconditional branch.
            height, width: Image size in pixels (default: the artifact's; img2img: the input image's).
            num_images_per_prompt: Images per prompt.
            seed: Seed of the call's RNG; drawn at random (and returned) when None.
            scheduler: A name from `SCHEDULER_NAMES`; default the model's own.
            latents: Initial noise (batch, 4, height/8, width/8), in place of the RNG's draw.
            image, mask_image: img2img/inpaint input (PIL, HWC/NHWC in [0, 1], or a path); mask: white = repaint.
            strength: How much of the schedule img2img/inpaint runs, in (0, 1].
            output_type, callback: "pil" or "np" (NHWC float32 in [0, 1]); callback(steps done, total) per step.
            deepcache: N > 1 is the fast mode (DeepCache, Ma et al. 2023): a full U-Net pass every N
                steps, only its last layer over the cached deep feature between them; 1 is exact.
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                guess_mode, controlnet: ControlNet, as diffusers' ControlNet pipelines take it (a value, or
                one per ControlNet; `controlnet` picks the artifact's ControlNets, default all in manifest
                order); see `sdopt.runtime.controlnet`.

        Returns:
            A `GenerationResult` with the images, the seed and per-stage timings. Raises SdoptError,
            before any engine runs, for an argument the artifact cannot serve.
        """
        t_start = time.perf_counter()
        request = self.make_request(
            prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, num_images_per_prompt,
            seed, scheduler, latents, image, mask_image, strength, output_type, deepcache,
            control_image=control_image, controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
            guess_mode=guess_mode, controlnet=controlnet,
        )  # fmt: skip
        with self.lora.lock.reading():  # one set of weights for the whole call (LoRA swaps wait)
            return self._generate(request, callback, t_start)

    def _generate(self, request: GenerationRequest, callback: StepCallback | None, t_start: float) -> GenerationResult:
        """Drive the stages for one request and time each of them."""
        state = self.prepare(request)
        timings = state.timings
        t0 = time.perf_counter()
        for step in self._denoising_loop(state):
            if callback:
                callback(step.step, step.total)
        timings["unet"] = time.perf_counter() - t0 - timings.get("controlnet", 0.0)  # ControlNet: own stage
        timings["unet_per_step"] = timings["unet"] / max(state.total, 1)
        t0 = time.perf_counter()
        out = self.decode(state.latents)
        timings["vae_decoder"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(out if request.output_type == "np" else imageops.to_pil(out), request.seed, timings)

    # -- stages ------------------------------------------------------------------------------
    def make_request(self, prompt: str | list[str], *args: Any, **kwargs: Any) -> GenerationRequest:
        """Validate a call's arguments (those of `__call__`, without `callback`) into a request.

        Raises:
            SdoptError: for the first argument the artifact cannot serve.
        """
        default = default_scheduler_name(self.scheduler_config)
        control = {k: kwargs.pop(k) for k in CONTROL_ARGS if k in kwargs}  # ControlNet hook
        request = make_request(self.manifest, self.sessions.keys(), default, prompt, *args, **kwargs)
        return control_stage.with_control(self.manifest, self.sessions.keys(), request, **control)

    def prepare(self, request: GenerationRequest) -> DenoiseState:
        """Encode the prompts and set up the initial latents: the state before the first step.

        Args:
            request: A request from `make_request`.

        Returns:
            The request's `DenoiseState`; its `timings` hold text_encoder and vae_encoder seconds.
        """
        scheduler = self.scheduler(request.scheduler)
        t0 = time.perf_counter()
        cond = stages.encode_prompt(self.run, self.manifest, self.tokenizers, request)
        t1 = time.perf_counter()
        state = stages.initial_state(self.run, self.manifest, request, scheduler, cond)
        state.control = control_stage.control_state(self.run, self.manifest, self.sessions.keys(), request)  # hook
        state.timings.update(text_encoder=t1 - t0, vae_encoder=time.perf_counter() - t1)
        return state

    def generate_latents(self, request: GenerationRequest) -> Iterator[DenoiseState]:
        """The denoising loop as a generator: prepares the request, then yields its state after each step.

        Args:
            request: A request from `make_request`.

        Yields:
            The same `DenoiseState`, advanced by one step; `state.latents` after the last one
            go to `decode`.
        """
        with self.lora.lock.reading():  # a LoRA swap waits until the generator finishes or is closed
            yield from self._denoising_loop(self.prepare(request))

    def _denoising_loop(self, state: DenoiseState) -> Iterator[DenoiseState]:
        while not state.done:
            component, feeds = state.unet_inputs()
            state.advance(*self.unet(component, feeds))
            yield state

    def unet(self, component: str, feeds: Feeds) -> tuple[np.ndarray, np.ndarray | None]:
        """One U-Net call ("unet" or "unet_shallow") on feeds of any batch. The "unet" session runs
        the full U-Net graph the pipeline loaded: `unet_deep` (with DeepCache's output) where there is one.

        Returns:
            (out_sample, deep_feature); deep_feature is None where the graph has no such output.
        """
        out = self.run(component, **feeds)
        return out["out_sample"], out.get("deep_feature")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE decode of final latents.

        Returns:
            NHWC float32 images in [0, 1].
        """
        return imageops.postprocess(stages.decode(self.run, self.manifest, latents))

    def run(self, component: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run one engine with feeds cast to the manifest's dtypes; outputs come back as float32."""
        spec = self.manifest.components[component]
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in spec.inputs}
        return {k: v.astype(np.float32, copy=False) for k, v in self.sessions[component].run(typed).items()}

    def scheduler(self, name: str) -> Scheduler:
        """A fresh scheduler of that name, configured from the artifact's scheduler config."""
        try:
            return make_scheduler(name, self.scheduler_config)
        except (ValueError, NotImplementedError) as e:
            raise SdoptError(
                f"scheduler {name} cannot use this model's scheduler config: {e}", "choose another --scheduler"
            ) from e


def session_role(name: str) -> str:
    """Sessions are keyed by role: "unet" is the full U-Net, whichever graph backs it (unet_deep
    has the same inputs and weights as unet, plus the deep_feature output fast mode needs)."""
    return "unet" if name == "unet_deep" else name


def session_entry(manifest: Manifest) -> Callable[[str, EngineSession], tuple[str, EngineSession]]:
    """(component, engine session) -> (role, session speaking the runtime's names)."""
    return lambda name, session: (session_role(name), adapt(session, manifest.components[name]))


def default_scheduler_name(config: dict[str, Any]) -> str:
    """The scheduler name of the artifact's own scheduler class (e.g. SD 1.5's PNDM -> pndm)."""
    cls = config.get("_class_name", "")
    names = [n for n, c in DIFFUSERS_CLASS_NAMES.items() if c == cls]
    if not names:
        return "euler"
    if cls == "DPMSolverMultistepScheduler":
        return "dpm++2m-karras" if config.get("use_karras_sigmas") else "dpm++2m"
    return names[0]
