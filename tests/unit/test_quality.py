"""SSL quality measures (ssl/quality.py) against hand-made encoders and numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from screener_nb.ssl import quality as Q


class Channels(nn.Module):
    """A hand-made 'encoder': fixed features of the (masked) image, no learning."""

    def __init__(self, in_channels=1):
        super().__init__()
        self.spec = {"in_channels": in_channels, "out_channels": 3}

    def forward(self, x):
        img = x[:, :1]
        feats = [img, img ** 2, torch.ones_like(img)]
        if x.shape[1] == 2:  # the condition encoder's mask channel: the features ignore it
            feats[2] = feats[2] + 0 * x[:, 1:]
        return torch.cat(feats, 1)


def test_central_block_by_hand():
    assert Q.central_block((96, 96, 64)) == (slice(48, 72), slice(48, 72), slice(32, 48))
    assert Q.central_block((10, 9, 8), grid=(2, 3, 4)) == (slice(5, 10), slice(3, 6), slice(4, 6))


def test_masking_invariance_is_the_mean_cosine_inside_the_block():
    rng = np.random.default_rng(0)
    image = rng.random((8, 8, 8)).astype(np.float32) + 0.1
    block = (slice(2, 5), slice(2, 5), slice(2, 5))
    # hidden voxels are zeroed: features (0, 0, 1) against (v, v^2, 1)
    v = image[block].ravel().astype(np.float64)
    expected = np.mean(1.0 / np.sqrt(v ** 2 + v ** 4 + 1.0))
    assert Q.masking_invariance(Channels(), image, block) == pytest.approx(expected, rel=1e-5)


def test_collapse_monitors_match_numpy():
    rng = np.random.default_rng(1)
    image = rng.random((6, 5, 4)).astype(np.float32)
    body = rng.random(image.shape) > 0.3
    out = Q.collapse_monitors(Channels(), image, body)
    v = image[body].astype(np.float64)
    feats = np.stack([v, v ** 2, np.ones_like(v)], 1)
    assert out["dim"] == 3
    assert out["std_mean"] == pytest.approx(feats.std(0, ddof=1).mean(), rel=1e-5)
    assert out["std_min"] == pytest.approx(0.0, abs=1e-6)  # the constant channel has collapsed
    lam = np.clip(np.linalg.eigvalsh(np.cov(feats.T)), 0, None)
    p = lam[lam > 0] / lam.sum()
    assert out["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)


def test_similarity_map_is_the_cosine_to_the_chosen_voxel():
    rng = np.random.default_rng(2)
    a, b = torch.tensor(rng.normal(size=(4, 5, 6, 3))), torch.tensor(rng.normal(size=(4, 7, 6, 5)))
    sim = Q.similarity_map(a, (1, 2, 0), b)
    q = a[:, 1, 2, 0].numpy()
    bb = b.numpy().reshape(4, -1)
    expected = (q @ bb) / (np.linalg.norm(q) * np.linalg.norm(bb, axis=0))
    np.testing.assert_allclose(sim.ravel(), expected, rtol=1e-5, atol=1e-6)
    assert sim.shape == (7, 6, 5)
