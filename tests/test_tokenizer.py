"""The runtime's CLIP tokenizer (tokenizers library, no transformers) against transformers'
CLIPTokenizer: the same ids for tricky prompts, from an artifact's tokenizer.json and from a
folder with only vocab.json + merges.txt; long prompts truncated with a warning.

In the lean install (tests/helpers.py) transformers' ids are the ones the full install saved."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sdopt.export.tokenizer_files import write_clip_tokenizer
from sdopt.runtime.tokenizer import ClipTokenizer, PromptTruncatedWarning

pytestmark = pytest.mark.lean

PROMPTS = [
    "",
    "A Photo of an ASTRONAUT riding a Horse on Mars",
    "!!",  # SD 2.x pads with "!": the pad token is also an ordinary vocabulary entry
    "!",
    "hello!! world!!! ?!?",
    "a,b.c;d:e'f\"g(h)i[j]k{l}m<n>o/p\\q|r~s`t@u#v$w%x^y&z*",
    "it's don't we're I'll they'd I'm you've IT'S",
    "café naïve 東京 🐱 ümlaut ÀÉÎ ß Ω ﬁ",
    "e\u0301 vs \u00e9",  # NFD vs NFC
    "  multiple   spaces\tand\nnewlines  ",
    "numbers 12345 3.14 1e-5 2nd",
    "<|startoftext|> inside <|endoftext|> text",
    "a" * 300,  # one long word
    " ".join(["cat"] * 100),  # over 77 tokens
]


def transformers_ids(reference_store, label: str, folder, prompts: list[str]) -> np.ndarray:
    """transformers' CLIPTokenizer ids, one row per prompt (live, or as the full install saved them)."""

    def compute():
        import transformers

        tok = transformers.CLIPTokenizer.from_pretrained(folder)
        ids = [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]
        unpadded = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
        return {"ids": np.array(ids, dtype=np.int64), "unpadded": np.array(unpadded)}

    return reference_store.get("tokenizer", label, compute)


def tokenizer_folders(tiny_artifact, tmp_path):
    yield "sd1 tokenizer.json", tiny_artifact("tiny") / "tokenizer"
    yield "sd2 tokenizer.json ('!' pad)", tiny_artifact("tiny-sd2") / "tokenizer"
    yield "sdxl tokenizer_2 ('!' pad)", tiny_artifact("tiny-sdxl") / "tokenizer_2"
    for pad in ("<|endoftext|>", "!"):
        folder = tmp_path / f"bpe-{'bang' if pad == '!' else 'eot'}"
        write_clip_tokenizer(folder, pad)
        assert sorted(p.name for p in folder.iterdir() if p.suffix != ".json") == ["merges.txt"]
        assert not (folder / "tokenizer.json").exists()
        yield f"vocab.json + merges.txt ({pad!r} pad)", folder


def test_ids_match_transformers(tiny_artifact, tmp_path, reference_store):
    mismatches = []
    for label, folder in tokenizer_folders(tiny_artifact, tmp_path):
        ours = ClipTokenizer(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            got = ours(PROMPTS)
        assert got.shape == (len(PROMPTS), 77) and got.dtype == np.int64
        want = transformers_ids(reference_store, label, folder, PROMPTS)["ids"].tolist()
        for prompt, row, expected in zip(PROMPTS, got.tolist(), want, strict=True):
            if row != expected:
                mismatches.append(f"{label} {prompt[:30]!r}: {row[:12]} != transformers {expected[:12]}")
    assert not mismatches, "\n".join(mismatches)


def test_long_prompt_truncated_with_warning(tiny_artifact, reference_store):
    folder = tiny_artifact("tiny") / "tokenizer"
    prompt = " ".join(["a red cat"] * 40)
    want = transformers_ids(reference_store, "sd1 long prompt", folder, [prompt])
    n = int(want["unpadded"][0])
    assert n > 75
    with pytest.warns(PromptTruncatedWarning, match=rf"{n - 75} tokens were dropped"):
        ids = ClipTokenizer(folder)([prompt])
    assert ids[0].tolist() == want["ids"][0].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        ClipTokenizer(folder)(["a red cat"])  # short prompts do not warn


def test_pipeline_warns_on_long_prompt(tiny_artifact):
    from sdopt.runtime import Pipeline

    pipe = Pipeline.load(tiny_artifact("tiny"))
    with pytest.warns(PromptTruncatedWarning, match=r"tokens were dropped"):
        pipe(" ".join(["cat"] * 100), num_inference_steps=1, height=64, width=64, seed=0, output_type="np")
