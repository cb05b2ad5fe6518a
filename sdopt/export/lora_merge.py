"""`sdopt export --lora PATH[:SCALE]`: merge LoRA files into the torch weights before export.

The deltas come from the torch-free reader the runtime uses too (`sdopt.lora.files`, neutral),
so an export-merged artifact and a runtime swap apply exactly the same numbers: W + sum of
scale * (alpha / r) * B @ A, what diffusers' `load_lora_weights` + `fuse_lora` computes
(tests/test_lora.py checks both against diffusers). All files are checked before any weight
changes; a file that does not fit the model fails the export with one error.
"""

from __future__ import annotations

from typing import Any

import torch

from sdopt.export.weight_map import lora_modules
from sdopt.lora.files import LoraSpec, compute_deltas
from sdopt.manifest import LoraRecord, sha256_file

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def merge_loras(pipe: Any, specs: list[LoraSpec], ignore_unmatched: bool = False) -> list[LoraRecord]:
    """Add every LoRA's delta to the pipeline's weights, in place.

    Args:
        pipe: the diffusers pipeline about to be exported.
        specs: the files and their scales (stacked).
        ignore_unmatched: skip keys that match no module instead of failing.
    Returns:
        One manifest record per file (name, sha256, scale).
    Raises:
        SdoptError: a file that is missing, not safetensors, or for another model (no weight changed).
    """
    if not specs:
        return []
    models = {c: getattr(pipe, c) for c in LORA_COMPONENTS if getattr(pipe, c, None) is not None}
    modules = {c: lora_modules(m) for c, m in models.items()}
    targets = {c: {n: tuple(m.weight.shape) for n, m in mods.items()} for c, mods in modules.items()}
    deltas = compute_deltas(specs, targets, ignore_unmatched)
    with torch.no_grad():
        for component, params in deltas.items():
            for name, delta in params.items():
                weight = modules[component][name[: -len(".weight")]].weight
                weight.copy_((weight.float() + torch.from_numpy(delta)).to(weight.dtype))
    return [LoraRecord(spec.path.name, sha256_file(spec.path), spec.scale) for spec in specs]
