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
