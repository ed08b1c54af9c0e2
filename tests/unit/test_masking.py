"""Block masking: exact ratio, block alignment, masking frequency, two-channel input, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from screener_nb.errors import ConfigError, InputError
from screener_nb.ssl.masking import BlockMasking, masked_input

SHAPE = (32, 32, 16)


def blocks_by_loop(mask: np.ndarray, grid) -> np.ndarray:
    """Per-block value, checking by explicit loops that each block is constant."""
    bs = [s // g for s, g in zip(mask.shape, grid)]
    out = np.zeros(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                blk = mask[i * bs[0]:(i + 1) * bs[0], j * bs[1]:(j + 1) * bs[1], k * bs[2]:(k + 1) * bs[2]]
                assert blk.min() == blk.max(), "a block must be all hidden or all visible"
                out[i, j, k] = blk[0, 0, 0]
    return out


def test_paper_geometry():
    m = BlockMasking()
    assert m.block_size((96, 96, 64)) == (24, 24, 16)
    assert m.n_blocks == 64 and m.n_masked == 38  # round(0.6 * 64)


@pytest.mark.parametrize("grid, ratio", [((4, 4, 4), 0.6), ((2, 4, 2), 0.25), ((4, 4, 2), 1.0), ((4, 4, 4), 0.0)])
def test_exact_ratio_and_alignment(grid, ratio):
    m = BlockMasking(grid=grid, ratio=ratio, p=1.0)
    rng = np.random.default_rng(0)
    expected = round(ratio * np.prod(grid))
    seen = np.zeros(grid)
    for _ in range(30):
        mask = m.block_mask(SHAPE, rng)
        assert mask.shape == SHAPE and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        per_block = blocks_by_loop(mask, grid)
        assert per_block.sum() == expected
        seen += per_block
    if 0 < ratio < 1:
        assert (seen > 0).sum() > expected  # not always the same blocks


def test_masked_view_frequency_is_p():
    m = BlockMasking(grid=(2, 2, 2), ratio=0.5, p=0.5)
    rng = np.random.default_rng(1)
    n = 4000
    both = first = second = 0
    for _ in range(n):
        a = m.sample((4, 4, 2), rng).any()
        b = m.sample((4, 4, 2), rng).any()
        first += a
        second += b
        both += a and b
    tol = 4 * np.sqrt(0.25 / n)
    assert abs(first / n - 0.5) < tol and abs(second / n - 0.5) < tol
    assert abs(both / n - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)  # views masked independently


def test_call_gives_two_channel_input():
    m = BlockMasking(grid=(4, 4, 2), ratio=0.5, p=1.0)
    x = torch.rand(3, 1, *SHAPE) + 0.1
    inputs, masks = m(x, np.random.default_rng(2))
    assert inputs.shape == (3, 2, *SHAPE) and masks.shape == (3, 1, *SHAPE)
    hidden = masks[:, 0] == 1
    assert torch.all(inputs[:, 0][hidden] == 0)                 # hidden voxels zeroed
    assert torch.equal(inputs[:, 0][~hidden], x[:, 0][~hidden])  # visible voxels untouched
    assert torch.equal(inputs[:, 1], masks[:, 0])                # second channel = mask (1 = hidden)
    assert torch.allclose(masks.mean(dim=(1, 2, 3, 4)), torch.full((3,), 0.5))
    unmasked, zero = BlockMasking(p=0.0)(x, np.random.default_rng(3))
    assert torch.equal(unmasked[:, :1], x) and torch.all(zero == 0)


def test_determinism():
    m = BlockMasking(p=0.5)
    a = [m.sample(SHAPE, np.random.default_rng([4, i])) for i in range(5)]
    b = [m.sample(SHAPE, np.random.default_rng([4, i])) for i in range(5)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("kw, match", [
    (dict(grid=(4, 4)), "grid"), (dict(grid=(4, 0, 4)), "grid"),
    (dict(ratio=1.5), "ratio"), (dict(p=-0.1), "p must be"),
])
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        BlockMasking(**kw)


def test_bad_input():
    m = BlockMasking()
    with pytest.raises(InputError, match=r"divisible by the block grid \(4, 4, 4\), found shape \(30, 32, 16\)"):
        m.sample((30, 32, 16), np.random.default_rng(0))
    with pytest.raises(InputError, match=r"\(B, 1, X, Y, Z\), found shape \(2, 3, 32, 32, 16\)"):
        m(torch.zeros(2, 3, *SHAPE), np.random.default_rng(0))
    with pytest.raises(InputError, match=r"masks \(2, 1, 32, 32, 8\)"):
        masked_input(torch.zeros(2, 1, *SHAPE), torch.zeros(2, 1, 32, 32, 8))
