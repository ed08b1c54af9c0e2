"""``bench tiles``' figures against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from screener_nb.benchmarks.tiles import departure, encoded_per_voxel, tiles_per_voxel


def test_encoded_voxels_per_image_voxel_by_hand():
    # 96 voxels, windows of 48 every 36: starts 0, 36, 48 (MONAI's last window ends at the border) -> 3 windows
    assert encoded_per_voxel((96, 48, 32), (48, 48, 32), (36, 36, 24)) == pytest.approx(3 * 48 / 96)
    # tiles of 64 with a 16-voxel halo: cores of 32 -> 3 tiles of 64 voxels per 96-voxel axis
    assert tiles_per_voxel((96,) * 3, (64,) * 3, (16,) * 3) == pytest.approx((3 * 64 / 96) ** 3)
    assert tiles_per_voxel((100, 96, 96), (64,) * 3, (16,) * 3) == pytest.approx(4 * 64 / 100 * (3 * 64 / 96) ** 2)
    # one window larger than the image: MONAI pads the image to it, so 48 voxels are encoded per 40
    assert encoded_per_voxel((40, 40, 40), (48, 48, 48), (24, 24, 24)) == pytest.approx((48 / 40) ** 3)


def test_departure_of_equal_scaled_and_unrelated_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4, 5, 6))
    body = np.ones((4, 5, 6), bool)
    body[0] = False
    same = departure(a, 2 * a + 1, body)
    assert same["pearson"] == pytest.approx(1.0)
    flipped = departure(a, -a, body)
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["cosine_median"] == pytest.approx(-1.0)
    other = departure(a, rng.normal(size=a.shape), body)
    assert abs(other["pearson"]) < 0.3


def test_cell_scores_are_the_density_nll_of_the_given_map_upsampled_to_the_voxels():
    """An unconditional Gaussian over a given descriptor map: every voxel's score is its cell's NLL
    under torch.distributions, and the one outlying cell is where the map peaks."""
    import torch
    from torch import nn

    from screener_nb.benchmarks.tiles import cell_scores
    from screener_nb.features import FeatureExtractor
    from screener_nb.models.density import build_density

    class Descriptor(nn.Module):
        spec = {"in_channels": 1, "out_channels": 2}

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)

    extractor = FeatureExtractor(Descriptor(), "none", None, (1.0, 1.0, 1.0), (3, 3, 2))
    density = build_density("unconditional_gaussian", dim=2)
    with torch.no_grad():
        density.mean.copy_(torch.tensor([0.5, -1.0]))
        density.log_var.copy_(torch.tensor([0.0, np.log(4.0)]))
    y = np.tile(np.array([1.0, 0.0], np.float32)[:, None, None, None], (1, 4, 3, 4))
    x = torch.zeros(1, 1, 12, 9, 8)
    with torch.no_grad():
        flat = cell_scores(extractor, density, x, y, (12, 9, 8))
    normal = torch.distributions.Normal(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]))
    expected = -float(normal.log_prob(torch.tensor([1.0, 0.0])).sum())
    assert flat.shape == (12, 9, 8)
    np.testing.assert_allclose(flat, expected, rtol=1e-5)
    y[:, 1, 1, 2] = [6.0, 8.0]
    with torch.no_grad():
        peaked = cell_scores(extractor, density, x, y, (12, 9, 8))
    # cell (1, 1, 2) covers voxels 3-5, 3-5, 4-5: the trilinear map peaks inside it
    peak = np.unravel_index(np.argmax(peaked), peaked.shape)
    assert 3 <= peak[0] <= 5 and 3 <= peak[1] <= 5 and 4 <= peak[2] <= 5
    assert peaked.max() > expected + 10
