"""Dense VICReg / InfoNCE against hand computations and numpy loops; collapse monitors; head."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from screener_nb.errors import ConfigError, InputError
from screener_nb.ssl.losses import (DenseSSLHead, Expander, Projector, effective_rank, embedding_std,
                                    infonce_loss, vicreg_loss)

T = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731


def vicreg_by_loops(z1, z2, eps=1e-4):
    """VICReg terms with plain python loops (per view, un-reduced)."""
    z1, z2 = np.asarray(z1, float), np.asarray(z2, float)
    m, d = z1.shape
    inv = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(m) for j in range(d)) / (m * d)
    var, cov = [], []
    for z in (z1, z2):
        mean = [sum(z[i, j] for i in range(m)) / m for j in range(d)]
        c = [[sum((z[i, a] - mean[a]) * (z[i, b] - mean[b]) for i in range(m)) / (m - 1) for b in range(d)]
             for a in range(d)]
        var.append(sum(max(0.0, 1 - math.sqrt(c[j][j] + eps)) for j in range(d)) / d)
        cov.append(sum(c[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d)
    return inv, var, cov


def test_vicreg_hand_computed_m3_d2():
    z1 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    z2 = [[1.0, 1.0], [0.0, 0.0], [2.0, 1.0]]
    # by hand: diffs (0,-1),(0,1),(-1,0) -> inv = 3/6 = 0.5
    # z1: var = (1/3, 1/3), cov01 = ((1/3)(-2/3) + (-2/3)(1/3) + (1/3)(1/3)) / 2 = -1/6
    # z2: var = (1, 1/3), cov01 = (0*(1/3) + (-1)(-2/3) + 1*(1/3)) / 2 = 1/2
    inv = 0.5
    v1 = (2 * (1 - math.sqrt(1 / 3 + 1e-4))) / 2
    v2 = ((1 - math.sqrt(1 + 1e-4)) * 0 + (1 - math.sqrt(1 / 3 + 1e-4))) / 2  # relu(1 - 1.00005) = 0
    c1, c2 = 2 * (1 / 6) ** 2 / 2, 2 * (1 / 2) ** 2 / 2
    loss, logs = vicreg_loss(T(z1), T(z2))
    assert logs["invariance"].item() == pytest.approx(inv, abs=1e-6)
    assert logs["variance"].item() == pytest.approx(v1 + v2, abs=1e-6)
    assert logs["covariance"].item() == pytest.approx(c1 + c2, abs=1e-6)
    assert loss.item() == pytest.approx(25 * inv + 25 * (v1 + v2) + (c1 + c2), abs=1e-4)
    _, mean_logs = vicreg_loss(T(z1), T(z2), view_reduction="mean")
    assert mean_logs["variance"].item() == pytest.approx((v1 + v2) / 2, abs=1e-6)
    assert mean_logs["covariance"].item() == pytest.approx((c1 + c2) / 2, abs=1e-6)


def test_vicreg_matches_loops_on_random_data():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(0, 0.7, (9, 4)), rng.normal(0.2, 1.3, (9, 4))
    inv, var, cov = vicreg_by_loops(z1, z2)
    loss, logs = vicreg_loss(T(z1), T(z2), inv_weight=2.0, var_weight=3.0, cov_weight=0.5)
    assert logs["invariance"].item() == pytest.approx(inv, rel=1e-5)
    assert logs["variance"].item() == pytest.approx(sum(var), rel=1e-5)
    assert logs["covariance"].item() == pytest.approx(sum(cov), rel=1e-5)
    assert loss.item() == pytest.approx(2 * inv + 3 * sum(var) + 0.5 * sum(cov), rel=1e-5)


def test_vicreg_invariance_zero_for_identical_inputs_and_variance_zero_when_std_ge_1():
    z = torch.randn(50, 6)
    _, logs = vicreg_loss(z, z.clone())
    assert logs["invariance"].item() == 0.0
    wide = torch.tensor([[2.0, -3.0], [-2.0, 3.0], [2.0, 3.0], [-2.0, -3.0]])  # std > 1, uncorrelated
    _, logs = vicreg_loss(wide, wide)
    assert logs["variance"].item() == 0.0 and logs["covariance"].item() == 0.0
    collapsed = torch.zeros(8, 3)
    _, logs = vicreg_loss(collapsed, collapsed)
    assert logs["variance"].item() == pytest.approx(2 * (1 - math.sqrt(1e-4)), abs=1e-6)


def test_vicreg_backward():
    z1 = torch.randn(16, 4, requires_grad=True)
    z2 = torch.randn(16, 4, requires_grad=True)
    vicreg_loss(z1, z2)[0].backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def infonce_by_loops(z1, z2, t):
    z = np.concatenate([z1, z2]).astype(float)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    m2, m = len(z), len(z1)
    total = 0.0
    for i in range(m2):
        pos = (i + m) % m2
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(m2) if j != i)
        total += -(float(z[i] @ z[pos]) / t - math.log(den))
    return total / m2


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_infonce_matches_softmax_cross_entropy_loop(t):
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    loss, logs = infonce_loss(T(z1), T(z2), temperature=t)
    assert loss.item() == pytest.approx(infonce_by_loops(z1, z2, t), rel=1e-5)


def test_infonce_hand_computed_m2():
    # orthogonal unit vectors, partners identical: rows e1,e2,e1,e2
    # each row: positive sim 1, the two others 0 -> loss = -log(e^{1/t} / (e^{1/t} + 2)), t = 0.5
    z = T([[1.0, 0.0], [0.0, 1.0]])
    loss, logs = infonce_loss(z, z * 3.0, temperature=0.5)  # scale is normalised away
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-5)
    assert logs["accuracy"].item() == 1.0 and logs["positive_cosine"].item() == pytest.approx(1.0)


def test_embedding_std_and_effective_rank():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(200, 5)) * np.array([1, 2, 3, 0.5, 1])
    np.testing.assert_allclose(embedding_std(T(z)).numpy(), z.std(axis=0, ddof=1), rtol=1e-5)
    iso = torch.from_numpy(rng.normal(size=(20000, 8)))
    assert effective_rank(iso) == pytest.approx(8.0, abs=0.05)
    rank1 = torch.from_numpy(rng.normal(size=(500, 1)) * rng.normal(size=(1, 8)))
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-6)
    aniso = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4))
    lam = np.linalg.eigvalsh(np.cov(aniso.T))
    assert effective_rank(torch.from_numpy(aniso)) == pytest.approx(math.exp(entropy(lam)), rel=1e-6)
    assert effective_rank(torch.ones(10, 3)) == 0.0


def test_expander_and_projector_structure():
    e = Expander(dim_in=32, hidden=64, out=48)
    kinds = [type(m).__name__ for m in e]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert e[0].in_features == 32 and e[3].out_features == 64 and e[6].out_features == 48
    assert e(torch.randn(10, 32)).shape == (10, 48)
    p = Projector(dim_in=8)
    assert p(torch.randn(4, 8)).shape == (4, 128)
    assert [type(m).__name__ for m in Expander(4, 4, 4, layers=1)] == ["Linear"]
    with pytest.raises(ConfigError, match="norm"):
        Expander(norm="group")


@pytest.mark.parametrize("kind", ["vicreg", "infonce"])
def test_dense_head_forward_backward(kind):
    torch.manual_seed(0)
    f1 = torch.randn(2, 4, 6, 6, 4, requires_grad=True)
    f2 = torch.randn(2, 4, 6, 6, 4, requires_grad=True)
    idx = torch.stack([torch.randint(0, n, (2, 10)) for n in (6, 6, 4)], -1)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    head = DenseSSLHead(kind, dim=4, hidden=32, out=16)
    loss, logs = head(f1, f2, idx, idx, valid)
    loss.backward()
    assert f1.grad.abs().sum() > 0 and logs["pairs"].item() == 17
    assert 0 < logs["feature_rank"] <= 4


def test_dense_head_identical_views_have_zero_invariance():
    f = torch.randn(1, 3, 5, 5, 5)
    idx = torch.stack([torch.randint(0, 5, (1, 30)) for _ in range(3)], -1)
    _, logs = DenseSSLHead("vicreg", dim=3, hidden=16, out=16)(f, f.clone(), idx, idx, torch.ones(1, 30, dtype=bool))
    assert logs["invariance"].item() == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_and_config():
    with pytest.raises(ConfigError, match="unknown dense SSL loss kind 'byol'; known kinds: vicreg, infonce"):
        DenseSSLHead("byol")
    with pytest.raises(ConfigError, match="unknown DenseSSLHead options"):
        DenseSSLHead("vicreg", dim=4, hidden=8, out=8, inv_wieght=3.0)
    with pytest.raises(InputError, match=r"vicreg_loss: expected two \(M, D\).*found shapes \(4, 3\) and \(4, 2\)"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(InputError, match="vicreg_loss.*M = 1"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(InputError, match=r"infonce_loss.*shapes \(3,\) and \(3,\)"):
        infonce_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ConfigError, match="view_reduction"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 3), view_reduction="max")
    with pytest.raises(ConfigError, match="temperature"):
        infonce_loss(torch.zeros(4, 3), torch.zeros(4, 3), temperature=0.0)
    with pytest.raises(InputError, match=r"effective_rank.*shape \(1, 4\)"):
        effective_rank(torch.zeros(1, 4))
    with pytest.raises(InputError, match=r"embedding_std.*shape \(5,\)"):
        embedding_std(torch.zeros(5))
