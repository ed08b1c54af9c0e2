"""The oracle condition (models/oracle.py) and the phantom seeds (data/phantom_truth.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from screener_nb.errors import InputError
from screener_nb.models.oracle import OracleContext, organ_cells


def test_organ_cells_are_the_organ_shares_of_each_cell():
    rng = np.random.default_rng(0)
    organs = rng.integers(0, 4, size=(7, 6, 5)).astype(np.uint8)
    got = organ_cells(organs, stride=(3, 3, 2), sigma_cells=0, n_organs=4)
    assert got.shape == (4, 2, 2, 2)
    for k in range(4):  # brute force: count the label in every full cell (floor: the last voxels drop)
        for i in range(2):
            for j in range(2):
                for m in range(2):
                    block = organs[3 * i:3 * i + 3, 3 * j:3 * j + 3, 2 * m:2 * m + 2]
                    assert got[k, i, j, m] == pytest.approx((block == k).mean())


def test_smoothed_organ_cells_still_sum_to_one():
    organs = np.zeros((60, 60, 20), np.uint8)
    organs[24:36, 24:36, 4:16] = 2
    organs[:, :, :3] = 1
    got = organ_cells(organs, sigma_cells=1.5, n_organs=3)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)
    assert (got >= -1e-7).all()  # shares stay non-negative
    assert 0.3 < got[2, 10, 10, 5] < 1 and got[2, 0, 0, 0] < 1e-3  # organ 2 blurred at its border, absent far away


def test_organ_cells_bad_labels():
    with pytest.raises(InputError, match="labels < 3"):
        organ_cells(np.full((6, 6, 4), 5, np.uint8), n_organs=3)


def test_oracle_context_predicts_the_subjects_organ_medians():
    """The prediction against loops over cells (share-weighted organ medians of the scan itself);
    the variance against sklearn's LinearRegression of the squared standardised residuals on the
    shares; the condition returns (prediction, log-variance) in the context's format."""
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(1)
    grid = (8, 7, 6)
    scans = []
    for s in range(3):
        cells = rng.dirichlet(np.ones(4) * 0.3, size=grid).transpose(3, 0, 1, 2)  # (4, x, y, z) shares
        noise = 0.02 + 0.04 * cells[2]                                            # organ 2 is noisier
        mean = 0.2 + 0.05 * s + cells[1] * 0.5 - cells[2] * 0.1 + rng.normal(0, 1, grid) * noise
        std = 0.05 + cells[3] * 0.03 + rng.normal(0, 0.01, grid)
        scans.append((np.stack([mean, std]), cells, rng.random(grid) > 0.2))
    oracle = OracleContext().fit(scans)

    def predicted(coarse, cells, body):  # (dim, x, y, z) by loops
        out = np.zeros(coarse.shape)
        for k in range(coarse.shape[0]):
            med = [np.median(coarse[k][body & (cells[j] > 0.5)]) for j in range(4)]
            for p in np.ndindex(*grid):
                out[(k,) + p] = sum(cells[(j,) + p] * med[j] for j in range(4)) / cells[(slice(None),) + p].sum()
        return out

    t = np.concatenate([s[0][:, s[2]].T for s in scans])
    np.testing.assert_allclose(oracle.target_mean, t.mean(0), rtol=1e-10)
    sq = np.concatenate([((s[0] - predicted(*s))[:, s[2]].T / t.std(0)) ** 2 for s in scans])
    shares = np.concatenate([s[1][:, s[2]].T for s in scans])
    var_ref = LinearRegression(fit_intercept=False).fit(shares, sq)
    coarse, cells, body = scans[0]
    got = oracle.condition(coarse, cells, body).numpy()
    assert got.shape == (4,) + grid
    np.testing.assert_allclose(got[:2], (predicted(coarse, cells, body) - t.mean(0)[:, None, None, None])
                               / t.std(0)[:, None, None, None], atol=1e-5)
    ref_var = np.maximum(var_ref.predict(cells.reshape(4, -1).T).T.reshape(2, *grid),
                         0.01 * sq.mean(0)[:, None, None, None])
    np.testing.assert_allclose(got[2:], np.log(ref_var), rtol=1e-4, atol=1e-5)
    # the noisier organ gets the larger predicted variance of the mean channel
    assert oracle.var_weights[0, 2] > 2 * oracle.var_weights[0, 0]


def test_oracle_condition_feeds_the_residual_density():
    """A cell whose mean departs from its organ's by 10 noise sds scores far above the healthy cells."""
    from screener_nb.models.residual import ResidualDensity

    rng = np.random.default_rng(2)
    grid = (10, 10, 8)
    cells = np.zeros((2,) + grid)
    cells[0, :5], cells[1, 5:] = 1, 1
    body = np.ones(grid, bool)

    def scan(bump=0.0):
        mean = 0.3 + 0.4 * cells[1] + rng.normal(0, 0.01, grid)
        mean[7, 5, 4] += bump
        return np.stack([mean, 0.05 + rng.normal(0, 0.005, grid)])

    train = [(scan(), cells, body) for _ in range(3)]
    oracle = OracleContext().fit(train)
    density = ResidualDensity(2, 0.0, True, oracle.target_mean.tolist(), oracle.target_std.tolist())
    density.fit((torch.from_numpy(t), oracle.condition(t, c, b), b) for t, c, b in train)
    test = scan(bump=0.1)
    score = density.score(torch.from_numpy(test), oracle.condition(test, cells, body), body).numpy()
    assert score[7, 5, 4] > 20 * np.median(score)
    assert np.unravel_index(score.argmax(), grid) == (7, 5, 4)


def test_oracle_bad_inputs():
    with pytest.raises(InputError, match="fitted"):
        OracleContext().condition(np.zeros((2, 3, 3, 3)), np.zeros((2, 3, 3, 3)), np.ones((3, 3, 3), bool))
    with pytest.raises(InputError, match="one shape"):
        OracleContext().fit([(np.zeros((2, 3, 3, 3)), np.zeros((2, 4, 3, 3)), np.ones((3, 3, 3), bool))])


def test_phantom_seeds():
    from screener_nb.data.phantom_truth import phantom_role_index, phantom_seed

    assert phantom_seed(2, "test", 3) == 2 * 100_000 + 20_000 + 3
    assert phantom_role_index("phantom-calib-012") == ("calib", 12)
    for bad in ("lidc-idri-0001", "phantom-holdout-001", "phantom-test-x"):
        with pytest.raises(InputError, match="phantom-<role>-<index>"):
            phantom_role_index(bad)
    with pytest.raises(InputError, match="role"):
        phantom_seed(0, "holdout", 0)
