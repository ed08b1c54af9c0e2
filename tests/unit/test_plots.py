"""Figures of screener_nb.viz.plots that the notebooks call: what they plot, against scipy."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from screener_nb.errors import InputError
from screener_nb.viz import plots as P


def test_score_scatter_keeps_every_lesion_voxel_and_reports_pearson():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20_000)
    y = 0.8 * x + rng.normal(scale=0.5, size=x.size)
    lesion = np.zeros(x.size, bool)
    lesion[rng.choice(x.size, 40, replace=False)] = True
    fig = P.score_scatter(x, y, lesion, n_normal=1000, title="case")
    normal, red, diagonal = fig.data
    assert len(red.x) == 40 and set(np.round(red.x, 12)) == set(np.round(x[lesion], 12))
    assert len(normal.x) + len(red.x) <= 1040
    plotted_x = np.r_[normal.x, red.x]
    plotted_y = np.r_[normal.y, red.y]
    r = stats.pearsonr(plotted_x, plotted_y).statistic
    assert f"r = {r:.3f}" in fig.layout.title.text
    assert list(diagonal.x) == [plotted_x.min(), plotted_x.max()] == list(diagonal.y)
    with pytest.raises(InputError, match="one length"):
        P.score_scatter(x, y[:-1], lesion)


def test_grouped_bars_one_bar_per_series_and_case():
    fig = P.grouped_bars({"distilled": {"a": 0.5, "b": 0.25}, "random": {"a": 0.1, "b": 0.0}},
                         labels={"a": "a (fold 0)"}, y_range=(0, 1))
    assert [t.name for t in fig.data] == ["distilled", "random"]
    assert list(fig.data[0].x) == ["a (fold 0)", "b"] and list(fig.data[1].y) == [0.1, 0.0]
    assert fig.layout.barmode == "group" and tuple(fig.layout.yaxis.range) == (0, 1)
    with pytest.raises(InputError, match="series"):
        P.grouped_bars({})
