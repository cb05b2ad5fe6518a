"""CLIP tokenization with the `tokenizers` library (no transformers).

Loads `tokenizer.json` when the artifact has one, else builds CLIP's BPE pipeline from
`vocab.json` + `merges.txt` (the same normalizer, pre-tokenizer and end-of-word suffix that
transformers' CLIPTokenizer uses). Padding and truncation to the model's length are done
here, so token ids match transformers' `tokenizer(prompt, padding="max_length",
max_length=77, truncation=True)`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdopt.errors import SdoptError

if TYPE_CHECKING:  # imported lazily at run time
    from tokenizers import Tokenizer

# CLIP's pre-tokenization pattern (openai/CLIP simple_tokenizer.py), as transformers uses it.
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and lost its tail."""


class ClipTokenizer:
    def __init__(self, folder: str | Path, max_length: int = 77) -> None:
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        special = {**_read_json(folder / "special_tokens_map.json"), **config}
        self.tokenizer = _load(folder)
        # transformers writes a huge sentinel (1e30) for "no limit": keep the manifest's length then.
        has_limit = config.get("model_max_length", 0) < 10**6
        self.max_length = int(config.get("model_max_length", max_length)) if has_limit else max_length
        self.bos_id = self._id(_token(special.get("bos_token"), "<|startoftext|>"))
        self.eos_id = self._id(_token(special.get("eos_token"), "<|endoftext|>"))
        self.pad_id = self._id(_token(special.get("pad_token"), "<|endoftext|>"))

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise SdoptError(f"tokenizer has no token {token!r}", "re-export the artifact")
        return i

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """[len(prompts), max_length] int64 ids: BOS, tokens, EOS, padding; long prompts truncated."""
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        room = self.max_length - 2
        for row, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            if len(ids) > room:
                warnings.warn(
                    f"prompt is {len(ids)} tokens; the text encoder takes {room}: "
                    f"{len(ids) - room} tokens were dropped from the end",
                    PromptTruncatedWarning,
                    stacklevel=3,
                )
                ids = ids[:room]
            seq = [self.bos_id, *ids, self.eos_id]
            out[row, : len(seq)] = seq
        return out


def _load(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        return tok
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        raise SdoptError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt", "re-export the artifact")
    tok = clip_bpe_tokenizer(json.loads(vocab_file.read_text(encoding="utf-8")), _read_merges(merges_file))
    # transformers registers the special tokens as added tokens, which splits them out of the
    # text before BPE (SD 2.x pads with "!", so "!!" becomes two pad-token ids there too).
    from tokenizers import AddedToken

    special = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    tok.add_special_tokens([AddedToken(_token(special.get(n), "<|endoftext|>"), special=True) for n in names])
    return tok


def clip_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """CLIP's tokenizer pipeline (as transformers' CLIPConverter builds it) from vocab + merges.

    Args:
        vocab: token -> id, the content of ``vocab.json``.
        merges: The BPE merge rules of ``merges.txt``, in priority order.

    Returns:
        A ``tokenizers.Tokenizer`` without padding or truncation.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split()) for line in lines if line and not line.startswith("#version")]  # type: ignore[misc]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token(value: str | dict[str, Any] | None, default: str) -> str:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content", default)
    return value or default
