"""The context condition: complementary masks, blindness of masked inference, coarse inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from screener_nb.errors import ConfigError, InputError
from screener_nb.models.context import (ContextNet, N_PHASES, coarse_image, phase_masks, random_block_mask,
                                        training_mask)


@pytest.mark.parametrize("grid,block,offset", [((8, 8, 8), 2, (0, 0, 0)), ((10, 9, 7), 3, (1, 2, 0)),
                                               ((5, 6, 4), 4, (3, 0, 1))])
def test_phase_masks_partition_every_cell(grid, block, offset):
    m = phase_masks(grid, block, offset).numpy()
    assert m.shape == (N_PHASES, *grid)
    np.testing.assert_array_equal(m.sum(0), np.ones(grid))  # each cell hidden exactly once
    # brute force: the phase of cell (i, j, k) from the parities of its block index
    for i, j, k in np.ndindex(*grid):
        bits = [((v + o) // block) % 2 for v, o in zip((i, j, k), offset)]
        assert m[bits[0] * 4 + bits[1] * 2 + bits[2], i, j, k] == 1


def test_hidden_blocks_are_isolated():
    # every hidden block's 26 neighbouring blocks are visible in the same pass
    m = phase_masks((12, 12, 12), 3).numpy()
    for k in range(N_PHASES):
        blocks = m[k].reshape(4, 3, 4, 3, 4, 3)[:, 0, :, 0, :, 0]
        hidden = np.argwhere(blocks == 1)
        for b in hidden:
            for d in np.ndindex(3, 3, 3):
                n = b + np.array(d) - 1
                if np.any(n < 0) or np.any(n >= 4) or not np.any(np.array(d) - 1):
                    continue
                assert blocks[tuple(n)] == 0


def test_random_block_mask_ratio_and_blocks():
    rng = np.random.default_rng(0)
    m = random_block_mask((16, 16, 16), 4, 0.5, rng)
    assert m.shape == (16, 16, 16) and set(np.unique(m)) <= {0.0, 1.0}
    assert 0.2 < m.mean() < 0.8
    assert training_mask((16, 16, 16), 4, np.random.default_rng(1), phase_prob=1.0).mean() == pytest.approx(0.125)
    with pytest.raises(ConfigError):
        phase_masks((4, 4, 4), 0)


def test_coarse_image_matches_numpy_cells():
    x = torch.rand(1, 1, 9, 7, 5, dtype=torch.float64)
    out = coarse_image(x, (3, 3, 2))
    assert out.shape == (1, 2, 3, 2, 2)
    a = x[0, 0].numpy()
    cell = a[3:6, 3:6, 2:4]
    np.testing.assert_allclose(out[0, 0, 1, 1, 1].item(), cell.mean())
    np.testing.assert_allclose(out[0, 1, 1, 1, 1].item(), cell.std(), rtol=1e-6)
    with pytest.raises(InputError):
        coarse_image(torch.zeros(1, 2, 6, 6, 6))


def test_masked_inference_never_sees_the_cells_own_block():
    """Changing the input inside one block changes nothing of c inside that block."""
    torch.manual_seed(0)
    net = ContextNet(dim=4, block=4).eval()
    coarse = torch.rand(1, 2, 36, 34, 33)
    base = net.condition_map(coarse, window=(32, 32, 32))
    changed = coarse.clone()
    changed[..., 4:8, 8:12, 12:16] = 5.0  # block (1, 2, 3) of the global block grid
    other = net.condition_map(changed, window=(32, 32, 32))
    inside = (slice(None), slice(None), slice(4, 8), slice(8, 12), slice(12, 16))
    torch.testing.assert_close(other[inside], base[inside], rtol=0, atol=1e-5)
    # ... while the cells around it do see the change (the test would pass trivially otherwise)
    assert (other[..., 0:4, 8:12, 12:16] - base[..., 0:4, 8:12, 12:16]).abs().max() > 1e-3
    assert base.shape == (1, 4, 36, 34, 33)


def test_context_task_regresses_only_hidden_body_cells():
    """The loss of a batch equals a hand computation over hidden body cells only."""
    from screener_nb.ssl.context_task import ContextTask

    rng = np.random.default_rng(0)
    grid = {"y": torch.randn(3, 20, 20, 20), "coarse": torch.rand(2, 20, 20, 20),
            "body": torch.zeros(20, 20, 20, dtype=torch.bool)}
    grid["body"][:, :, :10] = True
    task = ContextTask([grid], window=32, block=4)
    item = task.sample(rng)
    assert item["coarse"].shape == (2, 32, 32, 32) and item["mask"].shape == (1, 32, 32, 32)
    # past the scan's end the window is zero-padded and never a target
    assert item["body"][0, 20:].sum() == 0
    batch = {k: v[None] for k, v in item.items()}

    class Const(torch.nn.Module):
        def forward(self, coarse, mask):
            return torch.zeros(coarse.shape[0], 3, *coarse.shape[2:])

        def loss(self, pred, target):
            return (pred - target).square().mean(1, keepdim=True)

    loss, _ = task.loss(Const(), batch)
    w = (batch["mask"] * batch["body"])[0, 0].bool()
    expected = batch["y"][0][:, w].square().mean()
    torch.testing.assert_close(loss, expected)


def test_heteroscedastic_loss_is_the_gaussian_nll():
    net = ContextNet(dim=2, block=4, heteroscedastic=True)
    pred = torch.randn(1, 4, 2, 2, 2)
    target = torch.randn(1, 2, 2, 2, 2)
    got = net.loss(pred, target)
    normal = torch.distributions.Normal(pred[:, :2], torch.exp(0.5 * pred[:, 2:]))
    want = (-normal.log_prob(target) - 0.5 * np.log(2 * np.pi)).mean(1, keepdim=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("block", [4, 8])
def test_centred_inference_hides_a_margin_around_every_cell(block):
    """Centred: no cell within block // 4 cells (any axis) of a changed cell sees the change;
    the plain 8-pass inference lets a cell at its block's edge see its neighbour."""
    torch.manual_seed(0)
    net = ContextNet(dim=2, size="tiny", block=block).eval()
    coarse = torch.rand(1, 2, 32, 32, 32)
    changed = coarse.clone()
    q = (16, 16, 8)  # at a block corner: its neighbours lie in other blocks
    changed[(..., *q)] = 5.0
    margin = block // 4
    near = (slice(None), slice(None)) + tuple(slice(c - margin, c + margin + 1) for c in q)
    base = net.condition_map(coarse, window=(32, 32, 32), centred=True)
    other = net.condition_map(changed, window=(32, 32, 32), centred=True)
    torch.testing.assert_close(other[near], base[near], rtol=0, atol=1e-5)
    assert (other - base).abs().max() > 1e-3  # farther cells do see it
    plain = net.condition_map(coarse, window=(32, 32, 32))
    plain_changed = net.condition_map(changed, window=(32, 32, 32))
    assert (plain_changed[near] - plain[near]).abs().max() > 1e-3


def test_batch_norm_network_reads_a_whole_grid_in_one_pass():
    """norm="batch": the network's layers are batch norms, and in eval mode window=None equals
    MONAI's sliding window with one window covering the padded grid."""
    torch.manual_seed(0)
    net = ContextNet(dim=2, size="tiny", block=4, norm="batch")
    net.train()
    net(torch.rand(2, 2, 32, 32, 32), torch.zeros(2, 1, 32, 32, 32))  # non-trivial running statistics
    net.eval()
    coarse = torch.rand(1, 2, 30, 20, 28)  # padded to (32, 32, 32)
    whole = net.condition_map(coarse, window=None)
    monai = net.condition_map(coarse, window=(32, 32, 32), overlap=0.0)
    torch.testing.assert_close(whole, monai, rtol=1e-5, atol=1e-5)
    # the passes batched together (the default, 2) or one by one: the same map
    one = net.condition_map(coarse, window=None, centred=True, pass_batch=1)
    torch.testing.assert_close(net.condition_map(coarse, window=None, centred=True, pass_batch=8), one,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.condition_map(coarse, window=(32, 32, 32), overlap=0.0, centred=True), one,
                               rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())


def test_context_rejects_an_unknown_norm():
    with pytest.raises(ConfigError, match="context norm"):
        ContextNet(dim=2, norm="layer")


def test_scan_condition_memoises_maps_per_grid_and_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = ContextNet(dim=2, size="tiny", block=4, norm="batch").eval()
    net.window, net.centred = None, True
    coarse = torch.rand(1, 2, 20, 18, 16)
    plain = net.scan_condition(coarse)  # no cache: the map itself
    torch.testing.assert_close(plain, net.condition_map(coarse, window=None, centred=True))
    net.map_cache = (tmp_path / "cache", "weights-1")
    first = net.scan_condition(coarse)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    torch.testing.assert_close(first, plain)
    calls = []
    real = net.condition_map
    monkeypatch.setattr(net, "condition_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(net.scan_condition(coarse), plain)
    assert calls == []  # read from the cache
    net.scan_condition(coarse + 0.01)  # another scan
    net.map_cache = (tmp_path / "cache", "weights-2")  # other weights
    net.scan_condition(coarse)
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("*.pt"))) == 3
    for f in (tmp_path / "cache").glob("*.pt"):  # a damaged file is recomputed, not an error
        f.write_bytes(b"not a tensor")
    torch.testing.assert_close(net.scan_condition(coarse), plain)
    assert len(calls) == 3


def test_timings_do_not_read_memoised_maps(tmp_path):
    """student_eval.uncached lifts the map cache for a timing and puts it back."""
    from types import SimpleNamespace

    from screener_nb.student_eval import uncached

    net = ContextNet(dim=2, size="tiny", block=4, norm="batch").eval()
    net.map_cache = (tmp_path, "w")
    screener = SimpleNamespace(extractor=SimpleNamespace(condition_encoder=net))
    with uncached(screener):
        assert net.map_cache is None
    assert net.map_cache == (tmp_path, "w")
    with uncached(SimpleNamespace(extractor=None)):  # a student has no context network
        pass
