"""What both viewers share: the inputs they accept and the threshold state with its readouts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from . import plots
from .regions import dice_and_sensitivity, top_regions


def _unwrap(a):
    return getattr(a, "array", a) if a is not None and not isinstance(a, np.ndarray) else a


def _normalize_inputs(case_or_run, anomaly_map, label, spacing, methods, roi, case, loader=None):
    """-> (image, maps dict, label|None, spacing, roi|None, title hint)."""
    hint = None
    if isinstance(case_or_run, (str, Path)):
        if loader is None:  # default: the maps the evaluation stage (notebook 06) stored in the run
            from ..results import load_case_maps as loader
        case_or_run = loader(Path(case_or_run), case)
    if case_or_run is None:
        raise InputError("explore(image)", "an (X, Y, Z) array, a Volume or a case object", "None")
    if hasattr(case_or_run, "image"):  # duck-typed case (PreprocessedCase, phantom case, ...)
        obj = case_or_run
        image = obj.image
        if anomaly_map is None:
            anomaly_map = getattr(obj, "anomaly_map", None)
        if methods is None:
            methods = getattr(obj, "anomaly_maps", None)
        label = label if label is not None else getattr(obj, "label", None)
        spacing = spacing if spacing is not None else getattr(obj, "spacing", None)
        roi = roi if roi is not None else getattr(obj, "body", None)
        hint = getattr(obj, "id", None)
    else:
        image = case_or_run
    if spacing is None:
        spacing = getattr(image, "spacing", None) or (1.0, 1.0, 1.0)
    image = plots._as_array(_unwrap(image), "explore(image)", ndim=3)
    spacing = plots._as_spacing(spacing, "explore(spacing)")
    maps: dict[str, np.ndarray] = {}
    if anomaly_map is not None:
        maps["anomaly map"] = plots._as_array(_unwrap(anomaly_map), "explore(anomaly_map)", ndim=3)
    for name, m in (methods or {}).items():
        maps[str(name)] = plots._as_array(_unwrap(m), f"explore(methods[{name!r}])", ndim=3)
    for name, m in maps.items():
        if m.shape != image.shape:
            raise InputError(f"explore(anomaly map {name!r})", f"shape {image.shape} like the image",
                             f"shape {m.shape}")
    if label is not None:
        label = plots._as_array(_unwrap(label), "explore(label)", ndim=3)
        if label.shape != image.shape:
            raise InputError("explore(label)", f"shape {image.shape} like the image", f"shape {label.shape}")
    if roi is not None:
        roi = plots._as_array(_unwrap(roi), "explore(roi)", ndim=3).astype(bool, copy=False)
        if roi.shape != image.shape:
            raise InputError("explore(roi)", f"shape {image.shape} like the image", f"shape {roi.shape}")
    return image, maps, label, spacing, roi, hint


# ----------------------------------------------------------------------------- shared controls
class _ThresholdModel:
    """Threshold / method state and the widgets every backend shares."""

    #: quantiles of the map (inside the roi) spanned by the threshold slider
    slider_quantiles = (0.5, 1.0)
    #: default threshold quantile when none is given
    default_quantile = 0.99
    slider_steps = 500

    def __init__(self, image, maps, label, spacing, roi, threshold, title, n_regions):
        import ipywidgets as w

        self.image, self.maps, self.label, self.spacing, self.roi = image, maps, label, spacing, roi
        self.title = title
        self.n_regions = n_regions
        self._samples: dict[str, np.ndarray] = {}
        self._quiet = False
        self.regions: list[dict] = []
        names = list(maps)
        self.state: dict[str, Any] = dict(method=names[0] if names else None, threshold=None,
                                          center=tuple(int(s) // 2 for s in image.shape),
                                          dice=float("nan"), sensitivity=float("nan"), n_above=0,
                                          n_label=0, n_overlap=0)
        self.threshold_slider = w.FloatSlider(description="threshold", continuous_update=False,
                                              readout_format=".4g", layout=w.Layout(width="480px"),
                                              style={"description_width": "80px"})
        self.threshold_slider.add_class("screener-threshold")
        self.method_dropdown = w.Dropdown(options=names, description="method",
                                          style={"description_width": "80px"})
        self.method_dropdown.add_class("screener-method")
        if len(names) < 2:
            self.method_dropdown.layout.display = "none"
        if not names:
            self.threshold_slider.layout.display = "none"
        self.dice_label = w.HTML()
        self.dice_label.add_class("screener-dice")
        if names:
            self._configure_slider(names[0], threshold)
        self.threshold_slider.observe(self._on_threshold, names="value")
        self.method_dropdown.observe(self._on_method, names="value")

    # -- numbers ---------------------------------------------------------------
    def _sorted_sample(self, name: str) -> np.ndarray:
        """Sorted subsample of the map inside the roi (for quantiles), cached."""
        if name not in self._samples:
            m = self.maps[name]
            v = m[self.roi] if self.roi is not None else np.asarray(m).reshape(-1)
            if v.size > 1_000_000:
                v = v[:: int(np.ceil(v.size / 1_000_000))]
            v = np.sort(v[np.isfinite(v)].astype(np.float64))
            self._samples[name] = v if v.size else np.array([0.0, 1.0])
        return self._samples[name]

    def _quantile(self, name: str, q: float) -> float:
        v = self._sorted_sample(name)
        return float(np.quantile(v, q))

    def _rank(self, name: str, thr: float) -> float:
        v = self._sorted_sample(name)
        return float(np.searchsorted(v, thr, side="left") / v.size)

    def _configure_slider(self, name: str, threshold: float | None) -> None:
        lo, hi = (self._quantile(name, q) for q in self.slider_quantiles)
        if threshold is None:
            threshold = self._quantile(name, self.default_quantile)
        lo, hi = min(lo, float(threshold)), max(hi, float(threshold))
        if hi <= lo:
            hi = lo + 1.0
        s = self.threshold_slider
        self._quiet = True  # the clamping below must not trigger recomputations
        try:
            # order matters: ipywidgets refuses min > max and clamps the value
            s.max = max(hi, s.max)
            s.min = lo
            s.max = hi
            s.step = (hi - lo) / self.slider_steps
            s.value = float(threshold)
        finally:
            self._quiet = False
        self.state["threshold"] = float(s.value)

    def _compute(self) -> None:
        name = self.state["method"]
        if name is None:
            self.dice_label.value = "<i>no anomaly map given</i>"
            return
        r = dice_and_sensitivity(self.maps[name], self.label, self.state["threshold"], self.roi)
        self.state.update(r)
        self.dice_label.value = self.describe()

    def describe(self) -> str:
        """The text of :attr:`dice_label` (HTML) for the current state."""
        st = self.state
        ml = st["n_above"] * float(np.prod(self.spacing)) / 1000.0
        above = f"{st['n_above']:,} voxels above ({ml:.2f} ml)"
        head = f"<b>{st['method']}</b> &ge; {st['threshold']:.4g}"
        if self.label is None:
            return f"{head}: {above} &middot; no ground truth"
        sens = "n/a" if np.isnan(st["sensitivity"]) else f"{st['sensitivity']:.3f}"
        dice = "undefined (no lesion, nothing flagged)" if np.isnan(st["dice"]) else f"{st['dice']:.3f}"
        return f"{head}: Dice {dice} &middot; sensitivity {sens} &middot; {above}"

    # -- events ----------------------------------------------------------------
    def _on_threshold(self, change) -> None:
        self.state["threshold"] = float(change["new"])
        if self._quiet:
            return
        self._compute()
        self._threshold_changed()

    def _on_method(self, change) -> None:
        old, new = change["old"], change["new"]
        if new is None or new == old:
            return
        # keep the same fraction of flagged voxels when switching maps
        q = self._rank(old, self.state["threshold"]) if old is not None else self.default_quantile
        self.state["method"] = new
        self._configure_slider(new, self._quantile(new, min(max(q, 0.0), 1.0)))
        self._compute()
        self._threshold_changed()

    def _threshold_changed(self) -> None:  # backends redraw here
        pass

    # -- public ----------------------------------------------------------------
    def set_threshold(self, value: float) -> None:
        """Move the threshold slider (clamped to its range), as a user would."""
        self.threshold_slider.value = float(value)

    def set_method(self, name: str) -> None:
        if name not in self.maps:
            raise InputError("set_method", f"one of {list(self.maps)}", repr(name))
        self.method_dropdown.value = name

    @property
    def anomaly_map(self) -> np.ndarray | None:
        return self.maps.get(self.state["method"]) if self.state["method"] else None

    def top_regions(self, k: int | None = None, **kw) -> list[dict]:
        """:func:`top_regions` of the current map at the current threshold."""
        if self.anomaly_map is None:
            return []
        kw.setdefault("roi", self.roi)
        return top_regions(self.anomaly_map, k or self.n_regions, self.state["threshold"],
                           spacing=self.spacing, **kw)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
