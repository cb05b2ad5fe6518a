"""LoRA file keys -> (component, module) of the model: diffusers/PEFT and kohya/A1111 spellings.

A key names one tensor of one LoRA'd module: its down (A) or up (B) matrix, or its alpha.
Both spellings are resolved against the model's own module names (from the manifest's
weight map, or the torch modules at export), never by guessing: kohya joins a module path
with underscores (`lora_unet_down_blocks_0_attentions_0_proj_in`), which is ambiguous
to split but exact to build, so we build it for every module the model has and look it up.

Spellings accepted (diffusers' `lora_conversion_utils` and PEFT's key layout):
- PEFT / diffusers `save_lora_weights`: `unet.<module>.lora_A.weight`, `lora_B.weight`;
  `text_encoder.` / `text_encoder_2.` prefixes; unprefixed keys are U-Net keys.
- older diffusers: `<module>.lora.down.weight` / `lora.up.weight`, `lora_linear_layer.down/up`,
  attention processors `attn1.processor.to_q_lora.down.weight` (-> `attn1.to_q`).
- kohya / A1111: `lora_unet_*`, `lora_te_*` / `lora_te1_*` (text encoder), `lora_te2_*`,
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; SDXL files use the original (sgm) U-Net's
  block names (`input_blocks_4_1_...`), SD 1.x/2.x files the diffusers names.
- text-encoder modules with or without the `text_model.` level (transformers 5 dropped it
  from CLIPTextModel; kohya files and older diffusers files keep it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}

# (suffix, role) in the order tried; role is "down" (A), "up" (B) or "alpha".
_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),  # attention processors: to_q_lora.down
    (".alpha", "alpha"),
)
# Tensors of LoRA variants sdopt does not apply: named in the error, never skipped silently.
UNSUPPORTED_MARKERS = {
    "lora_magnitude_vector": "DoRA",
    "dora_scale": "DoRA",
    "hada_": "LoHa (LyCORIS)",
    "lokr_": "LoKr (LyCORIS)",
    "lora_B.bias": "LoRA bias (lora_bias=True)",
    "lora_mid": "LoCon with a mid (CP) decomposition",
}


@dataclass(frozen=True)
class KeyRef:
    """What one file key names: `module` is the model's own module path (e.g.
    `down_blocks.0.attentions.0.proj_in`), `role` down | up | alpha."""

    component: str
    module: str
    role: str


def canonical(module: str) -> str:
    """Module path without the text encoders' `text_model.` level, for matching."""
    return module[len("text_model.") :] if module.startswith("text_model.") else module


def split_role(key: str) -> tuple[str, str] | None:
    """`<stem><suffix>` -> (stem, role), or None for a key that is no LoRA tensor."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def unsupported_variant(key: str) -> str | None:
    return next((name for marker, name in UNSUPPORTED_MARKERS.items() if marker in key), None)


class KeyResolver:
    """Resolves file keys against the model's modules: component -> module names."""

    def __init__(self, modules: dict[str, list[str]]) -> None:
        self.modules = modules
        unet = "\n".join(modules.get("unet", []))
        up_attn = {int(b) for b in re.findall(r"^up_blocks\.(\d+)\.attentions\.", unet, re.M)}
        down0 = {int(i) for i in re.findall(r"^down_blocks\.0\.resnets\.(\d+)\.", unet, re.M)}
        layers_per_block = max(down0) + 1 if down0 else None
        self.canon: dict[tuple[str, str], str] = {}
        self.kohya: dict[str, tuple[str, str]] = {}
        for component, names in modules.items():
            for name in names:
                self.canon[(component, canonical(name))] = name
                for prefix in [p for p, c in KOHYA_PREFIXES.items() if c == component]:
                    for spelling in _kohya_spellings(component, name, layers_per_block, up_attn):
                        self.kohya[prefix + spelling] = (component, name)

    def resolve(self, key: str) -> KeyRef | None:
        """The module `key` names, or None where it names nothing this model has."""
        split = split_role(key)
        if split is None:
            return None
        stem, role = split
        if stem.startswith("lora_"):  # kohya
            hit = self.kohya.get(stem)
            return KeyRef(hit[0], hit[1], role) if hit else None
        component, module = "unet", stem
        for prefix, comp in COMPONENT_PREFIXES.items():
            if stem.startswith(prefix + "."):
                component, module = comp, stem[len(prefix) + 1 :]
                break
        module = _diffusers_module(module)
        name = self.canon.get((component, canonical(module)))
        return KeyRef(component, name, role) if name else None


def _diffusers_module(module: str) -> str:
    """Older diffusers spellings -> the module path (PEFT's own layout passes unchanged)."""
    if module.startswith("base_model.model."):
        module = module[len("base_model.model.") :]
    module = re.sub(r"\.processor\.(to_[qkv])$", r".\1", module)
    module = re.sub(r"\.processor\.to_out$", ".to_out.0", module)
    return module


def _kohya_spellings(component: str, name: str, layers_per_block: int | None, up_attn: set[int]) -> list[str]:
    """Every underscore spelling kohya/A1111 tools give module `name`."""
    spellings = {name.replace(".", "_")}
    if component != "unet":
        bare = canonical(name)
        spellings |= {bare.replace(".", "_"), ("text_model." + bare).replace(".", "_")}
    elif layers_per_block is not None:
        sgm = sgm_unet_name(name, layers_per_block, up_attn)
        if sgm:
            spellings.add(sgm.replace(".", "_"))
    return sorted(spellings)


_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sgm_unet_name(name: str, layers_per_block: int, up_attn: set[int]) -> str | None:
    """A diffusers U-Net module path in the original (sgm/LDM) U-Net's naming, which kohya's
    SDXL trainer uses: `down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`.
    The inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key`;
    `up_attn`: the up blocks that have attentions (their upsampler sits after them)."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    n = layers_per_block
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        kind, block, part, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if part == "downsamplers":
                return f"input_blocks.{(block + 1) * (n + 1)}.0.{rest.replace('conv', 'op', 1)}"
            index = 1 + block * (n + 1) + layer
        else:
            if part == "upsamplers":
                return f"output_blocks.{block * (n + 1) + n}.{2 if block in up_attn else 1}.{rest}"
            index = block * (n + 1) + layer
        return f"{'input_blocks' if kind == 'down_blocks' else 'output_blocks'}.{index}." + _inner(part, rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        middle = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get((m.group(1), m.group(2)))
        return None if middle is None else f"middle_block.{middle}." + _inner(m.group(1), m.group(3))[2:]
    return None


def _inner(part: str, rest: str) -> str:
    """`0.<resnet part>` or `1.<attention part>` inside one sgm block."""
    if part == "resnets":
        head, _, tail = rest.partition(".")
        return "0." + ".".join(p for p in (_RESNET_PARTS.get(head, head), tail) if p)
    return "1." + rest
