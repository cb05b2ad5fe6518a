"""Write CLIP tokenizer files (vocab.json, merges.txt) for synthetic models, with no hub access.

The vocabulary has CLIP's layout: the 256 byte symbols, the same with the end-of-word
marker `</w>`, then one token per BPE merge, then `<|startoftext|>` and `<|endoftext|>` as the
two highest ids (so CLIP's argmax pooling finds the end token, as with the real vocab).
Merges grow each word of a small built-in word list left to right; the result is a valid BPE
model that transformers' CLIPTokenizer and the `tokenizers` library both load.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = """
a an the of and with in on at by for to from under over photo photograph picture painting portrait
landscape astronaut riding horse mars moon city street night day sunset sunrise forest mountain river
lake ocean sea beach sky cloud clouds rain snow winter summer spring autumn cat dog bird fish dragon
castle house room kitchen garden flower flowers tree trees red blue green yellow black white golden
silver purple orange pink dark light bright beautiful detailed highly realistic photorealistic
cinematic lighting studio render digital art artwork style oil watercolor sketch drawing illustration
fantasy science fiction futuristic ancient old young man woman girl boy child people face eyes hair
smiling standing sitting walking running flying car train ship boat road bridge tower building
village market cyberpunk neon glowing magic wizard knight robot spaceship planet stars galaxy
space high quality best masterpiece resolution sharp focus bokeh wide angle close up view
blurry ugly deformed low bad anatomy extra fingers watermark text signature cropped worst
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_vocab(size: int = 1024) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-layout vocabulary of at most `size` tokens and its ordered merges."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    budget = size - len(tokens) - 2
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in known and len(merges) < budget:
                merges.append((left, right))
                tokens.append(merged)
                known.add(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> int:
    """Write a CLIP tokenizer folder; return the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)
