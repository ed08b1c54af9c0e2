"""The offline viewer: ipywidgets + a plotly FigureWidget, no network needed (JupyterLab, VS Code, Binder)."""
from __future__ import annotations

import functools

import numpy as np

from . import plots
from .viewer_base import _ThresholdModel


class OfflineViewer(_ThresholdModel):
    """ipywidgets + plotly viewer that needs no network.

    Attributes (to drive it from code or tests):
        widget: the ``ipywidgets.VBox`` displayed (the object itself displays as it).
        figure: the ``plotly.graph_objects.FigureWidget`` with the three panels.
        traces: ``traces[plane][layer]`` -> index into ``figure.data``.
        x_slider, y_slider, z_slider (also ``sliders["x"]``...): slice positions (voxels).
        threshold_slider, method_dropdown, region_dropdown, dice_label: controls.
        state: dict with method, threshold, center, dice, sensitivity, n_above, n_label, n_overlap.
    """

    _REGION_PROMPT = "jump to a region (largest scores first)..."

    def __init__(self, image, maps, label=None, spacing=(1.0, 1.0, 1.0), roi=None, threshold=None,
                 title=None, *, center=None, window=None, overlay_opacity: float = 0.55,
                 radiological: bool = True, n_regions: int = 10, height: int = 420,
                 overlay_colorscale: str = "Hot"):
        import ipywidgets as w
        import plotly.graph_objects as go

        super().__init__(image, maps, label, spacing, roi, threshold, title, n_regions)
        c = plots._center(image.shape, center)
        self.state["center"] = c
        self.window = tuple(window) if window is not None else plots.robust_range(image)
        self.overlay_colorscale = overlay_colorscale
        amap = self.anomaly_map
        self._drawn_method = self.state["method"]
        fig, self.traces = plots.build_orthogonal(
            image, amap, label, c, spacing, window=self.window, overlay_threshold=self.state["threshold"],
            overlay_range=self._overlay_range(), overlay_opacity=overlay_opacity, title=title,
            overlay_colorscale=overlay_colorscale,
            radiological=radiological, height=height)
        self._shape = image.shape
        self._axis_ranges = {p: plots._axis_ranges(image.shape, spacing, p, radiological) for p in plots.PLANES}
        self.figure = go.FigureWidget(fig)
        self.sliders = {}
        # live updates while dragging only when a slice is small enough to travel quickly
        live = max(a * b for a, b in ((image.shape[0], image.shape[1]), (image.shape[0], image.shape[2]),
                                      (image.shape[1], image.shape[2]))) <= 256 * 256
        for ax, n in zip("xyz", image.shape):
            s = w.IntSlider(value=c["xyz".index(ax)], min=0, max=n - 1, description=f"{ax} slice",
                            continuous_update=live, layout=w.Layout(width="320px"),
                            style={"description_width": "60px"})
            s.add_class(f"screener-slice-{ax}")
            s.observe(functools.partial(self._on_slice, ax), names="value")
            self.sliders[ax] = s
        self.x_slider, self.y_slider, self.z_slider = (self.sliders[a] for a in "xyz")
        self.region_dropdown = w.Dropdown(options=[(self._REGION_PROMPT, 0)], value=0, description="regions",
                                          style={"description_width": "80px"}, layout=w.Layout(width="480px"))
        self.region_dropdown.add_class("screener-regions")
        self.region_dropdown.observe(self._on_region, names="value")
        if amap is None:
            self.region_dropdown.layout.display = "none"
        self._compute()
        self._refresh_regions()
        self.widget = w.VBox([
            w.HBox([self.x_slider, self.y_slider, self.z_slider]),
            w.HBox([self.threshold_slider, self.method_dropdown]),
            self.region_dropdown,
            self.dice_label,
            self.figure,
        ])
        self.widget.add_class("screener-viewer")

    def _overlay_range(self):
        name = self.state["method"]
        if name is None:
            return None
        lo, hi = self.threshold_slider.min, self.threshold_slider.max
        hi = max(hi, lo + 1e-6)
        # zmin just below the slider's minimum: scores under zmin are clamped to zmin's colour,
        # which must be the transparent one at every threshold the slider allows
        return lo - 1e-3 * (hi - lo), hi

    # -- drawing ---------------------------------------------------------------
    def _draw_plane(self, plane: str) -> None:
        fixed = plots.PLANE_AXES[plane][0]
        k = self.state["center"][fixed]
        t = self.traces[plane]
        d = self.figure.data
        d[t["image"]].z = plots._display_values(plots.plane_slice(self.image, plane, k), self.window)
        if "overlay" in t:
            d[t["overlay"]].z = plots._display_values(plots.plane_slice(self.anomaly_map, plane, k),
                                                      self._overlay_range())
        if "label" in t:
            d[t["label"]].z = (plots.plane_slice(self.label, plane, k) > 0).astype(np.uint8)
        self.figure.layout.annotations[plots.PLANES.index(plane)].text = plots.panel_title(plane, self.state["center"])

    def _draw_crosshairs(self) -> None:
        for plane, idx in self.traces["crosshair"].items():
            hr, vr = self._axis_ranges[plane]
            for i, (xs, ys) in zip(idx, plots._crosshair_xy(self.state["center"], self.spacing, plane, hr, vr)):
                self.figure.data[i].x, self.figure.data[i].y = xs, ys

    def _draw_overlays(self, data: bool = False) -> None:
        """Re-threshold the overlays (only colour stops travel); ``data=True`` also resends the slices."""
        rng = self._overlay_range()
        cs = plots.threshold_colorscale(self.overlay_colorscale, *rng, self.state["threshold"])
        for plane in plots.PLANES:
            t = self.traces[plane]
            if "overlay" in t:
                tr = self.figure.data[t["overlay"]]
                if data:
                    k = self.state["center"][plots.PLANE_AXES[plane][0]]
                    tr.z = plots._display_values(plots.plane_slice(self.anomaly_map, plane, k), rng)
                    tr.zmin, tr.zmax = rng
                tr.colorscale = cs

    def _on_slice(self, axis: str, change) -> None:
        c = list(self.state["center"])
        c["xyz".index(axis)] = int(change["new"])
        self.state["center"] = tuple(c)
        plane = {"x": "sagittal", "y": "coronal", "z": "axial"}[axis]
        with self.figure.batch_update():
            self._draw_plane(plane)
            self._draw_crosshairs()

    def _threshold_changed(self) -> None:
        if not hasattr(self, "figure"):
            return
        with self.figure.batch_update():
            self._draw_overlays(data=self._drawn_method != self.state["method"])
        self._drawn_method = self.state["method"]
        self._refresh_regions()

    def overlay_cutoff(self, plane: str = "axial") -> float:
        """Score below which the displayed overlay of ``plane`` is transparent."""
        tr = self.figure.data[self.traces[plane]["overlay"]]
        return tr.zmin + plots.overlay_colorscale_cutoff(tr.colorscale) * (tr.zmax - tr.zmin)

    def _refresh_regions(self) -> None:
        self.regions = self.top_regions()
        opts = [(self._REGION_PROMPT, 0)]
        for r in self.regions:
            ml = f", {r['volume_ml']:.2f} ml" if "volume_ml" in r else ""
            opts.append((f"#{r['rank']}: max {r['max']:.4g}, mean {r['mean']:.4g}, {r['size']:,} vox{ml} "
                         f"at {r['center']}", r["rank"]))
        self.region_dropdown.options = opts
        self.region_dropdown.value = 0

    def _on_region(self, change) -> None:
        if change["new"]:  # 0 is the prompt
            self.goto(self.regions[change["new"] - 1]["center"])

    # -- public ----------------------------------------------------------------
    def goto(self, center) -> None:
        """Move the three slice sliders to voxel ``center`` = (i, j, k) (clamped)."""
        c = plots._center(self._shape, center)
        for ax, v in zip("xyz", c):
            self.sliders[ax].value = int(v)

    def displayed_slice(self, plane: str, layer: str = "image") -> np.ndarray:
        """The 2D array currently in the figure for ``plane``/``layer`` (rows = screen vertical)."""
        return np.asarray(self.figure.data[self.traces[plane][layer]].z)
