"""screener_nb.data.crops against hand-made windows."""
from __future__ import annotations

import numpy as np

from screener_nb.data.crops import centre_slices, centred_start, random_crop, take_crop


def test_take_crop_pads_past_the_volume():
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    got = take_crop(a, (2, 3, 4), (4, 4, 4), fill=-1)
    want = np.full((4, 4, 4), -1, np.float32)
    for i in range(4):
        for j in range(4):
            for k in range(4):
                if 2 + i < 4 and 3 + j < 5 and 4 + k < 6:
                    want[i, j, k] = a[2 + i, 3 + j, 4 + k]
    np.testing.assert_array_equal(got, want)


def test_centre_slices_hand_computed():
    assert centre_slices((100, 80, 30), (48, 48, 32)) == (slice(26, 74), slice(16, 64), slice(0, 32))


def test_random_crop_is_a_window_around_a_body_voxel():
    rng = np.random.default_rng(0)
    image = rng.random((40, 30, 20)).astype(np.float32)
    body = np.zeros(image.shape, bool)
    body[25:35, 5:10, 2:6] = True
    patch = np.array((16, 12, 8))
    for seed in range(20):
        crop, start = random_crop(image, body, patch, np.random.default_rng(seed))
        np.testing.assert_array_equal(crop, take_crop(image, start, patch))
        assert ((0 <= start) & (start <= np.array(image.shape) - patch)).all()
        # its centre is within a quarter patch (+1 voxel of rounding) of some body voxel
        centre = start + patch // 2
        near = np.abs(np.argwhere(body) - centre) <= patch // 4 + 1
        assert near.all(1).any()
    # the same generator state gives the same crop as the centre + centred_start recipe
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    _, start = random_crop(image, body, patch, r1)
    idx = np.flatnonzero(body.ravel())
    c = np.array(np.unravel_index(int(r2.choice(idx)), body.shape))
    np.testing.assert_array_equal(start, centred_start(c, image.shape, patch, r2))
