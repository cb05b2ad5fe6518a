"""CLIP tokenizer files: synthetic vocabularies (no hub access), and folders both transformers
generations read.

An artifact's tokenizer folder carries transformers 4.x's files (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json: what its slow `CLIPTokenizer`, and so Hugging
Face Optimum, loads) and the `tokenizers` library's tokenizer.json (what transformers 5.x writes
and sdopt's runtime reads first). `save_tokenizer` writes whichever half the installed
transformers did not.

The vocabulary has CLIP's layout: the 256 byte symbols, the same with the end-of-word
marker `</w>`, then one token per BPE merge, then `<|startoftext|>` and `<|endoftext|>` as the
two highest ids (so CLIP's argmax pooling finds the end token, as with the real vocab).
Merges grow each word of a small built-in word list left to right; the result is a valid BPE
model that transformers' CLIPTokenizer and the `tokenizers` library both load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


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
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def save_tokenizer(tokenizer: Any, folder: Path) -> list[str]:
    """Save a transformers CLIP tokenizer with both the 4.x and the 5.x files.

    Args:
        tokenizer: a transformers CLIPTokenizer / CLIPTokenizerFast (either major version).
        folder: where to write; created if missing.

    Returns:
        The file names now in `folder`, sorted.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():  # transformers 4.x's slow tokenizer: convert
        from transformers import CLIPTokenizerFast

        CLIPTokenizerFast.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        write_bpe_files(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if not (folder / "special_tokens_map.json").is_file():
        special = {k: _content(config[k]) for k in SPECIAL_KEYS if config.get(k) is not None}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    if config.get("tokenizer_class") != "CLIPTokenizer":  # what 4.x's AutoTokenizer dispatches on
        config["tokenizer_class"] = "CLIPTokenizer"
        config_path.write_text(json.dumps(config, indent=2))
    return sorted(p.name for p in folder.iterdir())


def write_bpe_files(folder: Path) -> None:
    """vocab.json + merges.txt from the BPE model in `folder/tokenizer.json`."""
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}/tokenizer.json holds a {model.get('type')} model, not CLIP's BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


def _content(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else str(token)
