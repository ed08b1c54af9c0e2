"""The encode-once tiled map (``features.tiled_pooled_map``) against one pass over the whole image."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from screener_nb.errors import ConfigError
from screener_nb.features import FeatureExtractor, scan_pooled_map, scan_tiling, tiled_pooled_map
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


def test_scan_tiling_by_hand():
    # a demo phantom: every axis fits one tile, rounded up to lcm(stride, 16) = 48, 48, 16
    assert scan_tiling((157, 113, 111), (3, 3, 2), 16) == ((192, 144, 112), (0, 0, 0))
    # LIDC-IDRI-0001 preprocessed: X (240) is longer than the 192-voxel tile, so it alone is tiled with a halo
    assert scan_tiling((240, 184, 148), (3, 3, 2), 16) == ((192, 192, 160), (24, 0, 0))


def test_a_scan_that_fits_one_tile_is_one_pass_over_it():
    """Reference: one pass of the network over the image zero-padded at its end to the tile, pooled."""
    net = NormFree().eval()
    x = torch.rand(1, 1, 20, 17, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = scan_pooled_map(net, x, (3, 3, 2))
        padded = torch.nn.functional.pad(x, (0, 10 - 9, 0, 18 - 17, 0, 21 - 20))
        reference = pool_features(net(padded), (3, 3, 2))[..., :6, :5, :4]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_a_scan_larger_than_the_tile_is_tiled_with_the_halo_and_still_exact():
    net = NormFree().eval()
    x = torch.rand(1, 1, 40, 31, 22, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = scan_pooled_map(net, x, (3, 3, 2), max_tile=(18, 18, 12), halo=(3, 3, 2))
    torch.testing.assert_close(out, _whole_pass(net, x, (3, 3, 2), (3, 3, 2)), rtol=1e-5, atol=1e-6)


def test_the_extractor_encodes_a_scan_the_way_it_was_asked():
    class Descriptor(NormFree):
        spec = {"in_channels": 1, "out_channels": 3}

    x = torch.rand(1, 1, 48, 48, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = FeatureExtractor(Descriptor().eval(), "none", None, (1.0,) * 3, descriptor_map="scan")
        windows = FeatureExtractor(Descriptor().eval(), "none", None, (1.0,) * 3)
        y_scan, _ = whole.scan_features(x, (24, 24, 16), overlap=0.5)
        y_windows, _ = windows.scan_features(x, (24, 24, 16), overlap=0.5)
        reference = pool_features(Descriptor().eval()(x), (3, 3, 2))
    torch.testing.assert_close(y_scan, reference, rtol=1e-5, atol=1e-6)
    # windows see zeros at their borders where the whole pass sees the image: the maps differ there
    assert not torch.allclose(y_windows, reference, atol=1e-3)
    with pytest.raises(ConfigError, match="descriptor_map: expected one of windows, scan, found 'tiles'"):
        FeatureExtractor(Descriptor(), "none", None, (1.0,) * 3, descriptor_map="tiles")
