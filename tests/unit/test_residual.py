"""The residual density (screener_nb.models.residual) against brute-force and analytic references."""
import numpy as np
import pytest
import torch

from screener_nb.errors import ConfigError, InputError
from screener_nb.models.residual import ResidualDensity, body_average


def brute_average(z, body, sigma):
    """Normalised Gaussian average over body cells by explicit sums (scipy's separable kernel,
    truncated at int(4 sigma + 0.5) cells per axis; cells past the grid carry no weight)."""
    r = int(4 * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    out = np.zeros_like(z, dtype=np.float64)
    X, Y, Zs = body.shape
    for i in range(X):
        for j in range(Y):
            for k in range(Zs):
                num, den = np.zeros(z.shape[0]), 0.0
                for a in range(max(0, i - r), min(X, i + r + 1)):
                    for b in range(max(0, j - r), min(Y, j + r + 1)):
                        for c in range(max(0, k - r), min(Zs, k + r + 1)):
                            if body[a, b, c]:
                                w = g[a - i + r] * g[b - j + r] * g[c - k + r]
                                num += w * z[:, a, b, c]
                                den += w
                out[:, i, j, k] = num / den if den > 0 else 0.0
    return out


def test_body_average_matches_brute_force():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 7, 6, 5))
    body = rng.random((7, 6, 5)) > 0.3
    got = body_average(z, body, 1.0)
    want = brute_average(z, body, 1.0)
    assert np.allclose(got[:, body], want[:, body], atol=1e-9)


def _context_output(mu, log_var):
    return torch.from_numpy(np.concatenate([mu, log_var]).astype(np.float32))


def test_fitted_scale_matches_the_analytic_spread_of_averaged_white_noise():
    # t = mu + sigma * e with e ~ N(0, 1) iid: z is white noise, and in the interior of a large body
    # the average's sd is sqrt(sum w^2) / sum w for the normalised Gaussian kernel
    rng = np.random.default_rng(1)
    shape, sigma = (40, 40, 40), 1.0
    mu = rng.normal(size=(2,) + shape)
    log_var = rng.uniform(-1, 1, size=(2,) + shape)
    t = mu + np.exp(0.5 * log_var) * rng.normal(size=(2,) + shape)
    body = np.ones(shape, bool)
    model = ResidualDensity(2, sigma, True)
    coarse = torch.from_numpy(t.astype(np.float32))  # target mean 0, std 1: coarse == standardised target
    model.fit([(coarse, _context_output(mu, log_var), body)])
    # the average at cell p has variance sum_q w_pq^2 / (sum_q w_pq)^2, with the kernel cut at the
    # grid's edges; the kernel is separable, so the factor is a product over the axes
    r = int(4 * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    n = shape[0]
    per_axis = []
    for i in range(n):
        w = g[max(0, r - i): 2 * r + 1 - max(0, i + r + 1 - n)]
        per_axis.append((w ** 2).sum() / w.sum() ** 2)
    per_axis = np.array(per_axis)
    expected = np.sqrt(np.einsum("i,j,k->ijk", per_axis, per_axis, per_axis).mean())
    # 64,000 cells but correlated over ~(2 sigma)^3: a few per cent of sampling error
    assert np.allclose(model.scale.numpy(), expected, rtol=0.04)


def test_score_is_half_squared_standardised_average_and_finds_a_compact_shift():
    rng = np.random.default_rng(2)
    shape = (20, 20, 20)
    mu = np.zeros((2,) + shape)
    log_var = np.zeros((2,) + shape)
    t = 0.3 * rng.normal(size=(2,) + shape)
    t[0, 8:12, 8:12, 8:12] += 1.5  # a compact finding: every cell of it brighter than predicted
    t[0, 3, 15, 4] += 1.5  # one odd cell: diluted by the average
    body = np.ones(shape, bool)
    model = ResidualDensity(2, 1.0, True)
    model.scale.copy_(torch.tensor([0.5, 2.0]))
    s = model.score(torch.from_numpy(t.astype(np.float32)), _context_output(mu, log_var), body).numpy()
    zbar = brute_average(t, body, 1.0)
    want = 0.5 * ((zbar[0] / 0.5) ** 2 + (zbar[1] / 2.0) ** 2)
    assert np.allclose(s, want, rtol=1e-4, atol=1e-5)
    assert s[10, 10, 10] > 3 * s[3, 15, 4]


def test_the_predicted_variance_standardises_the_residual():
    shape = (6, 6, 6)
    t = np.ones((2,) + shape)
    body = np.ones(shape, bool)
    model = ResidualDensity(2, 0.0, True)
    narrow = model.score(torch.from_numpy(t.astype(np.float32)),
                         _context_output(np.zeros_like(t), np.full_like(t, np.log(0.25))), body)
    wide = model.score(torch.from_numpy(t.astype(np.float32)),
                       _context_output(np.zeros_like(t), np.full_like(t, np.log(4.0))), body)
    # z = 1 / 0.5 = 2 per channel -> 0.5 * 2 * 4 = 4 nats; z = 1 / 2 -> 0.25
    assert np.allclose(narrow.numpy(), 4.0) and np.allclose(wide.numpy(), 0.25)


def test_bad_inputs_are_reported():
    with pytest.raises(ConfigError, match="sigma"):
        ResidualDensity(2, -1.0)
    model = ResidualDensity(2, 1.0, True)
    with pytest.raises(InputError, match="condition"):
        model.score(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), np.ones((4, 4, 4), bool))
    with pytest.raises(InputError, match="healthy scans"):
        model.fit([])


def test_residual_needs_the_learned_condition():
    from screener_nb.inference import check_method

    check_method("learned", "residual")
    with pytest.raises(ConfigError, match="learned"):
        check_method("sincos", "residual")
