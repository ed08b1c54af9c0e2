"""Interactive exploration of a CT, its anomaly map(s) and the ground truth.

:func:`explore` shows one case with a threshold control and live Dice /
sensitivity. Two backends:

* ``"itk"``: itkwidgets 1.0 (3D rendering, tri-planar slicing). Its JavaScript
  is fetched from public CDNs and an IPFS gateway at view time, so it only
  renders with network access, and any call on it blocks a headless kernel.
  The CT is the image and the thresholded anomaly map is a label image
  (1 = lesion missed, 2 = above threshold outside the lesion, 3 = lesion
  detected); an ipywidgets slider re-thresholds it through
  ``viewer.set_label_image``. itk-vtk-viewer has no continuous overlay of a
  second scalar image on a label-free CT, hence labels rather than a heatmap.
* ``"offline"``: ipywidgets + a plotly ``FigureWidget`` (needs no network, works
  in JupyterLab, VS Code, Binder): three orthogonal slices with the anomaly
  heatmap above the threshold and the ground-truth outline, sliders for the
  slice positions and the threshold, a method dropdown when several maps are
  given, a "jump to region" dropdown (:func:`top_regions`) and a live text
  with Dice, sensitivity and the voxel count above threshold.

``backend="auto"`` picks itk only when (1) itkwidgets is installed (checked
without importing it: importing it patches the kernel), (2) we run in an
interactive Jupyter kernel (:func:`detect_interactive`) and (3) the viewer's
CDN hosts answer a TCP probe (:func:`network_available`, cached). Otherwise
the offline viewer. itkwidgets is imported only inside the itk branch.

Dice and sensitivity are computed here by :func:`dice_and_sensitivity`
(voxel-wise, a few lines of numpy) so the viewer does not depend on
``screener_nb.metrics``; the evaluation numbers of record come from that module.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, InputError
from . import plots

BACKENDS = ("auto", "itk", "offline")

#: hosts itkwidgets 1.0a55 loads its viewer from (used when the installed
#: package cannot be read); see itkwidgets/viewer_config.py
DEFAULT_VIEWER_HOSTS = (
    "cdn.jsdelivr.net",
    "bafybeieiqiiwvdq66e2bndws5nwojbe4wwerbxyua6u37axxivi2rwf7wy.ipfs.dweb.link",
)

#: itk label values of the thresholded overlay
ITK_LABEL_NAMES = [(1, "lesion missed"), (2, "above threshold"), (3, "lesion detected")]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# ----------------------------------------------------------------------------- metrics
def dice_and_sensitivity(anomaly_map, label, threshold: float, roi=None) -> dict:
    """Voxel-wise Dice and sensitivity of ``anomaly_map >= threshold`` against ``label > 0``.

    Args:
        anomaly_map: (X, Y, Z) scores.
        label: (X, Y, Z) ground truth (> 0 = lesion) or None.
        threshold: voxels with score >= threshold are flagged.
        roi: optional (X, Y, Z) bool mask; voxels outside count as neither.

    Returns:
        dict with ``dice`` (NaN when both prediction and label are empty: undefined, the rule
        of :func:`screener_nb.metrics.dice`, which raises there),
        ``sensitivity`` (NaN without lesion voxels), ``n_above``, ``n_label``,
        ``n_overlap`` (voxel counts). Without a label only ``n_above`` is meaningful
        (Dice and sensitivity are NaN).
    """
    m = np.asarray(anomaly_map)
    pred = m >= threshold
    if roi is not None:
        roi = np.asarray(roi, bool)
        pred &= roi
    n_above = int(np.count_nonzero(pred))
    if label is None:
        return dict(dice=float("nan"), sensitivity=float("nan"), n_above=n_above, n_label=0, n_overlap=0)
    gt = np.asarray(label) > 0
    if roi is not None:
        gt = gt & roi
    n_label = int(np.count_nonzero(gt))
    n_overlap = int(np.count_nonzero(pred & gt))
    denom = n_above + n_label
    dice = float("nan") if denom == 0 else 2.0 * n_overlap / denom
    sens = float("nan") if n_label == 0 else n_overlap / n_label
    return dict(dice=float(dice), sensitivity=float(sens), n_above=n_above, n_label=n_label, n_overlap=n_overlap)


def top_regions(anomaly_map, k: int = 5, threshold: float | None = None, roi=None,
                connectivity: int = 26, spacing=None) -> list[dict]:
    """The ``k`` connected regions above ``threshold`` with the highest peak score.

    Args:
        anomaly_map: (X, Y, Z) scores.
        k: how many regions to return (fewer if there are fewer).
        threshold: voxels with score >= threshold form regions; default the 99th
            percentile of the scores inside ``roi``.
        roi: optional (X, Y, Z) bool mask; voxels outside are never part of a region.
        connectivity: 6 (faces), 18 (faces + edges) or 26 (+ corners) neighbours.
        spacing: optional voxel size in mm, to report ``volume_ml``.

    Returns:
        list of dicts sorted by decreasing ``max`` (ties: larger first) with
        ``rank`` (1-based), ``center`` (the region's voxel nearest its centroid, so
        always inside the region: what ``viewer.goto`` wants), ``centroid`` (float
        voxel coordinates), ``peak`` (voxel of the maximum), ``size`` (voxels),
        ``max``, ``mean`` (scores) and ``volume_ml`` when ``spacing`` is given.
    """
    m = np.asarray(plots._as_array(anomaly_map, "top_regions(anomaly_map)", ndim=3))
    if connectivity not in (6, 18, 26):
        raise InputError("top_regions(connectivity)", "6, 18 or 26", repr(connectivity))
    mask = None
    if roi is not None:
        mask = np.asarray(roi, bool)
        if mask.shape != m.shape:
            raise InputError("top_regions(roi)", f"shape {m.shape} like the map", f"shape {mask.shape}")
    if threshold is None:
        vals = m[mask] if mask is not None else m
        threshold = float(np.quantile(vals[np.isfinite(vals)], 0.99)) if vals.size else np.inf
    fg = m >= threshold
    if mask is not None:
        fg &= mask
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    labels, n = ndimage.label(fg, structure=structure)
    if n == 0:
        return []
    # per-region statistics over the foreground voxels only (ndimage.maximum would
    # scan the whole volume, background included: seconds on a CT)
    flat_idx = np.flatnonzero(fg)
    lab = labels.reshape(-1)[flat_idx]
    vals = m.reshape(-1)[flat_idx].astype(np.float64)
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    sums = np.bincount(lab, weights=vals, minlength=n + 1)[1:]
    maxima = np.full(n + 1, -np.inf)
    np.maximum.at(maxima, lab, vals)
    maxima = maxima[1:]
    order = np.lexsort((-sizes, -maxima))[:k]  # primary: max desc, then size desc
    voxel_ml = float(np.prod(spacing)) / 1000.0 if spacing is not None else None
    out = []
    for rank, i in enumerate(order, start=1):
        sel = lab == i + 1
        coords = np.stack(np.unravel_index(flat_idx[sel], m.shape), axis=1)
        v = vals[sel]
        centroid = coords.mean(axis=0)
        center = coords[np.argmin(((coords - centroid) ** 2).sum(axis=1))]
        peak = coords[int(np.argmax(v))]
        r = dict(rank=rank, center=tuple(int(c) for c in center), centroid=tuple(float(c) for c in centroid),
                 peak=tuple(int(c) for c in peak), size=int(sizes[i]), max=float(maxima[i]),
                 mean=float(sums[i] / sizes[i]))
        if voxel_ml is not None:
            r["volume_ml"] = r["size"] * voxel_ml
        out.append(r)
    return out


# ----------------------------------------------------------------------------- backend choice
def itkwidgets_installed() -> bool:
    """Whether itkwidgets can be imported, checked WITHOUT importing it."""
    try:
        return importlib.util.find_spec("itkwidgets") is not None
    except (ImportError, ValueError):
        return False


def viewer_hosts() -> tuple[str, ...]:
    """CDN hosts the installed itkwidgets fetches its viewer from (read from its source, not imported)."""
    try:
        spec = importlib.util.find_spec("itkwidgets")
        if spec and spec.submodule_search_locations:
            text = (Path(list(spec.submodule_search_locations)[0]) / "viewer_config.py").read_text()
            hosts = tuple(dict.fromkeys(re.findall(r"https://([^/\"']+)", text)))
            if hosts:
                return hosts
    except (OSError, ImportError, ValueError):
        pass
    return DEFAULT_VIEWER_HOSTS


@functools.lru_cache(maxsize=8)
def _probe_hosts(hosts: tuple[str, ...], timeout: float) -> bool:
    """True when every host accepts a TCP connection on 443 within ``timeout`` seconds.

    Runs in daemon threads and waits at most ``timeout`` overall: a DNS lookup
    that hangs (air-gapped machines) cannot stall the notebook.
    """
    results: dict[str, bool] = {}

    def one(host: str) -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                results[host] = True
        except OSError:
            results[host] = False

    threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return all(results.get(h, False) for h in hosts)


def network_available(force: bool | None = None, *, timeout: float = 1.5,
                      hosts: tuple[str, ...] | None = None) -> bool:
    """Whether the itk viewer's CDN hosts are reachable (cached per process).

    ``force`` (or the environment variable ``SCREENER_VIEWER_NETWORK=0/1``)
    skips the probe.
    """
    if force is not None:
        return bool(force)
    env = os.environ.get("SCREENER_VIEWER_NETWORK", "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    return _probe_hosts(tuple(hosts or viewer_hosts()), float(timeout))


def _headless_env() -> bool:
    from ..runtime import headless

    return headless()


def detect_interactive() -> tuple[bool, str]:
    """Is a person looking at this kernel? Returns ``(answer, reason)``.

    No when ``SCREENER_HEADLESS`` is set (the runner sets it), when not inside a
    Jupyter kernel (plain Python, terminal IPython), or when the kernel was not
    started by a Jupyter server (papermill/nbclient kernels lack the
    ``JPY_SESSION_NAME`` variable that jupyter_server sets for the notebook it
    serves). Notebooks should still pass their ``interactive`` parameter.
    """
    if _headless_env():
        return False, "SCREENER_HEADLESS is set"
    try:
        from IPython import get_ipython
    except ImportError:
        return False, "IPython is not installed"
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False, "not running in a Jupyter kernel"
    if not os.environ.get("JPY_SESSION_NAME"):
        return False, "kernel not started by a Jupyter server (papermill / nbclient run)"
    return True, "Jupyter kernel served to a browser"


def choose_backend(backend: str = "auto", *, interactive: bool | None = None,
                   network: bool | None = None) -> tuple[str, str]:
    """Resolve ``backend`` to ``("itk" | "offline", reason)`` without importing itkwidgets.

    ``backend="itk"`` in a headless run falls back to offline with a warning
    (the itk viewer would block the kernel); ``"itk"`` without itkwidgets
    installed raises ImportError.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"explore(backend): expected one of {BACKENDS}, found {backend!r}")
    if backend == "offline":
        return "offline", "offline backend requested"
    if interactive is None or _headless_env():
        inter, why = detect_interactive()  # SCREENER_HEADLESS wins even over interactive=True: never block
    else:
        inter, why = bool(interactive), f"interactive={bool(interactive)}"
    if not inter:
        if backend == "itk":
            warnings.warn(f"explore: the itk viewer blocks headless kernels ({why}); "
                          "showing the offline viewer instead", RuntimeWarning, stacklevel=3)
        return "offline", f"headless ({why})"
    if not itkwidgets_installed():
        if backend == "itk":
            raise ImportError("explore(backend='itk') needs itkwidgets: pip install 'screener_nb[viewer]'")
        return "offline", "itkwidgets is not installed (pip install 'screener_nb[viewer]')"
    if backend == "itk":
        return "itk", "itk backend requested"
    if not network_available(network):
        return "offline", f"the itk viewer's CDN ({', '.join(viewer_hosts())}) is unreachable"
    return "itk", "itkwidgets installed, interactive kernel, CDN reachable"


# ----------------------------------------------------------------------------- inputs
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


# ----------------------------------------------------------------------------- offline backend
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


# ----------------------------------------------------------------------------- itk backend
def itk_overlay(anomaly_map, label, threshold: float, roi=None) -> np.ndarray:
    """uint8 label image for itkwidgets: 1 lesion missed, 2 above threshold (not lesion), 3 lesion detected."""
    above = np.asarray(anomaly_map) >= threshold
    if roi is not None:
        above &= np.asarray(roi, bool)
    out = above.astype(np.uint8) * 2
    if label is not None:
        out += (np.asarray(label) > 0).astype(np.uint8)
    return out


class ItkViewer(_ThresholdModel):
    """itkwidgets viewer plus ipywidgets threshold controls.

    Attributes: ``viewer`` (the itkwidgets Viewer), ``threshold_slider``,
    ``method_dropdown``, ``dice_label``, ``state``, ``widget`` (the controls).
    Displays as its controls; the itk viewer displays itself when created.
    """

    def __init__(self, image, maps, label=None, spacing=(1.0, 1.0, 1.0), roi=None, threshold=None,
                 title=None, *, center=None, n_regions: int = 10):
        import ipywidgets as w

        super().__init__(image, maps, label, spacing, roi, threshold, title, n_regions)
        import itkwidgets  # lazy: importing it patches the kernel's execute handler
        from ngff_zarr import to_ngff_image

        def ngff(a, name):
            # itk images are indexed (z, y, x): transpose our (X, Y, Z) arrays
            return to_ngff_image(np.ascontiguousarray(np.transpose(a)), dims=("z", "y", "x"),
                                 scale=dict(zip("xyz", spacing)), translation={"x": 0.0, "y": 0.0, "z": 0.0},
                                 name=name)

        self._ngff = ngff
        self.state["center"] = plots._center(image.shape, center)
        kwargs: dict[str, Any] = dict(image=ngff(np.asarray(image, np.float32), "CT"), ui_collapsed=False)
        ov = self._overlay()
        if ov is not None:
            kwargs.update(label_image=ngff(ov, "overlay"), label_names=ITK_LABEL_NAMES, label_blend=0.6)
        kwargs.update(zip(("x_slice", "y_slice", "z_slice"), self._world(self.state["center"])))
        self.viewer = itkwidgets.view(**kwargs)
        self._compute()
        self.widget = w.VBox([w.HBox([self.threshold_slider, self.method_dropdown]), self.dice_label])
        self.widget.add_class("screener-viewer")

    def _world(self, center):
        return [float(c * s) for c, s in zip(center, self.spacing)]

    def _overlay(self):
        if self.anomaly_map is None and self.label is None:
            return None
        if self.anomaly_map is None:
            return (np.asarray(self.label) > 0).astype(np.uint8)
        return itk_overlay(self.anomaly_map, self.label, self.state["threshold"], self.roi)

    def _threshold_changed(self) -> None:
        if hasattr(self, "viewer"):
            self.viewer.set_label_image(self._ngff(self._overlay(), "overlay"))

    def goto(self, center) -> None:
        """Move the slicing planes to voxel ``center`` (world position = index * spacing)."""
        c = plots._center(self.image.shape, center)
        self.state["center"] = c
        x, y, z = self._world(c)
        self.viewer.set_x_slice(x)
        self.viewer.set_y_slice(y)
        self.viewer.set_z_slice(z)


# ----------------------------------------------------------------------------- entry point
def explore(case_or_run=None, anomaly_map=None, label=None, spacing=None, *, backend: str = "auto",
            threshold: float | None = None, interactive: bool | None = None,
            methods: Mapping[str, Any] | None = None, title: str | None = None, roi=None,
            center=None, case: str | None = None, network: bool | None = None,
            loader: Callable[..., Any] | None = None, **viewer_kwargs):
    """Explore a CT with its anomaly map(s) and ground truth, interactively.

    Args:
        case_or_run: (X, Y, Z) CT array or ``Volume``; or a case object with
            ``.image`` and optionally ``.anomaly_map``, ``.anomaly_maps`` (dict),
            ``.label``, ``.spacing``, ``.body`` (used as ``roi``), ``.id``; or a
            path to a run / eval folder, read by ``loader`` (``case`` names the case).
        anomaly_map: (X, Y, Z) scores (higher = more anomalous), listed as "anomaly map".
        label: (X, Y, Z) ground truth, > 0 = lesion.
        spacing: voxel size in mm (X, Y, Z); default from the input, else 1 mm.
        backend: "auto" | "itk" | "offline" (module docstring).
        threshold: initial threshold; default the 99th percentile of the map in the roi.
        interactive: whether a person is watching; None detects it
            (:func:`detect_interactive`). Headless runs never get the itk viewer.
        methods: optional dict name -> (X, Y, Z) map, to switch between methods
            (the threshold keeps the same fraction of flagged voxels).
        roi: (X, Y, Z) bool mask for Dice/regions (e.g. the body mask).
        center: initial voxel (i, j, k) of the slices.
        network: force the CDN probe result (None probes; env SCREENER_VIEWER_NETWORK=0/1).
        loader: ``loader(path, case)`` -> an object with ``.image`` and optionally
            ``.anomaly_map`` / ``.anomaly_maps`` / ``.label`` / ``.spacing`` / ``.body``, for a
            path ``case_or_run``; default :func:`screener_nb.results.load_case_maps` (the maps
            the evaluation stage stored in the run).
        viewer_kwargs: passed to :class:`OfflineViewer` (window, overlay_opacity,
            radiological, height, n_regions).

    Returns:
        an :class:`OfflineViewer` or :class:`ItkViewer`; put it last in a cell to
        display it. ``.backend`` and ``.backend_reason`` say which and why.
    """
    image, maps, label, spacing, roi, hint = _normalize_inputs(
        case_or_run, anomaly_map, label, spacing, methods, roi, case, loader)
    title = title if title is not None else hint
    chosen, reason = choose_backend(backend, interactive=interactive, network=network)
    if chosen == "itk":
        viewer: _ThresholdModel = ItkViewer(image, maps, label, spacing, roi, threshold, title, center=center)
    else:
        viewer = OfflineViewer(image, maps, label, spacing, roi, threshold, title, center=center, **viewer_kwargs)
    viewer.backend, viewer.backend_reason = chosen, reason
    return viewer
