"""Live training curves and the correspondence figure: headless and interactive behaviour."""
from __future__ import annotations

import types

import numpy as np
import pytest


def test_live_curve_is_inert_headless(monkeypatch):
    from screener_nb.viz.live import LiveCurve

    monkeypatch.setenv("SCREENER_HEADLESS", "1")
    curve = LiveCurve(["loss"])
    assert curve.widget is None
    curve.update({"step": 1, "loss": 2.0})  # nothing to draw, no error
    curve.show()


def test_live_curve_grows_with_positive_values(monkeypatch):
    from screener_nb.viz.live import LiveCurve

    monkeypatch.setenv("SCREENER_HEADLESS", "0")
    curve = LiveCurve(["loss", "lr"])
    rows = [{"step": 1, "loss": 3.0, "lr": 0.1}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": -1.0, "lr": 0.05}]
    for r in rows:
        curve.update(r)
    loss, lr = curve.widget.data
    assert list(loss.x) == [1, 2] and list(loss.y) == [3.0, 2.0]  # a log axis: non-positive values are left out
    assert list(lr.x) == [1, 3] and list(lr.y) == [0.1, 0.05]


def _case(name, shape, rng):
    body = np.zeros(shape, bool)
    body[1:-1, 1:-1, 1:-1] = True
    return types.SimpleNamespace(id=name, image=rng.random(shape), body=body)


@pytest.mark.parametrize("headless", ["1", "0"])
def test_correspondence_marks_the_best_match_inside_scan_b(monkeypatch, headless):
    import plotly.graph_objects as go

    from screener_nb.ssl.quality import similarity_map
    from screener_nb.viz.correspondence import CorrespondenceExplorer

    import torch

    monkeypatch.setenv("SCREENER_HEADLESS", headless)
    rng = np.random.default_rng(0)
    a, b = _case("a", (6, 6, 5), rng), _case("b", (7, 6, 5), rng)
    fa, fb = torch.tensor(rng.normal(size=(4, 6, 6, 5))), torch.tensor(rng.normal(size=(4, 7, 6, 5)))
    fb[:, 0, 0, 0] = fa[:, 2, 3, 2] * 5  # the most similar voxel of B, but outside its body
    ex = CorrespondenceExplorer(a, fa, b, fb, similarity_map, voxel=(2, 3, 2))
    sim, best = ex._compute()
    q = fa[:, 2, 3, 2].numpy()
    cos = np.einsum("d,dxyz->xyz", q, fb.numpy()) / (np.linalg.norm(q) * np.linalg.norm(fb.numpy(), axis=0))
    cos[~b.body] = -np.inf
    assert best == tuple(int(v) for v in np.unravel_index(np.argmax(cos), cos.shape))
    assert np.isnan(sim[0, 0, 0])
    fig = ex.figure()
    assert isinstance(fig, go.FigureWidget) == (headless == "0")
    marker = fig.data[-1]
    assert (marker.x[0], marker.y[0]) == best[:2]
