"""`sdopt eval`: the `--quality` metrics between image folders, without generating anything.

The numbers come from the same code as `sdopt bench --quality` (sdopt.bench.quality.score_sets and
pair_scores, sdopt.bench.quality_inputs for reading): FID and KID of the candidate folder against
--ref-images, FID against --ref-stats, Inception Score (with a network that returns logits), CLIP
score against --prompts, and PSNR / SSIM per same-named image pair.

Pairs: the candidate and --ref-images are paired by file name (stem) when both hold the same names
(as `sdopt bench --quality` writes them: quality/<backend>/NNNNN.png, same prompt and seed per name);
`--paired` demands it, `--no-paired` never pairs. Paired images must have the same size.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdopt.errors import SdoptError


@dataclass(frozen=True)
class EvalOptions:
    """What `sdopt eval` compares, with what, and its gate."""

    candidate: str
    ref_images: str | None = None
    ref_stats: str | None = None
    prompts: str | None = None
    clip_model: str | None = None
    inception_weights: str | None = None
    paired: bool | None = None  # None: pair when both folders hold the same names
    max_fid_delta: float | None = None  # FID of the candidate vs --ref-images (the reference's own FID is 0)
    min_clip_score: float | None = None

    def check(self) -> None:
        """Everything checkable before reading images. Raises SdoptError."""
        for name in ("ref_stats", "prompts", "inception_weights"):
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().is_file():
                raise SdoptError(f"--{name.replace('_', '-')} {path}: no such file", "pass an existing file")
        if self.ref_images is None and self.ref_stats is None and self.clip_model is None:
            raise SdoptError(
                "nothing to compare the candidate images with",
                "pass --ref-images DIR and/or --ref-stats FILE.npz (FID, KID), or --clip-model with --prompts",
            )
        if self.clip_model is not None and self.prompts is None:
            raise SdoptError(
                "CLIP score needs each image's prompt",
                "pass --prompts FILE: one prompt per line in the images' name order (cycled when shorter, "
                "as `sdopt bench --quality` does)",
            )
        if self.paired and self.ref_images is None:
            raise SdoptError("--paired needs --ref-images", "pass the folder of the paired reference images")
        if self.max_fid_delta is not None and self.ref_images is None:
            raise SdoptError(
                "--max-fid-delta needs --ref-images (the reference set, whose FID against itself is 0)",
                "pass --ref-images DIR; statistics alone give no reference set to take a delta from",
            )
        for name in ("max_fid_delta", "min_clip_score"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SdoptError(f"--{name.replace('_', '-')} must be >= 0, got {value}", "e.g. --max-fid-delta 5")


@dataclass
class EvalResult:
    """What `sdopt eval` measured (the --json file)."""

    candidate: str
    n: int
    scores: dict[str, Any]  # sdopt.bench.quality.SetScores as a dict
    pairs: dict[str, Any] | None  # {"n", "psnr_db_mean", "identical_pairs", "ssim_mean"}
    pairs_note: str | None
    gate: dict[str, Any]
    inputs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def evaluate(options: EvalOptions) -> EvalResult:
    """Score the candidate folder against the references.

    Args:
        options: the folders, files, models and gate.

    Returns:
        The scores, the pairwise scores (or why there are none), the gate.

    Raises:
        SdoptError: bad input (missing or empty folders, unreadable images, mismatched pairs, weights).
    """
    from sdopt.bench import quality, quality_inputs

    options.check()
    candidate = quality_inputs.read_image_folder(options.candidate)
    size = (candidate.shape[1], candidate.shape[2])
    ref_images = quality_inputs.read_image_folder(options.ref_images, size=size) if options.ref_images else None
    pairs = _pairs(options) if options.ref_images and options.paired is not False else None
    refs = quality.References(
        images=ref_images,
        stats=quality_inputs.read_ref_stats(options.ref_stats) if options.ref_stats else None,
    )
    n = len(candidate)
    prompts = [p for p, _ in quality_inputs.prompt_set(options.prompts, n, 0)] if options.prompts else [""] * n
    module, source = quality_inputs.load_inception(options.inception_weights)
    clip = quality_inputs.load_clip(options.clip_model) if options.clip_model else None
    scores = quality.score_sets(
        {"candidate": candidate}, prompts, None, quality.InceptionFeatures(module, source), clip, refs
    )["candidate"]
    pair_numbers = None
    if isinstance(pairs, tuple):
        pair_numbers = {"n": len(pairs[0]), **quality.pair_scores(*pairs)}
    inputs = {
        "ref_images": options.ref_images,
        "ref_images_n": None if ref_images is None else len(ref_images),
        "ref_stats": options.ref_stats,
        "prompts": options.prompts,
        "clip_model": options.clip_model,
        "inception_weights": source,
    }
    return EvalResult(
        candidate=options.candidate,
        n=n,
        scores=scores.to_dict(),
        pairs=pair_numbers,
        pairs_note=pairs if isinstance(pairs, str) else None,
        gate=gate(scores, options),
        inputs=inputs,
        notes=_notes(scores, n, pair_numbers is not None),
    )


def _pairs(options: EvalOptions) -> tuple[Any, Any] | str:
    """(candidate images, reference images) of the same-named pairs, or why there are none.

    Raises:
        SdoptError: --paired and the names differ; a name twice in one folder; a pair of different sizes.
    """
    from sdopt.bench.quality_inputs import image_paths, read_images

    assert options.ref_images is not None
    cand, ref = _by_stem(image_paths(options.candidate)), _by_stem(image_paths(options.ref_images))
    if set(cand) != set(ref):
        only_c, only_r = sorted(set(cand) - set(ref)), sorted(set(ref) - set(cand))
        why = (
            f"not paired: {len(only_c)} name(s) only in the candidate folder {only_c[:3]}, "
            f"{len(only_r)} only in --ref-images {only_r[:3]}"
        )
        if options.paired:
            raise SdoptError(f"--paired: {why}", "give each candidate image the file name of its reference image")
        return why
    names = sorted(cand)
    for name in names:
        a, b = _size(cand[name]), _size(ref[name])
        if a != b:
            raise SdoptError(
                f"pair {name!r}: {cand[name]} is {a[0]}x{a[1]} but {ref[name]} is {b[0]}x{b[1]}",
                "PSNR and SSIM compare same-named images pixel by pixel: give each pair one size, "
                "or pass --no-paired to skip the pairwise scores",
            )
    return read_images([cand[k] for k in names]), read_images([ref[k] for k in names])


def _by_stem(paths: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        if p.stem in out:
            raise SdoptError(f"{out[p.stem].name} and {p.name} share the name {p.stem!r}", "keep one of them")
        out[p.stem] = p
    return out


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise SdoptError(f"{path} is not a readable image ({e})", "replace or remove the file") from e


def gate(scores: Any, options: EvalOptions) -> dict[str, Any]:
    """--max-fid-delta (on the FID against --ref-images) and --min-clip-score; an unmeasured value fails.

    Args:
        scores: the candidate's SetScores.
        options: the limits.

    Returns:
        {"max_fid_delta", "min_clip_score", "fid_key", "failures", "passed"}, as `sdopt bench`'s gate.
    """
    failures = []
    if options.max_fid_delta is not None:
        fid = scores.fid_vs_ref_images
        if fid is None or fid > options.max_fid_delta:
            failures.append(f"FID vs --ref-images {_fmt(fid)} > {options.max_fid_delta:g}")
    if options.min_clip_score is not None:
        clip = scores.clip_score
        if clip is None or clip < options.min_clip_score:
            failures.append(f"CLIP score {_fmt(clip)} < {options.min_clip_score:g}")
    return {
        "max_fid_delta": options.max_fid_delta,
        "min_clip_score": options.min_clip_score,
        "fid_key": "fid_vs_ref_images",
        "failures": failures,
        "passed": not failures,
    }


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def _notes(scores: Any, n: int, paired: bool) -> list[str]:
    from sdopt.bench.quality import KID_NOTE, bias_note

    notes = [note for note in (bias_note(n), scores.inception_score_note, scores.clip_score_note) if note]
    if paired and scores.kid_vs_ref_images is not None:
        notes.append(KID_NOTE.replace("torch", "the reference set"))
    return notes


def rows(result: EvalResult) -> list[tuple[str, str]]:
    """(metric, value) rows for the terminal table; null values say "—"."""
    s, p = result.scores, result.pairs or {}

    def num(value: Any, digits: int = 3) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    kid = s.get("kid_vs_ref_images")
    is_ = s.get("inception_score")
    return [
        ("images", str(result.n)),
        ("FID vs --ref-images", num(s.get("fid_vs_ref_images"))),
        ("KID vs --ref-images (×1e3)", "—" if not kid else f"{kid['mean'] * 1e3:.2f} ± {kid['std'] * 1e3:.2f}"),
        ("FID vs --ref-stats", num(s.get("fid_vs_ref_stats"))),
        ("Inception Score", "—" if not is_ else f"{is_['mean']:.3f} ± {is_['std']:.3f}"),
        ("CLIP score", num(s.get("clip_score"))),
        ("pairs", str(p.get("n", "—"))),
        ("PSNR dB (pairs that differ)", num(p.get("psnr_db_mean"), 2)),
        ("identical pairs", str(p.get("identical_pairs", "—"))),
        ("SSIM", num(p.get("ssim_mean"), 4)),
    ]


def write_json(result: EvalResult, path: Path) -> Path:
    """Write the result as JSON, atomically."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
    os.replace(tmp, path)
    return path
