"""The encode-once tiled map (``features.tiled_pooled_map``) against one pass over the whole image."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from screener_nb.errors import ConfigError
from screener_nb.features import tiled_pooled_map
from screener_nb.models.density import pool_features


class NormFree(nn.Module):
    """Two 3x3x3 convolutions, no normalisation: the output depends on the input within 2 voxels."""

    spec = {"in_channels": 1}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GELU(), nn.Conv3d(4, 3, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def _whole_pass(net, x, stride, halo):
    """The reference: one pass over the image zero-padded by ``halo`` on every side, pooled."""
    pad = []
    for h in reversed(halo):
        pad += [h, h]
    with torch.no_grad():
        out = net(torch.nn.functional.pad(x, pad))
    inner = out[(..., *(slice(h, h + n) for h, n in zip(halo, x.shape[2:])))]
    return pool_features(inner, stride)


@pytest.mark.parametrize("shape", [(40, 31, 22), (12, 12, 8)])
def test_tiles_with_a_halo_wider_than_the_receptive_field_equal_one_whole_pass(shape):
    """Cells from many tiles (and from one tile larger than the image) equal the whole pass."""
    net = NormFree().eval()
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    stride, tile, halo = (3, 3, 2), (18, 18, 12), (3, 3, 2)
    with torch.no_grad():
        tiled = tiled_pooled_map(net, x, stride, tile, halo)
    reference = _whole_pass(net, x, stride, halo)
    assert tiled.shape == (1, 3, shape[0] // 3, shape[1] // 3, shape[2] // 2)
    torch.testing.assert_close(tiled, reference, rtol=1e-5, atol=1e-6)


def test_a_halo_narrower_than_the_receptive_field_is_not_exact():
    """The claim above needs the halo: with none, cells at the tile seams differ from the whole pass."""
    net = NormFree().eval()
    x = torch.rand(1, 1, 36, 36, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiled = tiled_pooled_map(net, x, (3, 3, 2), (12, 12, 8), (0, 0, 0))
    assert not torch.allclose(tiled, _whole_pass(net, x, (3, 3, 2), (3, 3, 2)), atol=1e-4)


def test_tiles_that_cut_cells_are_refused():
    net = NormFree()
    x = torch.rand(1, 1, 24, 24, 16)
    with pytest.raises(ConfigError, match=r"tiles \(18, 18, 12\) with halo \(2, 3, 2\).*multiples of the pooling stride"):
        tiled_pooled_map(net, x, (3, 3, 2), (18, 18, 12), (2, 3, 2))
    with pytest.raises(ConfigError, match="multiples of 16"):
        tiled_pooled_map(net, x, (3, 3, 2), (18, 18, 12), (3, 3, 2), multiple=16)
