"""Live training curves: a plotly FigureWidget fed by the training loop's callback.

Interactive sessions see the curve grow; headless runs (papermill, the runner,
``SCREENER_HEADLESS=1``) skip the widget and plot the saved log afterwards.
"""
from __future__ import annotations

from ..runtime import headless


class LiveCurve:
    """``LiveCurve(["loss"]).show()`` then pass ``.update`` as ``fit(callback=...)``."""

    def __init__(self, keys: list[str], title: str = "training", x: str = "step"):
        self.keys, self.x, self.title = list(keys), x, title
        self.widget = None
        if not headless():
            import plotly.graph_objects as go

            self.widget = go.FigureWidget(
                data=[go.Scatter(x=[], y=[], mode="lines", name=k) for k in self.keys],
                layout=dict(title=title, xaxis_title=x, yaxis_type="log", height=320))

    def show(self):
        if self.widget is not None:
            from IPython.display import display

            display(self.widget)

    def update(self, row: dict, *_) -> None:
        if self.widget is None:
            return
        with self.widget.batch_update():
            for trace, key in zip(self.widget.data, self.keys):
                if key in row and row[key] > 0:
                    trace.x = (*trace.x, row[self.x])
                    trace.y = (*trace.y, row[key])
