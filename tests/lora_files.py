"""Test LoRA files built with peft on the tiny presets, and a kohya-format copy of one.

`make_peft_lora` adds a peft `LoraConfig` adapter to a fresh copy of the preset's modules,
fills lora_A and lora_B with seeded non-zero values (a freshly initialised lora_B is zero,
which would test nothing) and saves it with the pipeline class's own `save_lora_weights`,
`lora_alpha`/`r` in the `lora_adapter_metadata` header as diffusers' training scripts do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONV_TARGETS = ["conv1", "conv2"]  # resnet 3x3 convolutions (conv LoRA)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make_peft_lora(
    preset: str,
    path: Path,
    components: tuple[str, ...] = ("unet",),
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    conv: bool = False,
    std: float = 0.05,
    metadata: bool = True,
) -> Path:
    """Write a diffusers-format LoRA for synthetic `preset`; returns `path` (a .safetensors file)."""
    from peft import LoraConfig, inject_adapter_in_model

    from sdopt.export.synthetic import build_pipeline

    pipe = build_pipeline(preset)
    gen = torch.Generator().manual_seed(seed)
    layers, meta = {}, {}
    for component in components:
        module = getattr(pipe, component)
        targets = (UNET_TARGETS + (CONV_TARGETS if conv else [])) if component == "unet" else TEXT_TARGETS
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        # peft directly (transformers' add_adapter wants a newer peft than the registry has).
        inject_adapter_in_model(config, module)
        state = {}
        with torch.no_grad():
            for name, p in module.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                    state[name.replace(".default.", ".")] = p.detach().clone()
        layers[f"{component}_lora_layers"] = state
        if metadata:
            meta[f"{component}_lora_adapter_metadata"] = config.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **layers, **meta)
    return path


def peft_to_kohya(src: Path, dst: Path, layers_per_block: int | None = None, fp16: bool = True) -> Path:
    """kohya/A1111 copy of a diffusers-format file: `lora_unet_<module_path_with_underscores>`,
    `lora_te_` / `lora_te2_` with the `text_model` level kohya keeps, `lora_down`/`lora_up`, and
    alpha as a tensor per module (from the header, where kohya has none); fp16 like most kohya
    files. With `layers_per_block`, U-Net modules get kohya's SDXL (sgm) block names."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    from sdopt.lora.keys import sgm_unet_name

    with safe_open(str(src), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    unet_modules = [k.split(".lora_A.")[0][5:] for k in tensors if k.startswith("unet.") and ".lora_A." in k]
    up_attn = {int(m.split(".")[1]) for m in unet_modules if m.startswith("up_blocks.") and ".attentions." in m}
    out = {}
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te_" if layers_per_block is None else "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        module, _, role = rest.partition(".lora_")
        if component == "unet" and layers_per_block is not None:
            module = sgm_unet_name(module, layers_per_block, up_attn) or module
        elif component != "unet" and not module.startswith("text_model."):
            module = "text_model." + module
        name = prefixes[component] + module.replace(".", "_")
        kind = "lora_down" if role.startswith("A") else "lora_up"
        out[f"{name}.{kind}.weight"] = value.astype(np.float16 if fp16 else np.float32)
        if kind == "lora_down":
            out[f"{name}.alpha"] = np.array(meta.get(f"{component}.lora_alpha", value.shape[0]), dtype=np.float16)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst), metadata={"ss_network_module": "networks.lora"})
    return dst
