"""The "click a voxel in scan A, see where it is in scan B" figure of notebook 02."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .live import headless


class CorrespondenceExplorer:
    """Axial slice of scan A with a chosen voxel, and the cosine-similarity map of
    its descriptor over scan B (best match marked). Interactive: click scan A."""

    def __init__(self, case_a, features_a, case_b, features_b, similarity: Callable, voxel=None):
        self.a, self.fa, self.b, self.fb, self.similarity = case_a, features_a, case_b, features_b, similarity
        body = np.argwhere(np.asarray(case_a.body))
        self.voxel = tuple(int(v) for v in (voxel if voxel is not None else body.mean(0).round()))

    def _compute(self):
        sim = self.similarity(self.fa, self.voxel, self.fb)
        sim = np.where(np.asarray(self.b.body), sim, np.nan)
        best = np.unravel_index(np.nanargmax(sim), sim.shape)
        return sim, tuple(int(v) for v in best)

    def figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        sim, best = self._compute()
        za, zb = self.voxel[2], best[2]
        fig = make_subplots(1, 2, subplot_titles=(f"scan A ({self.a.id}), voxel {self.voxel}",
                                                  f"scan B ({self.b.id}), best match {best}"))
        fig.add_trace(go.Heatmap(z=np.asarray(self.a.image)[:, :, za].T, colorscale="gray", showscale=False), 1, 1)
        fig.add_trace(go.Scatter(x=[self.voxel[0]], y=[self.voxel[1]], mode="markers",
                                 marker=dict(symbol="x", size=12, color="red"), showlegend=False), 1, 1)
        fig.add_trace(go.Heatmap(z=np.asarray(self.b.image)[:, :, zb].T, colorscale="gray", showscale=False), 1, 2)
        fig.add_trace(go.Heatmap(z=sim[:, :, zb].T, colorscale="Hot", opacity=0.55, zmin=0, zmax=1,
                                 colorbar=dict(title="cosine")), 1, 2)
        fig.add_trace(go.Scatter(x=[best[0]], y=[best[1]], mode="markers",
                                 marker=dict(symbol="circle-open", size=14, color="cyan", line=dict(width=2)),
                                 showlegend=False), 1, 2)
        fig.update_yaxes(autorange="reversed", scaleanchor="x")
        fig.update_layout(height=420, title="descriptor similarity between two different scans")
        if headless():
            return fig
        widget = go.FigureWidget(fig)

        def on_click(trace, points, _state):
            if points.xs:
                self.voxel = (int(points.xs[0]), int(points.ys[0]), self.voxel[2])
                new = self.figure()
                with widget.batch_update():
                    for t_old, t_new in zip(widget.data, new.data):
                        t_old.update(t_new)

        widget.data[0].on_click(on_click)
        return widget
