"""Sin-cos position codes: hand-computed values, uniqueness over a CT-sized cube, shift equivariance."""
from __future__ import annotations

import math

import pytest
import torch

from screener_nb.errors import ConfigError, InputError
from screener_nb.models.encodings import sincos_condition_map, sincos_wavelengths

F64 = dict(dtype=torch.float64)


def test_shape_dtype_and_range():
    m = sincos_condition_map(torch.tensor([0.0, 0.0, 0.0], **F64), torch.tensor([4.5, 4.5, 4.5], **F64), (5, 4, 3))
    assert m.shape == (24, 5, 4, 3) and m.dtype == torch.float32
    assert m.abs().max() <= 1.0
    # every (sin, cos) pair lies on the unit circle
    for a in range(3):
        s, c = m[a * 8: a * 8 + 4], m[a * 8 + 4: a * 8 + 8]
        torch.testing.assert_close(s ** 2 + c ** 2, torch.ones_like(s), atol=1e-6, rtol=0)


def test_hand_computed_values_two_frequencies():
    # dim 12 -> 2 frequencies per axis: exactly the shortest (10 mm) and the longest (1000 mm) wavelength
    origin, step = torch.tensor([25.0, -40.0, 7.5], **F64), torch.tensor([1.5, 2.0, 3.0], **F64)
    m = sincos_condition_map(origin, step, (3, 4, 5), 12, min_wavelength_mm=10.0, max_wavelength_mm=1000.0)
    i, j, k = 1, 2, 3
    pos = [25.0 + 1 * 1.5, -40.0 + 2 * 2.0, 7.5 + 3 * 3.0]  # 26.5, -36, 16.5 mm
    expected = []
    for p in pos:  # per axis: sin(10), sin(1000), cos(10), cos(1000)
        expected += [math.sin(2 * math.pi * p / 10), math.sin(2 * math.pi * p / 1000),
                     math.cos(2 * math.pi * p / 10), math.cos(2 * math.pi * p / 1000)]
    torch.testing.assert_close(m[:, i, j, k], torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    # a position on a whole number of short wavelengths: sin 0, cos 1 (x of cell 0 is 25 mm = 2.5 * 10 -> cos -1)
    assert m[0, 0, 0, 0] == pytest.approx(0.0, abs=1e-6) and m[2, 0, 0, 0] == pytest.approx(-1.0, abs=1e-6)


def test_wavelengths_are_geometric_between_the_bounds():
    w = sincos_wavelengths(4, 9.0, 1000.0)
    assert w[0] == pytest.approx(9.0) and w[-1] == pytest.approx(1000.0)
    ratios = w[1:] / w[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (1000 / 9) ** (1 / 3)))


def _min_pairwise(codes: torch.Tensor) -> float:
    """Smallest distance between two distinct rows of codes (N, D)."""
    d = torch.cdist(codes.double(), codes.double())
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def test_positions_on_a_1p5mm_grid_over_500mm_are_unique():
    n = 334  # 1.5 mm steps over 500 mm
    step = torch.tensor([1.5, 1.5, 1.5], **F64)
    origin = torch.tensor([-250.0, -250.0, -250.0], **F64)
    # The code is the concatenation of per-axis codes, so two grid positions are as far apart as the
    # root-sum-square of their per-axis distances: the minimum over the whole cube is the minimum over
    # the three axes of the per-axis minima. Check every axis over its whole 500 mm range...
    per_axis_min = []
    for a in range(3):
        shape = [1, 1, 1]
        shape[a] = n
        m = sincos_condition_map(origin, step, tuple(shape), 24)
        rows = m.reshape(24, n).T[:, a * 8:(a + 1) * 8]  # this axis' 8 channels
        per_axis_min.append(_min_pairwise(rows))
    assert min(per_axis_min) > 0.5, per_axis_min  # neighbours 1.5 mm apart: ~1.0
    # ...and, directly in 3D, all pairs of a 20 x 20 x 20 block (8000 positions).
    block = sincos_condition_map(origin + 100.0, step, (20, 20, 20), 24).reshape(24, -1).T
    assert _min_pairwise(block) > 0.5


def test_shift_equivariance():
    origin, step = torch.tensor([-120.3, 55.0, 310.25], **F64), torch.tensor([4.5, 4.5, 4.5], **F64)
    big = sincos_condition_map(origin, step, (10, 9, 8))
    shift = torch.tensor([2, 3, 1], **F64)
    small = sincos_condition_map(origin + shift * step, step, (5, 4, 3))
    torch.testing.assert_close(small, big[:, 2:7, 3:7, 1:4], atol=1e-6, rtol=0)


def test_float64_phases_keep_far_positions_exact():
    # at ~900 mm a float32 position would be off by ~3e-5 mm; the phase is computed in float64
    origin = torch.tensor([900.123456, 0.0, 0.0], **F64)
    m = sincos_condition_map(origin, torch.ones(3, **F64), (1, 1, 1), 12, min_wavelength_mm=10.0)
    assert float(m[0, 0, 0, 0]) == pytest.approx(math.sin(2 * math.pi * 900.123456 / 10), abs=1e-6)


@pytest.mark.parametrize("dim", [0, 4, 25, 7])
def test_dim_not_multiple_of_6_is_a_config_error(dim):
    with pytest.raises(ConfigError, match=f"found {dim}"):
        sincos_condition_map(torch.zeros(3, **F64), torch.ones(3, **F64), (2, 2, 2), dim)


def test_bad_origin_shape_and_wavelengths():
    with pytest.raises(InputError, match=r"\(2,\)"):
        sincos_condition_map(torch.zeros(2, **F64), torch.ones(3, **F64), (2, 2, 2))
    with pytest.raises(ConfigError, match="found 100"):
        sincos_condition_map(torch.zeros(3, **F64), torch.ones(3, **F64), (2, 2, 2), min_wavelength_mm=100.0,
                             max_wavelength_mm=10.0)
