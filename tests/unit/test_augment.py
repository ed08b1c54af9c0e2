"""Colour augmentations: range, identity, determinism, each operation against a hand-written reference."""
from __future__ import annotations

import numpy as np
import pytest

from screener_nb.errors import ConfigError, InputError
from screener_nb.ssl.augment import ColorAugment

OFF = dict(blur_or_sharpen_p=0.0, noise_p=0.0, brightness_p=0.0, contrast_p=0.0, gamma_p=0.0)
SP = (1.5, 1.5, 2.25)


def only(**kw) -> ColorAugment:
    return ColorAugment(**{**OFF, **kw})


def gaussian_kernel(sigma_vox: float, truncate: float = 4.0) -> np.ndarray:
    """Sampled, normalised Gaussian of radius round(truncate * sigma) (scipy's convention)."""
    r = int(truncate * sigma_vox + 0.5)
    d = np.arange(-r, r + 1)
    k = np.exp(-0.5 * d**2 / sigma_vox**2)
    return k / k.sum()


def test_output_in_unit_range_and_float32():
    rng = np.random.default_rng(0)
    aug = ColorAugment(noise_sigma=(0.2, 0.3), sharpen_alpha=(2.0, 4.0))
    for _ in range(20):
        x = rng.random((16, 16, 8), dtype=np.float32)
        x[0, 0, 0], x[1, 1, 1] = 0.0, 1.0
        y = aug(x, SP, rng)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert y.min() >= 0.0 and y.max() <= 1.0


def test_identity_when_all_probabilities_zero():
    x = np.random.default_rng(1).random((8, 9, 5), dtype=np.float32)
    y = ColorAugment.identity()(x, SP, np.random.default_rng(2))
    assert np.array_equal(x, y)
    assert np.array_equal(only()(x, SP, np.random.default_rng(3)), x)


def test_determinism_from_rng():
    x = np.random.default_rng(4).random((12, 12, 6), dtype=np.float32)
    aug = ColorAugment()
    a = aug(x, SP, np.random.default_rng([5, 1]))
    b = aug(x, SP, np.random.default_rng([5, 1]))
    c = aug(x, SP, np.random.default_rng([5, 2]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_blur_is_in_plane_with_sigma_in_mm():
    # impulse in the middle of a 3D view; sigma 1.5 mm at 0.75 x 1.5 mm voxels = 2 x 1 voxels
    x = np.zeros((41, 41, 9), np.float32)
    x[20, 20, 4] = 1.0
    y = only(blur_or_sharpen_p=1.0, sharpen_fraction=0.0, blur_sigma_mm=(1.5, 1.5))(x, (0.75, 1.5, 3.0),
                                                                                    np.random.default_rng(0))
    expected = np.zeros_like(x)
    kx, ky = gaussian_kernel(2.0), gaussian_kernel(1.0)
    expected[20 - len(kx) // 2:20 + len(kx) // 2 + 1, 20 - len(ky) // 2:20 + len(ky) // 2 + 1, 4] = np.outer(kx, ky)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert np.all(y[:, :, [3, 5]] == 0)  # nothing leaks across slices


def test_sharpen_is_unsharp_masking():
    x = np.full((31, 31, 5), 0.4, np.float32)
    x[15, 15, 2] = 0.6
    aug = only(blur_or_sharpen_p=1.0, sharpen_fraction=1.0, sharpen_sigma_mm=(1.5, 1.5), sharpen_alpha=(0.5, 0.5))
    y = aug(x, SP, np.random.default_rng(0))
    blurred = np.full_like(x, 0.4)
    k = gaussian_kernel(1.0)
    r = len(k) // 2
    blurred[15 - r:15 + r + 1, 15 - r:15 + r + 1, 2] += 0.2 * np.outer(k, k)
    np.testing.assert_allclose(y, x + 0.5 * (x - blurred), atol=1e-6)


def test_noise_std():
    x = np.full((40, 40, 20), 0.5, np.float32)
    y = only(noise_p=1.0, noise_sigma=(0.05, 0.05))(x, SP, np.random.default_rng(0))
    assert abs(y.std() - 0.05) < 0.05 * 0.03 and abs(y.mean() - 0.5) < 1e-3


def test_brightness_contrast_gamma_formulas():
    x = np.random.default_rng(0).random((10, 10, 4), dtype=np.float32)
    rng = np.random.default_rng(1)
    np.testing.assert_allclose(only(brightness_p=1.0, brightness=(1.2, 1.2))(x, SP, rng), np.clip(x * 1.2, 0, 1),
                               atol=1e-6)
    m = x.astype(np.float64).mean()
    np.testing.assert_allclose(only(contrast_p=1.0, contrast=(0.5, 0.5))(x, SP, rng), (x - m) * 0.5 + m, atol=1e-6)
    np.testing.assert_allclose(only(gamma_p=1.0, gamma=(1.25, 1.25))(x, SP, rng), x**1.25, atol=1e-6)


def test_application_frequency_matches_probability():
    x = np.full((4, 4, 2), 0.5, np.float32)
    aug = only(gamma_p=0.8, gamma=(2.0, 2.0))
    rng = np.random.default_rng(0)
    n = 2000
    changed = sum(not np.array_equal(aug(x, SP, rng), x) for _ in range(n))
    assert abs(changed / n - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n)


def test_factor_ranges_respected():
    # brightness factor observed on a constant image lies in [0.8, 1.2] and covers it
    x = np.full((2, 2, 2), 0.5, np.float32)
    aug = only(brightness_p=1.0)
    rng = np.random.default_rng(0)
    f = np.array([aug(x, SP, rng)[0, 0, 0] / 0.5 for _ in range(500)])
    assert f.min() >= 0.8 - 1e-6 and f.max() <= 1.2 + 1e-6
    assert f.min() < 0.82 and f.max() > 1.18


@pytest.mark.parametrize("kw, where", [
    (dict(noise_p=1.5), "noise_p"),
    (dict(gamma=(1.2, 0.9)), "gamma"),
    (dict(blur_sigma_mm=(-1.0, 1.0)), "blur_sigma_mm"),
    (dict(gamma=(0.0, 1.0)), "gamma"),
    (dict(in_plane_axes=(0, 3)), "in_plane_axes"),
])
def test_bad_config(kw, where):
    with pytest.raises(ConfigError, match=where):
        ColorAugment(**kw)


def test_bad_input():
    aug = ColorAugment()
    with pytest.raises(InputError, match=r"\(X, Y, Z\) view, found shape \(4, 4\)"):
        aug(np.zeros((4, 4), np.float32), SP, np.random.default_rng(0))
    with pytest.raises(InputError, match=r"spacing.*found \(1.0, 0.0, 1.0\)"):
        aug(np.zeros((4, 4, 4), np.float32), (1.0, 0.0, 1.0), np.random.default_rng(0))
