"""Density models against independent references.

Gaussians against torch.distributions; the flow against a brute-force change of
variables (autograd Jacobian + slogdet) and by fitting known conditional
Gaussians; pooling against a numpy block mean, upsampling against np.interp.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Independent, MultivariateNormal, Normal

from screener_nb.errors import ConfigError, InputError
from screener_nb.models.density import DENSITY_KINDS, build_density, pool_features, upsample_scores


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def perturb(model: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised layers (identity starts) do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------- pooling / upsampling
def test_pool_features_equals_numpy_block_mean():
    x = rand(2, 3, 7, 6, 5)
    out = pool_features(x, (3, 3, 2))
    a = x.numpy()[:, :, :6, :6, :4]  # floor: the incomplete blocks are dropped
    ref = a.reshape(2, 3, 2, 3, 2, 3, 2, 2).mean(axis=(3, 5, 7))
    assert out.shape == (2, 3, 2, 2, 2)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_pool_of_a_paper_window_gives_32_cubed():
    assert pool_features(torch.zeros(1, 2, 96, 96, 64)).shape == (1, 2, 32, 32, 32)


def _interp_axis(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear interpolation along one axis with half-pixel centres (align_corners=False)."""
    n_in = a.shape[axis]
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    return np.apply_along_axis(lambda v: np.interp(src, np.arange(n_in), v), axis, a)


def test_upsample_scores_is_separable_linear_interpolation():
    s = rand(2, 4, 3, 5)
    out = upsample_scores(s, (12, 9, 10))
    assert out.shape == (2, 12, 9, 10)
    ref = s.numpy().astype(np.float64)
    for axis, n in zip((1, 2, 3), (12, 9, 10)):
        ref = _interp_axis(ref, axis, n)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_upsample_constant_stays_constant():
    out = upsample_scores(torch.full((1, 16, 16, 16), 3.25), (48, 48, 32))
    assert out.shape == (1, 48, 48, 32)
    torch.testing.assert_close(out, torch.full_like(out, 3.25))


def test_pool_and_upsample_bad_shapes():
    with pytest.raises(InputError, match=r"found shape \(3, 6, 6, 6\)"):
        pool_features(torch.zeros(3, 6, 6, 6))
    with pytest.raises(InputError, match=r"stride \(3, 3, 8\)"):
        pool_features(torch.zeros(1, 1, 6, 6, 6), (3, 3, 8))
    with pytest.raises(InputError, match=r"found shape \(1, 1, 4, 4, 4\)"):
        upsample_scores(torch.zeros(1, 1, 4, 4, 4), (8, 8, 8))


# ---------------------------------------------------------------------------- Gaussians
def test_unconditional_gaussian_equals_torch_distributions():
    model = perturb(build_density("unconditional_gaussian", 5, 0))
    y = rand(2, 5, 3, 4, 2) * 2
    lp = model.log_prob(y)
    mu, sigma = model.mean.detach(), torch.exp(0.5 * model.log_var.detach())
    ref = Independent(Normal(mu, sigma), 1).log_prob(y.movedim(1, -1))
    assert lp.shape == (2, 3, 4, 2)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [0, 16])
def test_conditional_gaussian_equals_torch_distributions(hidden):
    torch.manual_seed(0)
    model = perturb(build_density("gaussian", 4, 3, hidden=hidden))
    y, c = rand(2, 4, 5, 4, 3, seed=1), rand(2, 3, 5, 4, 3, seed=2)
    with torch.no_grad():
        mean, log_var = model.params(c, y)
        lp = model.log_prob(y, c)
    assert mean.std() > 0.05 and log_var.std() > 0.05  # the heads really depend on c
    ref = Normal(mean, torch.exp(0.5 * log_var)).log_prob(y).sum(1)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    # forward standardises; its log-det is -sum(log sigma)
    z, logdet = model(y, c)
    torch.testing.assert_close(logdet, -torch.log(torch.exp(0.5 * log_var)).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.inverse(z, c), y, rtol=1e-5, atol=1e-5)


def test_fresh_gaussians_start_at_standard_normal():
    y, c = rand(1, 3, 4, 4, 4), rand(1, 2, 4, 4, 4)
    ref = Normal(0.0, 1.0).log_prob(y).sum(1)
    torch.testing.assert_close(build_density("gaussian", 3, 2).log_prob(y, c), ref)
    torch.testing.assert_close(build_density("unconditional_gaussian", 3, 0).log_prob(y), ref)


def test_conditional_gaussian_heads_see_a_3x3x3_neighbourhood():
    torch.manual_seed(0)
    model = perturb(build_density("gaussian", 2, 2, hidden=8))
    c = rand(1, 2, 7, 7, 7)
    with torch.no_grad():
        base = model.params(c, torch.zeros(1, 2, 7, 7, 7))[0][0, :, 3, 3, 3]
        for offset, changes in [((1, 1, 1), True), ((2, 0, 0), False), ((0, 3, 0), False)]:
            c2 = c.clone()
            c2[0, :, 3 + offset[0], 3 + offset[1], 3 + offset[2]] += 5.0
            moved = model.params(c2, torch.zeros(1, 2, 7, 7, 7))[0][0, :, 3, 3, 3]
            assert (not torch.allclose(moved, base)) == changes, offset


def test_gaussian_is_exact_under_bf16_autocast():
    model = perturb(build_density("gaussian", 4, 3))
    y, c = rand(2, 4, 3, 3, 3), rand(2, 3, 3, 3, 3)
    ref = model.log_prob(y, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.log_prob(y, c)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------- flow
def test_flow_is_invertible():
    torch.manual_seed(0)
    # moderate noise keeps the map well conditioned, as a trained flow is (with much larger random
    # weights z reaches ~200 and float32 round-off, amplified by the inverse, exceeds 1e-4)
    flow = perturb(build_density("flow", 6, 4, depth=4, hidden=16), scale=0.1)
    y, c = rand(2, 6, 4, 3, 2, seed=3), rand(2, 4, 4, 3, 2, seed=4)
    with torch.no_grad():
        z, logdet = flow(y, c)
        back = flow.inverse(z, c)
    assert z.shape == y.shape and logdet.shape == (2, 4, 3, 2)
    assert (z - y).abs().max() > 0.5 and logdet.std() > 0.1  # not trivially the identity
    torch.testing.assert_close(back, y, atol=1e-4, rtol=0)
    # float64 inverts even a badly conditioned random flow
    flow64 = perturb(build_density("flow", 6, 4, depth=4, hidden=16), scale=0.3).double()
    with torch.no_grad():
        y64, c64 = y.double(), c.double()
        torch.testing.assert_close(flow64.inverse(flow64(y64, c64)[0], c64), y64, atol=1e-8, rtol=0)


def test_flow_log_prob_equals_brute_force_change_of_variables():
    torch.manual_seed(0)
    dim, cond = 5, 3
    flow = perturb(build_density("flow", dim, cond, depth=3, hidden=8)).double()
    y, c = rand(2, dim, 3, 2, 2, dtype=torch.float64, seed=5), rand(2, cond, 3, 2, 2, dtype=torch.float64, seed=6)
    with torch.no_grad():
        lp = flow.log_prob(y, c)
    for b, i, j, k in [(0, 0, 0, 0), (1, 2, 1, 0), (0, 1, 0, 1)]:
        cp = c[b:b + 1, :, i:i + 1, j:j + 1, k:k + 1]

        def f(v):  # the per-position map y -> z
            return flow(v.view(1, dim, 1, 1, 1), cp)[0].reshape(dim)

        v = y[b, :, i, j, k].clone()
        jac = jacobian(f, v)
        z = f(v).detach()
        log_normal = -0.5 * float(z @ z) - 0.5 * dim * math.log(2 * math.pi)
        ref = log_normal + float(torch.linalg.slogdet(jac).logabsdet)
        assert float(lp[b, i, j, k]) == pytest.approx(ref, abs=1e-9)
        # the flow's own log-det equals the autograd one
        with torch.no_grad():
            own_logdet = float(flow(v.view(1, dim, 1, 1, 1), cp)[1])
        assert own_logdet == pytest.approx(float(torch.linalg.slogdet(jac).logabsdet), abs=1e-9)


def test_flow_positions_are_independent():
    torch.manual_seed(0)
    flow = perturb(build_density("flow", 4, 2, depth=2, hidden=8))
    y, c = rand(1, 4, 3, 3, 3), rand(1, 2, 3, 3, 3)
    y2, c2 = y.clone(), c.clone()
    y2[0, :, 2, 2, 2] += 3.0
    c2[0, :, 1, 0, 0] -= 3.0
    with torch.no_grad():
        a, b = flow.log_prob(y, c), flow.log_prob(y2, c2)
    changed = (a - b).abs() > 1e-6
    assert changed[0, 2, 2, 2] and changed[0, 1, 0, 0] and changed.sum() == 2


def test_fresh_flow_starts_from_identity_actnorm_and_zero_coupling():
    # at init: ActNorm = identity, W orthogonal (log|det| 0), couplings scale half the channels by sigmoid(2)
    dim, depth = 6, 3
    for cond in (0, 2):
        flow = build_density("flow", dim, cond, depth=depth, hidden=8)
        y = rand(2, dim, 2, 2, 2)
        c = rand(2, cond, 2, 2, 2) if cond else None
        _, logdet = flow(y, c)
        expected = depth * (dim // 2) * math.log(1 / (1 + math.exp(-2)))
        torch.testing.assert_close(logdet, torch.full_like(logdet, expected), atol=1e-5, rtol=0)


def test_unconditional_flow_and_sampling():
    torch.manual_seed(0)
    flow = perturb(build_density("flow", 4, 0, depth=2, hidden=8))
    s1 = flow.sample(generator=torch.Generator().manual_seed(7), shape=(2, 3, 3, 3))
    s2 = flow.sample(generator=torch.Generator().manual_seed(7), shape=(2, 3, 3, 3))
    assert s1.shape == (2, 4, 3, 3, 3) and torch.equal(s1, s2)
    assert torch.isfinite(flow.log_prob(s1)).all()
    cflow = build_density("flow", 4, 2, depth=2, hidden=8)
    assert cflow.sample(rand(2, 2, 3, 1, 2)).shape == (2, 4, 3, 1, 2)


def test_flow_under_bf16_autocast_stays_float32_and_invertible():
    torch.manual_seed(0)
    flow = perturb(build_density("flow", 6, 3, depth=3, hidden=16), scale=0.1)
    y, c = rand(2, 6, 3, 3, 3), rand(2, 3, 3, 3, 3)
    with torch.no_grad():
        ref = flow.log_prob(y, c)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow.log_prob(y, c)
        z, logdet = flow(y, c)
        back = flow.inverse(z, c)
    assert out.dtype == z.dtype == logdet.dtype == torch.float32
    # the nets predicting the parameters ran in bf16: close to, not equal to, the float32 density ...
    torch.testing.assert_close(out, ref, rtol=0, atol=0.1 + 0.02 * float(ref.abs().max()))
    # ... but it is still the exact density of the bijection applied, which inverts exactly
    torch.testing.assert_close(out, -0.5 * z.square().sum(1) - 3 * math.log(2 * math.pi) + logdet, atol=1e-4, rtol=0)
    torch.testing.assert_close(back, y, atol=1e-4, rtol=0)


def test_training_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for model, c in [(build_density("flow", 4, 2, depth=2, hidden=8), rand(2, 2, 2, 2, 2)),
                     (build_density("gaussian", 4, 2), rand(2, 2, 2, 2, 2)),
                     (build_density("unconditional_gaussian", 4, 0), None)]:
        loss = -model.log_prob(rand(2, 4, 2, 2, 2, seed=9) * 3, c).mean()
        loss.backward()
        # zero-initialised last layers get gradients at the first step
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


# ---------------------------------------------------------------------------- fitting known conditional Gaussians
def known_conditional_gaussian(n: int, seed: int, diagonal: bool):
    """y | c ~ N(A c + b, L(c) L(c)^T) with c ~ N(0, I_2); positions as a batch of 1x1x1 grids.

    Returns y (n, 2, 1, 1, 1), c (n, 2, 1, 1, 1), true log-density (n, 1, 1, 1).
    """
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 2, generator=g)
    a, b = torch.tensor([[1.0, -0.5], [0.3, 0.8]]), torch.tensor([0.5, -1.0])
    tril = torch.zeros(n, 2, 2)
    tril[:, 0, 0] = torch.exp(0.3 * c[:, 0] - 0.5)
    tril[:, 1, 1] = torch.exp(-0.25 * c[:, 1] - 0.3)
    if not diagonal:
        tril[:, 1, 0] = 0.4
    mean = c @ a.T + b
    y = mean + (tril @ torch.randn(n, 2, 1, generator=g))[..., 0]
    true = MultivariateNormal(mean, scale_tril=tril).log_prob(y)
    grid = lambda t: t[:, :, None, None, None]  # noqa: E731
    return grid(y), grid(c), true.view(n, 1, 1, 1)


def fit(model, y, c, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = -model.log_prob(y, c).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("diagonal", [False, True])
def test_flow_recovers_a_known_conditional_gaussian(diagonal):
    y, c, _ = known_conditional_gaussian(12_000, seed=0, diagonal=diagonal)
    yt, ct, true = known_conditional_gaussian(2_000, seed=1, diagonal=diagonal)
    errors = {}
    for cond in (2, 0):
        torch.manual_seed(0)
        flow = build_density("flow", 2, cond, depth=2, hidden=16)
        fit(flow, y, c if cond else None, steps=200, lr=2e-2)
        with torch.no_grad():
            errors[cond] = float((flow.log_prob(yt, ct if cond else None) - true).abs().mean())
    assert errors[2] < 0.1, errors
    assert errors[0] > 5 * errors[2], errors  # the condition matters: an unconditional fit is far worse


def test_conditional_gaussian_recovers_a_known_diagonal_conditional_gaussian():
    y, c, _ = known_conditional_gaussian(8_000, seed=0, diagonal=True)
    yt, ct, true = known_conditional_gaussian(2_000, seed=1, diagonal=True)
    torch.manual_seed(0)
    # linear 3x3x3 heads: exactly the right family here (mean and log-variance linear in c)
    model = build_density("gaussian", 2, 2, hidden=0)
    fit(model, y, c, steps=200, lr=5e-2)
    uncond = build_density("unconditional_gaussian", 2, 0)
    fit(uncond, y, None, steps=200, lr=5e-2)
    with torch.no_grad():
        err = float((model.log_prob(yt, ct) - true).abs().mean())
        err_uncond = float((uncond.log_prob(yt) - true).abs().mean())
    assert err < 0.1 and err_uncond > 5 * err, (err, err_uncond)


# ---------------------------------------------------------------------------- construction and bad inputs
def test_configs_are_json_and_rebuild_the_same_architecture():
    models = [build_density("unconditional_gaussian", 8, 0), build_density("gaussian", 8, 4, hidden=8),
              build_density("flow", 8, 4, depth=3, hidden=32), build_density("flow", 8, 0, depth=2, hidden=8)]
    for m in models:
        cfg = json.loads(json.dumps(m.config))
        assert cfg["kind"] in DENSITY_KINDS and cfg["dim"] == 8
        kind, dim, cond = cfg.pop("kind"), cfg.pop("dim"), cfg.pop("cond_dim")
        again = build_density(kind, dim, cond, **cfg)
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert models[2].config["depth"] == 3 and models[2].config["hidden"] == 32


def test_unknown_kind_and_options():
    with pytest.raises(ConfigError) as e:
        build_density("mixture", 4, 0)
    assert "'mixture'" in str(e.value) and all(k in str(e.value) for k in DENSITY_KINDS)
    with pytest.raises(ConfigError, match="depth"):
        build_density("gaussian", 4, 2, depth=3)
    with pytest.raises(ConfigError, match="cond_dim=0"):
        build_density("gaussian", 4, 0)
    with pytest.raises(ConfigError, match="cond_dim=3"):
        build_density("unconditional_gaussian", 4, 3)
    with pytest.raises(ConfigError, match="dim=1"):
        build_density("flow", 1, 0)


@pytest.mark.parametrize("kind", ["gaussian", "flow"])
def test_bad_condition_inputs(kind):
    model = build_density(kind, 4, 3, **({"depth": 1, "hidden": 4} if kind == "flow" else {}))
    y = torch.zeros(2, 4, 3, 3, 2)
    cases = [
        (None, "None"),
        (torch.zeros(2, 5, 3, 3, 2), "5 channels"),
        (torch.zeros(2, 3, 3, 3, 3), "grid mismatch"),
        (torch.zeros(1, 3, 3, 3, 2), "grid mismatch"),
        (torch.zeros(2, 3, 3, 3), "4 dimensions"),
    ]
    for c, found in cases:
        with pytest.raises(InputError) as e:
            model.log_prob(y, c)
        assert found in str(e.value) and f"{kind} density" in str(e.value)
    with pytest.raises(InputError, match=r"found shape \(2, 6, 3, 3, 2\)"):
        model.log_prob(torch.zeros(2, 6, 3, 3, 2), torch.zeros(2, 3, 3, 3, 2))


@pytest.mark.parametrize("kind", ["unconditional_gaussian", "flow"])
def test_unexpected_condition_for_an_unconditional_model(kind):
    model = build_density(kind, 4, 0, **({"depth": 1, "hidden": 4} if kind == "flow" else {}))
    with pytest.raises(InputError, match=r"no condition.*found a condition of shape \(1, 2, 2, 2, 2\)"):
        model.log_prob(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2))
    with pytest.raises(InputError, match="shape=\\(B, x, y, z\\)"):
        model.sample()
