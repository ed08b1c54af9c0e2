"""Fitting several density models side by side equals fitting each on its own."""
import numpy as np
import pytest
import torch

from screener_nb.density_fit import DensityEnsemble
from screener_nb.models.density import build_density
from screener_nb.train import TrainSettings, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, C, GRID = 4, 3, (4, 4, 2)


def features(rng: np.random.Generator) -> dict:
    """A correlated (y, c) pair on a small grid, as the frozen encoders would give."""
    c = rng.normal(size=(C, *GRID)).astype(np.float32)
    y = np.concatenate([c[:1] * 2.0 + 1.0, c[1:] - 0.5, rng.normal(size=(D - C + 1, *GRID))]).astype(np.float32)
    return {"y": y[:D], "c": c}


def models() -> dict:
    out = {}
    for name, kind, cond, kw in [("a-gaussian", "gaussian", C, {}), ("b-flow", "flow", C, {"depth": 2, "hidden": 8}),
                                 ("c-gaussian", "unconditional_gaussian", 0, {})]:
        torch.manual_seed(0)
        out[name] = build_density(kind, D, cond, **kw)
    return out


class EnsembleTask:
    def sample(self, rng):
        return features(rng)

    def loss(self, model, batch):
        ys = {n: batch["y"] for n in model.densities}
        cs = {n: (batch["c"] if model.densities[n].cond_dim else None) for n in model.densities}
        nll = {n: -lp.mean() for n, lp in model(ys, cs).items()}
        return sum(nll.values()), {}


class SingleTask:
    def sample(self, rng):
        return features(rng)

    def loss(self, model, batch):
        return -model.log_prob(batch["y"], batch["c"] if model.cond_dim else None).mean(), {}


def test_ensemble_fit_equals_separate_fits(tmp_path):
    # a tight clip so that clipping is active: one global clip over all models would differ
    settings = TrainSettings(steps=12, batch=3, lr=1e-2, warmup=2, grad_clip=0.05, checkpoint_every=100,
                             log_every=4, device="cpu", amp=False)
    together = DensityEnsemble(models(), {})
    fit(together, EnsembleTask(), settings, tmp_path / "joint")
    for name, single in models().items():
        fit(single, SingleTask(), settings, tmp_path / name)
        for (k, a), (_, b) in zip(together.densities[name].state_dict().items(), single.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
    # and training moved the weights (the comparison is not between two untouched models)
    fresh = models()["b-flow"].state_dict()
    assert any(not torch.allclose(fresh[k], v) for k, v in together.densities["b-flow"].state_dict().items())
