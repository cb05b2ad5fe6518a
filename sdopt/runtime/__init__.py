"""The lean runtime: numpy + an engine backend (onnxruntime, tensorrt) + tokenizers + pillow.

    from sdopt.runtime import Pipeline
    pipe = Pipeline.load("artifacts/tiny")
    pipe("a photo of an astronaut riding a horse", seed=0).images[0].save("out.png")

Never imports torch, diffusers or transformers (a test enforces it).
"""

from sdopt.runtime.pipeline import GenerationResult, Pipeline
from sdopt.runtime.schedulers import SCHEDULER_NAMES

__all__ = ["Pipeline", "GenerationResult", "SCHEDULER_NAMES"]
