"""Plotly figure builders shared by every notebook.

Inputs are plain numpy arrays: volumes are ``(X, Y, Z)`` (RGB volumes
``(X, Y, Z, 3)``), voxel spacing is in mm along X, Y, Z, and slice positions are
voxel indices. Nothing here reads files or knows about runs: notebooks load
the data and pass arrays, so every figure can also be built from a test.

Display convention (radiological)
---------------------------------
The arrays are assumed to be in canonical RAS+ orientation (the preprocessed
format: +X toward the patient's Right, +Y Anterior, +Z Superior). Panels are
drawn as a radiologist reads them:

* axial (plane Z = k): horizontal = X with the patient's right on the screen's
  left, vertical = Y with anterior at the top (seen from the feet);
* coronal (plane Y = j): horizontal = X, patient's right on the left,
  superior at the top (seen from the front);
* sagittal (plane X = i): horizontal = Y with anterior on the left, superior
  at the top (seen from the patient's left).

So in every panel the horizontal axis is reversed and the vertical axis
points up. Axes are in mm from the centre of voxel 0 (``index * spacing``),
which gives each panel its true aspect ratio (1 mm = 1 mm on screen) even with
anisotropic voxels. Pass ``radiological=False`` to draw index order instead
(horizontal axes not reversed), e.g. for arrays that are not RAS.

Static export: :func:`to_html` writes one self-contained HTML file (plotly.js
embedded, opens without network); :func:`save_png` uses kaleido (which needs a
Chromium) and falls back to HTML with a message when it cannot.
"""
from __future__ import annotations

import html as _html
import json
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import InputError
from ..files import atomic_path, write_text

PLANES = ("axial", "coronal", "sagittal")

#: plane -> (fixed axis, horizontal axis, vertical axis) of an (X, Y, Z) array
PLANE_AXES = {
    "axial": (2, 0, 1),
    "coronal": (1, 0, 2),
    "sagittal": (0, 1, 2),
}
AXIS_NAMES = "xyz"

#: outline colour of the ground-truth label
LABEL_COLOR = "#00e676"


# ----------------------------------------------------------------------------- helpers
def lesion_centre(label: np.ndarray) -> tuple[int, int, int]:
    """A voxel inside the largest connected lesion (26-connectivity), near its centroid.

    The lesion voxel nearest the component's centroid, so the point lies in the lesion even
    when the lesion is not convex (a ring or a C shape, whose centroid is outside it).

    Args:
        label: (X, Y, Z) mask, > 0 = lesion.

    Raises:
        InputError: the label has no lesion voxel.
    """
    from scipy import ndimage

    mask = np.asarray(label) > 0
    if not mask.any():
        raise InputError("label", "at least one lesion voxel", "an empty mask")
    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comp.ravel())[1:]
    pts = np.argwhere(comp == 1 + int(np.argmax(sizes)))
    nearest = pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))]
    return tuple(int(v) for v in nearest)


def _as_array(a, where: str, *, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """numpy view of an array-like (numpy, torch tensor, Volume with ``.array``)."""
    if hasattr(a, "array") and not isinstance(a, np.ndarray):  # screener_nb Volume
        a = a.array
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if a.ndim not in allowed:
            exp = " or ".join(f"{d}D" for d in allowed)
            raise InputError(where, f"a {exp} array", f"shape {a.shape}")
    return a


def _as_spacing(spacing, where: str = "spacing") -> tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError:
        raise InputError(where, "3 voxel sizes in mm", repr(spacing)) from None
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(where, "3 positive voxel sizes in mm", repr(spacing))
    return sp  # type: ignore[return-value]


def _check_plane(plane: str) -> str:
    if plane not in PLANE_AXES:
        raise InputError("plane", f"one of {PLANES}", repr(plane))
    return plane


def robust_range(a: np.ndarray, q: tuple[float, float] = (0.5, 99.5), *, mask=None,
                 max_samples: int = 200_000) -> tuple[float, float]:
    """Percentile range of ``a`` (on a strided subsample, for speed), never empty."""
    v = np.asarray(a)
    if mask is not None:
        v = v[np.asarray(mask, bool)]
    v = v.reshape(-1)
    if v.size > max_samples:
        v = v[:: int(np.ceil(v.size / max_samples))]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, q))
    if hi <= lo:
        hi = lo + 1.0 if lo == float(v.max()) else float(v.max())
    return lo, hi


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2D slice of ``volume`` shown in a panel, as plotly wants it.

    Returns ``(vertical, horizontal)`` (rows are screen-vertical), plus a
    trailing channel axis for RGB volumes: axial -> ``volume[:, :, k].T`` of
    shape (Y, X); coronal -> (Z, X); sagittal -> (Z, Y).
    """
    fixed, _, _ = PLANE_AXES[_check_plane(plane)]
    s = np.take(volume, int(index), axis=fixed)
    return np.swapaxes(s, 0, 1)


def _panel_extent(shape, spacing, plane) -> tuple[float, float]:
    """(width, height) of a panel in mm."""
    _, h, v = PLANE_AXES[plane]
    return shape[h] * spacing[h], shape[v] * spacing[v]


def _axis_ranges(shape, spacing, plane, radiological: bool):
    _, h, v = PLANE_AXES[plane]
    hr = [-0.5 * spacing[h], (shape[h] - 0.5) * spacing[h]]
    vr = [-0.5 * spacing[v], (shape[v] - 0.5) * spacing[v]]
    if radiological:
        hr = hr[::-1]
    return hr, vr


def _center(shape, center) -> tuple[int, int, int]:
    if center is None:
        return tuple(int(s) // 2 for s in shape[:3])  # type: ignore[return-value]
    c = tuple(int(round(float(x))) for x in center)
    if len(c) != 3:
        raise InputError("center", "3 voxel indices (i, j, k)", repr(center))
    return tuple(int(np.clip(x, 0, s - 1)) for x, s in zip(c, shape[:3]))  # type: ignore[return-value]


def _rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] (or uint8) -> uint8 for go.Image."""
    if rgb.dtype == np.uint8:
        return rgb
    return (np.clip(np.nan_to_num(rgb), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


TRANSPARENT = "rgba(0,0,0,0)"


def threshold_colorscale(colorscale: str, zmin: float, zmax: float, threshold: float | None, *,
                         n: int = 16, floor: float = 0.3) -> list:
    """A colorscale over [zmin, zmax] that is transparent below ``threshold``.

    Hiding sub-threshold scores through the colorscale (not by NaN-ing the
    data) keeps the data JSON-clean and lets the live viewer move the
    threshold by sending a few colour stops instead of whole slices. Colours
    keep their absolute place (a score keeps its colour whatever the threshold);
    ``floor`` skips the darkest start of the named colorscale (black on CT is invisible).
    """
    import plotly.colors as pc

    span = float(zmax) - float(zmin)
    f = 0.0 if threshold is None or span <= 0 else float(np.clip((threshold - zmin) / span, 0.0, 1.0))
    if f >= 1.0:
        return [[0.0, TRANSPARENT], [1.0, TRANSPARENT]]
    pos = np.linspace(0.0, 1.0, n)
    color_at = lambda p: pc.sample_colorscale(colorscale, [floor + (1 - floor) * p])[0]  # noqa: E731
    stops = [] if f == 0.0 else [[0.0, TRANSPARENT], [f, TRANSPARENT], [f, color_at(f)]]
    stops += [[float(p), color_at(p)] for p in pos if p > f or (f == 0.0 and p == 0.0)]
    return stops


def overlay_colorscale_cutoff(colorscale) -> float:
    """Where a :func:`threshold_colorscale` stops being transparent (0..1), for tests and readers."""
    last = 0.0
    for p, c in colorscale:
        if c != TRANSPARENT:
            return float(p) if p > 0 else 0.0
        last = float(p)
    return last


#: significant digits (relative to the slice's largest |value|) kept in displayed slices
DISPLAY_DIGITS = 4


def _display_values(slice2d: np.ndarray, rng, digits: int = DISPLAY_DIGITS) -> np.ndarray:
    """A slice as sent to the browser: finite, rounded to ``digits`` significant digits.

    plotly serialises 2D arrays as JSON lists; float32 values print with ~18
    characters, rounded float64 ones with ~6, so rounding makes figures and
    live slice updates about 3x smaller. Non-finite values (JSON has no
    NaN/inf) become the ends of ``rng``.
    """
    a = np.asarray(slice2d, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        lo, hi = rng if rng is not None else (0.0, 1.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    m = float(np.max(np.abs(a))) if a.size else 0.0
    if m > 0:
        a = np.round(a, int(digits - 1 - np.floor(np.log10(m))))
    return a


def _panel_traces(image, overlay, label, plane, index, spacing, *, window, colorscale,
                  overlay_threshold, overlay_range, overlay_opacity, overlay_colorscale,
                  show_overlay_scale: bool) -> dict[str, go.BaseTraceType]:
    """The image / overlay / label-outline traces of one panel (keys say which)."""
    _, h, v = PLANE_AXES[plane]
    geo = dict(x0=0.0, dx=spacing[h], y0=0.0, dy=spacing[v])
    hn, vn = AXIS_NAMES[h], AXIS_NAMES[v]
    traces: dict[str, go.BaseTraceType] = {}
    img = plane_slice(image, plane, index)
    if img.ndim == 3:  # RGB volume, e.g. pca_rgb output
        traces["image"] = go.Image(z=_rgb_uint8(img), hoverinfo="skip", **geo)
    else:
        traces["image"] = go.Heatmap(
            z=_display_values(img, window), colorscale=colorscale, zmin=window[0], zmax=window[1],
            showscale=False, name="image",
            hovertemplate=f"{hn}=%{{x:.1f}} mm<br>{vn}=%{{y:.1f}} mm<br>value=%{{z:.3g}}<extra></extra>",
            **geo)
    if overlay is not None:
        traces["overlay"] = go.Heatmap(
            z=_display_values(plane_slice(overlay, plane, index), overlay_range),
            colorscale=threshold_colorscale(overlay_colorscale, *overlay_range, overlay_threshold),
            zmin=overlay_range[0], zmax=overlay_range[1],
            opacity=overlay_opacity, showscale=show_overlay_scale, name="anomaly",
            colorbar=dict(title="score", thickness=12, len=0.8) if show_overlay_scale else None,
            hovertemplate="score=%{z:.3g}<extra></extra>", **geo)
    if label is not None:
        traces["label"] = go.Contour(
            z=(plane_slice(label, plane, index) > 0).astype(np.uint8),
            contours=dict(start=0.5, end=0.5, size=1.0, coloring="lines"),
            colorscale=[[0, LABEL_COLOR], [1, LABEL_COLOR]], line=dict(width=2),
            showscale=False, hoverinfo="skip", name="label", **geo)
    return traces


def _default_overlay_range(overlay, threshold):
    lo, hi = robust_range(overlay, (1.0, 100.0))
    if threshold is not None:  # colours span the shown scores only
        lo = min(float(threshold), hi)
        hi = max(hi, lo + 1e-6)
        # just below the threshold: scores under zmin are clamped to zmin's (transparent) colour
        lo -= 1e-3 * (hi - lo)
    return lo, hi


def build_orthogonal(image, overlay=None, label=None, center=None, spacing=(1.0, 1.0, 1.0), *,
                     window=None, overlay_threshold=None, overlay_range=None,
                     overlay_opacity: float = 0.5, colorscale: str = "gray",
                     overlay_colorscale: str = "Hot", title: str | None = None,
                     radiological: bool = True, crosshair: bool = True, height: int = 380,
                     width: int | None = None, max_width: int = 1000):
    """:func:`orthogonal_slices` plus the trace index of every layer, for live updates.

    Returns ``(fig, traces)`` with ``traces[plane][layer] -> index in fig.data``
    (layer in "image", "overlay", "label") and ``traces["crosshair"][plane]`` the
    indices of the two crosshair line traces of that panel.
    """
    image = _as_array(image, "image", ndim=(3, 4))
    if image.ndim == 4 and image.shape[-1] != 3:
        raise InputError("image", "(X, Y, Z) or an RGB volume (X, Y, Z, 3)", f"shape {image.shape}")
    shape = image.shape[:3]
    if overlay is not None:
        overlay = _as_array(overlay, "overlay", ndim=3)
        if overlay.shape != shape:
            raise InputError("overlay", f"shape {shape} like the image", f"shape {overlay.shape}")
    if label is not None:
        label = _as_array(label, "label", ndim=3)
        if label.shape != shape:
            raise InputError("label", f"shape {shape} like the image", f"shape {label.shape}")
    spacing = _as_spacing(spacing)
    c = _center(shape, center)
    window = tuple(window) if window is not None else (robust_range(image) if image.ndim == 3 else (0, 1))
    if overlay is not None and overlay_range is None:
        overlay_range = _default_overlay_range(overlay, overlay_threshold)

    widths = [_panel_extent(shape, spacing, p)[0] for p in PLANES]
    heights = [_panel_extent(shape, spacing, p)[1] for p in PLANES]
    fig = make_subplots(rows=1, cols=3, column_widths=[w / sum(widths) for w in widths],
                        horizontal_spacing=0.07,
                        subplot_titles=[panel_title(p, c) for p in PLANES])
    traces: dict = {"crosshair": {}}
    for col, plane in enumerate(PLANES, start=1):
        fixed, h, v = PLANE_AXES[plane]
        layers = _panel_traces(
            image, overlay, label, plane, c[fixed], spacing, window=window, colorscale=colorscale,
            overlay_threshold=overlay_threshold, overlay_range=overlay_range,
            overlay_opacity=overlay_opacity, overlay_colorscale=overlay_colorscale,
            show_overlay_scale=(col == 3))
        traces[plane] = {}
        for name, tr in layers.items():
            fig.add_trace(tr, row=1, col=col)
            traces[plane][name] = len(fig.data) - 1
        hr, vr = _axis_ranges(shape, spacing, plane, radiological)
        if crosshair:
            idx = []
            for xs, ys in _crosshair_xy(c, spacing, plane, hr, vr):
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                         line=dict(color="rgba(0,200,255,0.45)", width=1)),
                              row=1, col=col)
                idx.append(len(fig.data) - 1)
            traces["crosshair"][plane] = idx
        axis_id = "" if col == 1 else str(col)
        fig.update_xaxes(range=hr, title_text=f"{AXIS_NAMES[h]} (mm)", showgrid=False, zeroline=False,
                         constrain="domain", row=1, col=col)
        fig.update_yaxes(range=vr, title_text=f"{AXIS_NAMES[v]} (mm)", showgrid=False, zeroline=False,
                         scaleanchor=f"x{axis_id}", scaleratio=1.0, constrain="domain", row=1, col=col)
    top = 70 if title else 45
    if width is None:
        # wide enough that the tallest panel fills the height at 1 mm = 1 mm, but no wider
        # than a notebook's output area (then the height shrinks to keep the panels filled)
        extra = 80 + (110 if overlay is not None else 20)  # margins, gaps, colorbar
        ratio = 1.12 * sum(widths) / max(heights)  # plot-area width per pixel of plot height
        plot_h = max(height - top - 50, 100)
        width = int(plot_h * ratio + extra)
        if width > max_width:
            width = max_width
            height = int((width - extra) / ratio + top + 50)
    fig.update_layout(title=title, height=height, width=width, margin=dict(l=60, r=20, t=top, b=50),
                      plot_bgcolor="black", showlegend=False)
    return fig, traces


def _crosshair_xy(center, spacing, plane, hr, vr):
    """Two lines marking the other two slice positions inside a panel (mm)."""
    _, h, v = PLANE_AXES[plane]
    xh, yv = center[h] * spacing[h], center[v] * spacing[v]
    return [([xh, xh], [vr[0], vr[1]]), ([hr[0], hr[1]], [yv, yv])]


def panel_title(plane: str, center) -> str:
    fixed, _, _ = PLANE_AXES[plane]
    return f"{plane} {AXIS_NAMES[fixed]}={center[fixed]}"


# ----------------------------------------------------------------------------- public figures
def orthogonal_slices(image, overlay=None, label=None, center=None, spacing=(1.0, 1.0, 1.0), *,
                      window=None, overlay_threshold: float | None = None, overlay_range=None,
                      overlay_opacity: float = 0.5, colorscale: str = "gray",
                      overlay_colorscale: str = "Hot", title: str | None = None,
                      radiological: bool = True, crosshair: bool = True, height: int = 380,
                      width: int | None = None) -> go.Figure:
    """Axial, coronal and sagittal slices through ``center`` in one figure.

    Args:
        image: (X, Y, Z) CT (HU or [0, 1]) or an RGB volume (X, Y, Z, 3) in [0, 1]
            (e.g. :func:`pca_rgb`).
        overlay: optional (X, Y, Z) anomaly map drawn as a semi-transparent heatmap
            (transparent below ``overlay_threshold``, see :func:`threshold_colorscale`).
        label: optional (X, Y, Z) ground truth (>0 = lesion), drawn as a green outline.
        center: voxel (i, j, k) the three planes go through; default the volume centre.
        spacing: voxel size in mm (X, Y, Z); sets the aspect ratio of each panel.
        window: (low, high) display range of ``image``; default its 0.5-99.5 percentiles.
        overlay_threshold: overlay values below it are not drawn.
        overlay_range: (low, high) colour range of the overlay; default from its values.
        radiological: radiological display (module docstring); False draws index order.
        height, width: figure size in pixels; default width fits the panels at true aspect.

    Returns:
        a ``go.Figure`` with three panels, axes in mm.
    """
    fig, _ = build_orthogonal(image, overlay, label, center, spacing, window=window,
                              overlay_threshold=overlay_threshold, overlay_range=overlay_range,
                              overlay_opacity=overlay_opacity, colorscale=colorscale,
                              overlay_colorscale=overlay_colorscale, title=title,
                              radiological=radiological, crosshair=crosshair, height=height, width=width)
    return fig


def slices_grid(images: Sequence, titles: Sequence[str] | None = None, *, plane: str = "axial",
                index: int | None = None, spacing=(1.0, 1.0, 1.0), window=None,
                overlays: Sequence | None = None, labels: Sequence | None = None,
                overlay_threshold: float | None = None, overlay_opacity: float = 0.5,
                colorscale: str = "gray", cols: int | None = None, radiological: bool = True,
                panel_height: int = 300, title: str | None = None) -> go.Figure:
    """Side-by-side panels of the same slice of several volumes (comparisons).

    Args:
        images: list of (X, Y, Z) volumes, (X, Y, Z, 3) RGB volumes, or 2D arrays
            already sliced, indexed (horizontal, vertical) like a slice of (X, Y, Z)
            (axial: (X, Y)); their overlays/labels are then 2D too.
        titles: one per image.
        plane, index: which slice of the 3D images (default: the middle one).
        spacing: one (sx, sy, sz) for all, or a list with one per image.
        window: shared (low, high) display range; default each image its own.
        overlays, labels: optional lists (entries may be None) drawn as in
            :func:`orthogonal_slices`.
        cols: panels per row (default all in one row, at most 4).
    """
    images = list(images)
    if not images:
        raise InputError("slices_grid(images)", "at least one image", "an empty list")
    n = len(images)
    titles = list(titles) if titles is not None else [f"#{i}" for i in range(n)]
    if len(titles) != n:
        raise InputError("slices_grid(titles)", f"{n} titles (one per image)", f"{len(titles)}")
    spacings = list(spacing) if spacing is not None and np.ndim(spacing) == 2 else [spacing] * n
    overlays = list(overlays) if overlays is not None else [None] * n
    labels = list(labels) if labels is not None else [None] * n
    for what, seq in (("spacing", spacings), ("overlays", overlays), ("labels", labels)):
        if len(seq) != n:
            raise InputError(f"slices_grid({what})", f"{n} entries (one per image)", f"{len(seq)}")
    plane = _check_plane(plane)
    cols = cols or min(n, 4)
    rows = int(np.ceil(n / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.03,
                        vertical_spacing=0.08 if rows > 1 else 0.0)
    for i, img in enumerate(images):
        img = _as_array(img, f"slices_grid(images[{i}])", ndim=(2, 3, 4))
        ov = None if overlays[i] is None else _as_array(overlays[i], f"slices_grid(overlays[{i}])")
        lb = None if labels[i] is None else _as_array(labels[i], f"slices_grid(labels[{i}])")
        sp = _as_spacing(spacings[i], f"slices_grid(spacing[{i}])")
        if img.ndim == 4 and img.shape[-1] != 3:
            raise InputError(f"slices_grid(images[{i}])", "(X, Y, Z), (X, Y, Z, 3) or a 2D slice",
                             f"shape {img.shape}")
        if img.ndim == 2:
            # already a 2D slice (horizontal, vertical): lift to a one-slice volume
            img, ov, lb = (None if a is None else np.expand_dims(a, PLANE_AXES[plane][0])
                           for a in (img, ov, lb))
            if ov is not None and ov.ndim != 3 or lb is not None and lb.ndim != 3:
                raise InputError(f"slices_grid(images[{i}])", "2D overlays/labels with a 2D image",
                                 "3D ones")
        for a, what in ((ov, "overlays"), (lb, "labels")):
            if a is not None and a.shape != img.shape[:3]:
                raise InputError(f"slices_grid({what}[{i}])", f"shape {img.shape[:3]} like images[{i}]",
                                 f"shape {a.shape}")
        fixed = PLANE_AXES[plane][0]
        k = img.shape[fixed] // 2 if index is None else int(np.clip(index, 0, img.shape[fixed] - 1))
        win = tuple(window) if window is not None else (robust_range(img) if img.ndim == 3 else (0, 1))
        layers = _panel_traces(
            img, ov, lb, plane, k, sp, window=win, colorscale=colorscale,
            overlay_threshold=overlay_threshold,
            overlay_range=None if ov is None else _default_overlay_range(ov, overlay_threshold),
            overlay_opacity=overlay_opacity, overlay_colorscale="Hot", show_overlay_scale=False)
        r, c = divmod(i, cols)
        for tr in layers.values():
            fig.add_trace(tr, row=r + 1, col=c + 1)
        hr, vr = _axis_ranges(img.shape, sp, plane, radiological)
        axis_id = "" if i == 0 else str(i + 1)
        fig.update_xaxes(range=hr, showgrid=False, zeroline=False, showticklabels=False,
                         constrain="domain", row=r + 1, col=c + 1)
        fig.update_yaxes(range=vr, showgrid=False, zeroline=False, showticklabels=False,
                         scaleanchor=f"x{axis_id}", constrain="domain", row=r + 1, col=c + 1)
    fig.update_layout(title=title, height=panel_height * rows + (40 if title else 0), showlegend=False,
                      margin=dict(l=10, r=10, t=60 if title else 35, b=10), plot_bgcolor="black")
    return fig


def loss_curves(data, x: str = "step", *, keys: Iterable[str] | None = None, smooth: int = 1,
                log_y: bool = False, title: str | None = None, height: int = 350) -> go.Figure:
    """Training curves, one line per variable.

    Args:
        data: an ``xarray.Dataset`` (every data variable with dimension ``x``) or a
            dict ``name -> 1D array``; ``data[x]`` (if present) gives the x values,
            else 0, 1, 2, ...
        keys: which variables to draw (default all but ``x``).
        smooth: moving-average window (in points); 1 draws the raw values, > 1 draws
            the smoothed curve over a faint raw one. NaNs are gaps.
        log_y: logarithmic y axis.
    """
    if hasattr(data, "data_vars"):  # xarray.Dataset, without importing xarray here
        xs = np.asarray(data[x].values) if x in data.coords or x in data.variables else None
        series = {k: np.asarray(data[k].values) for k in data.data_vars if data[k].ndim == 1}
    elif isinstance(data, Mapping):
        xs = np.asarray(data[x]) if x in data else None
        series = {k: np.asarray(v) for k, v in data.items() if k != x}
    else:
        raise InputError("loss_curves(data)", "an xarray.Dataset or a dict of 1D arrays",
                         type(data).__name__)
    if keys is not None:
        missing = [k for k in keys if k not in series]
        if missing:
            raise InputError("loss_curves(keys)", f"names among {sorted(series)}", repr(missing))
        series = {k: series[k] for k in keys}
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (name, y) in enumerate(series.items()):
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        xv = xs if xs is not None and len(xs) == len(y) else np.arange(len(y))
        color = palette[i % len(palette)]
        if smooth > 1:
            fig.add_trace(go.Scatter(x=xv, y=y, mode="lines", line=dict(color=color, width=1),
                                     opacity=0.3, name=f"{name} (raw)", showlegend=False))
            y = _moving_average(y, smooth)
        fig.add_trace(go.Scatter(x=xv, y=y, mode="lines", line=dict(color=color, width=2), name=name))
    fig.update_layout(title=title, height=height, xaxis_title=x, yaxis_title="value",
                      yaxis_type="log" if log_y else "linear", margin=dict(l=60, r=20, t=50, b=40))
    return fig


def _moving_average(y: np.ndarray, w: int) -> np.ndarray:
    """Trailing mean over the last ``w`` finite values (NaNs ignored, kept as gaps)."""
    finite = np.isfinite(y)
    v = np.where(finite, y, 0.0)
    cs, cn = np.cumsum(v), np.cumsum(finite)
    s = cs - np.concatenate([np.zeros(w), cs[:-w]])[: len(y)]
    n = cn - np.concatenate([np.zeros(w), cn[:-w]])[: len(y)]
    out = np.full_like(y, np.nan)
    ok = finite & (n > 0)
    out[ok] = s[ok] / n[ok]
    return out


def histogram_by_class(scores, labels, roi=None, *, bins: int = 100, log_y: bool = True,
                       names: tuple[str, str] = ("normal", "lesion"), title: str | None = None,
                       height: int = 350) -> go.Figure:
    """Density histograms of anomaly scores for normal vs lesion voxels.

    Args:
        scores: anomaly map(s): an array of any shape or a list of arrays (cases).
        labels: ground truth of the same shape(s); > 0 = lesion.
        roi: optional mask(s) of the same shape(s); voxels outside are ignored.
        bins: number of bins shared by both classes.
        log_y: log density axis (lesions are rare, tails matter).

    The histograms are computed here with numpy and drawn as bars, so the
    figure stays small whatever the number of voxels.
    """
    def _flat(a, what):
        if isinstance(a, (list, tuple)):
            return [_as_array(x, f"histogram_by_class({what}[{i}])") for i, x in enumerate(a)]
        return [_as_array(a, f"histogram_by_class({what})")]

    s_list, l_list = _flat(scores, "scores"), _flat(labels, "labels")
    r_list = _flat(roi, "roi") if roi is not None else [None] * len(s_list)
    if not (len(s_list) == len(l_list) == len(r_list)):
        raise InputError("histogram_by_class", "as many label/roi arrays as score arrays",
                         f"{len(s_list)} scores, {len(l_list)} labels, {len(r_list)} rois")
    normal, lesion = [], []
    for i, (s, lb, r) in enumerate(zip(s_list, l_list, r_list)):
        if lb.shape != s.shape or (r is not None and r.shape != s.shape):
            raise InputError(f"histogram_by_class(case {i})", f"labels/roi of shape {s.shape}",
                             f"labels {lb.shape}" + (f", roi {r.shape}" if r is not None else ""))
        m = np.ones(s.shape, bool) if r is None else r.astype(bool)
        pos = lb > 0
        normal.append(s[m & ~pos].ravel())
        lesion.append(s[m & pos].ravel())
    normal_v, lesion_v = np.concatenate(normal), np.concatenate(lesion)
    allv = np.concatenate([normal_v, lesion_v])
    allv = allv[np.isfinite(allv)]
    if allv.size == 0:
        raise InputError("histogram_by_class(scores)", "finite scores inside the roi", "none")
    edges = np.histogram_bin_edges(allv, bins=bins)
    centers = 0.5 * (edges[1:] + edges[:-1])
    fig = go.Figure()
    for values, name, color in ((normal_v, names[0], "#1f77b4"), (lesion_v, names[1], "#d62728")):
        if values.size == 0:
            continue
        dens, _ = np.histogram(values[np.isfinite(values)], bins=edges, density=True)
        fig.add_trace(go.Bar(x=centers, y=dens, width=np.diff(edges), name=f"{name} (n={values.size:,})",
                             marker_color=color, opacity=0.55))
    fig.update_layout(barmode="overlay", title=title, height=height, xaxis_title="anomaly score",
                      yaxis_title="density", yaxis_type="log" if log_y else "linear",
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig


def curve_area(x: np.ndarray, y: np.ndarray, max_x: float | None = None) -> float:
    """Trapezoid area under y(x) on [0, max_x], interpolating at max_x; normalised by max_x."""
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    if max_x is None:
        return float(np.trapezoid(y, x))
    keep = x <= max_x
    xs, ys = x[keep], y[keep]
    if xs.size == 0 or xs[-1] < max_x:
        xs = np.append(xs, max_x)
        ys = np.append(ys, np.interp(max_x, x, y))
    return float(np.trapezoid(ys, xs) / max_x)


def roc_curves(curves: Mapping[str, tuple], *, max_fpr: float | None = None, title: str | None = None,
               height: int = 400) -> go.Figure:
    """ROC curves ``name -> (fpr, tpr)``; the legend shows each area under the curve.

    With ``max_fpr`` the legend shows the area up to that FPR divided by ``max_fpr``
    (not the McClish-standardised partial AUROC; the metrics module reports that)
    and a dotted line marks the limit.
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"),
                             name="chance", hoverinfo="skip"))
    for name, (fpr, tpr, *_) in curves.items():
        a = curve_area(fpr, tpr, max_fpr)
        tag = f"AUC={a:.3f}" if max_fpr is None else f"area@{max_fpr:g}={a:.3f}"
        fig.add_trace(go.Scatter(x=np.asarray(fpr), y=np.asarray(tpr), mode="lines", name=f"{name} ({tag})"))
    if max_fpr is not None:
        fig.add_vline(x=max_fpr, line=dict(dash="dot", color="black"))
    fig.update_layout(title=title, height=height, xaxis_title="false positive rate",
                      yaxis_title="true positive rate", xaxis_range=[0, 1], yaxis_range=[0, 1.01],
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig


def pro_curves(curves: Mapping[str, tuple], *, max_fpr: float = 0.3, title: str | None = None,
               height: int = 400) -> go.Figure:
    """Per-region-overlap curves ``name -> (fpr, pro)`` drawn up to ``max_fpr``.

    The legend shows the normalised area up to ``max_fpr`` (AUPRO@max_fpr, the
    usual 0.3 limit), computed here by the trapezoid rule with interpolation at
    the limit.
    """
    fig = go.Figure()
    for name, (fpr, pro, *_) in curves.items():
        a = curve_area(fpr, pro, max_fpr)
        fig.add_trace(go.Scatter(x=np.asarray(fpr), y=np.asarray(pro), mode="lines",
                                 name=f"{name} (AUPRO@{max_fpr:g}={a:.3f})"))
    fig.update_layout(title=title, height=height, xaxis_title="false positive rate",
                      yaxis_title="per-region overlap", xaxis_range=[0, max_fpr], yaxis_range=[0, 1.01],
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig


def pca_rgb(features, mask=None, *, max_samples: int = 100_000, seed: int = 0,
            clip_percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Project dense descriptors to their first three principal components, as RGB.

    Args:
        features: (C, X, Y, Z) descriptor map (numpy or torch), C >= 1.
        mask: optional (X, Y, Z) bool; PCA is fitted on these voxels only (all are projected).
        max_samples: voxels used to fit the PCA (random subset, ``seed``).
        clip_percentiles: each component is scaled to [0, 1] between these percentiles.

    Returns:
        (X, Y, Z, 3) float32 in [0, 1]; channels beyond C are zero when C < 3.

    Written with numpy's SVD (sklearn is a dev-only dependency). Component signs
    are fixed (largest loading positive) so colours do not flip between calls.
    """
    f = _as_array(features, "pca_rgb(features)", ndim=4).astype(np.float32, copy=False)
    c, *spatial = f.shape
    flat = f.reshape(c, -1).T  # (N, C)
    if mask is not None:
        mask = _as_array(mask, "pca_rgb(mask)", ndim=3)
        if mask.shape != tuple(spatial):
            raise InputError("pca_rgb(mask)", f"shape {tuple(spatial)} like the features", f"shape {mask.shape}")
        fit = flat[mask.reshape(-1).astype(bool)]
    else:
        fit = flat
    if fit.shape[0] == 0:
        raise InputError("pca_rgb(mask)", "at least one voxel inside the mask", "an empty mask")
    if fit.shape[0] > max_samples:
        rng = np.random.default_rng(seed)
        fit = fit[rng.choice(fit.shape[0], max_samples, replace=False)]
    mean = fit.mean(axis=0, dtype=np.float64).astype(np.float32)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    k = min(3, vt.shape[0])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(signs == 0, 1, signs)[:, None]
    proj = (flat - mean) @ comps.T  # (N, k)
    fit_proj = (fit - mean) @ comps.T
    lo = np.percentile(fit_proj, clip_percentiles[0], axis=0)
    hi = np.percentile(fit_proj, clip_percentiles[1], axis=0)
    rgb = np.zeros((flat.shape[0], 3), np.float32)
    rgb[:, :k] = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    return rgb.reshape(*spatial, 3)


# ----------------------------------------------------------------------------- export
#: decompresses the embedded plotly.js and each figure with the browser's own gzip
#: (``DecompressionStream``), then draws the figures; no network, no second file
_OFFLINE_LOADER = """<script>
(async () => {
  const inflate = async (id) => {
    const bytes = Uint8Array.from(atob(document.getElementById(id).textContent.trim()), c => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return await new Response(stream).text();
  };
  (0, eval)(await inflate("screener-plotlyjs"));
  for (const el of document.querySelectorAll("script[data-screener-figure]")) {
    const fig = JSON.parse(await inflate(el.id));
    await Plotly.newPlot(el.dataset.screenerFigure, fig.data, fig.layout, {responsive: true});
  }
  document.body.dataset.figuresDrawn = "true";
})();
</script>"""



def score_scatter(x_scores, y_scores, lesion, *, x_title: str = "teacher score", y_title: str = "student score",
                  title: str = "", n_normal: int = 4000, n_lesion: int = 500, seed: int = 0) -> go.Figure:
    """Two maps' scores per voxel, one against the other: ``x_scores``, ``y_scores`` and ``lesion``
    are flat arrays over the same voxels (e.g. the body voxels of one case). Plots a random
    ``n_normal`` of the voxels plus up to ``n_lesion`` lesion voxels (so they are visible), the
    lesion voxels in red, the diagonal, and Pearson's r of the plotted voxels in the title."""
    x, y = np.ravel(np.asarray(x_scores, float)), np.ravel(np.asarray(y_scores, float))
    lesion = np.ravel(np.asarray(lesion, bool))
    if not (x.shape == y.shape == lesion.shape) or x.size < 2:
        raise InputError("score_scatter", "two score arrays and a lesion mask of one length (>= 2)",
                         f"lengths {x.size}, {y.size}, {lesion.size}")
    rng = np.random.default_rng(seed)
    pick = rng.choice(x.size, size=min(n_normal, x.size), replace=False)
    pick = np.union1d(pick, np.flatnonzero(lesion)[:n_lesion])
    xv, yv, lv = x[pick], y[pick], lesion[pick]
    fig = go.Figure([go.Scattergl(x=xv[~lv], y=yv[~lv], mode="markers", name="normal", marker=dict(size=3, opacity=0.3)),
                     go.Scattergl(x=xv[lv], y=yv[lv], mode="markers", name="lesion", marker=dict(size=4, color="crimson"))])
    lo, hi = float(xv.min()), float(xv.max())
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray")))
    r = float(np.corrcoef(xv, yv)[0, 1])
    fig.update_layout(title=f"{title} (Pearson r = {r:.3f})" if title else f"Pearson r = {r:.3f}",
                      xaxis_title=x_title, yaxis_title=y_title, height=420)
    return fig


def grouped_bars(values: Mapping[str, Mapping[str, float]], *, labels: Mapping[str, str] | None = None,
                 y_title: str = "", title: str = "", y_range=None) -> go.Figure:
    """One group of bars per x key, one bar per series: ``values[series][x]`` (x keys in the order of
    the first series; ``labels`` renames them on the axis)."""
    if not values:
        raise InputError("grouped_bars", "at least one series", "none")
    xs = list(next(iter(values.values())))
    names = [labels.get(x, x) if labels else x for x in xs]
    fig = go.Figure([go.Bar(name=str(series), x=names, y=[vals.get(x, np.nan) for x in xs])
                     for series, vals in values.items()])
    fig.update_layout(barmode="group", yaxis_title=y_title, title=title, height=380,
                      **({"yaxis_range": list(y_range)} if y_range is not None else {}))
    return fig

def _gzip_b64(text: str) -> str:
    import base64
    import gzip

    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def _single_precision(node):
    """A figure's JSON with every float64 typed array (plotly's ``{"dtype": "f8", "bdata": ...}``)
    stored as float32: half the bytes, and 7 significant digits are more than a screen shows."""
    import base64

    if isinstance(node, dict):
        if node.get("dtype") == "f8" and isinstance(node.get("bdata"), str):
            a = np.frombuffer(base64.b64decode(node["bdata"]), np.float64).astype(np.float32)
            return {**node, "dtype": "f4", "bdata": base64.b64encode(a.tobytes()).decode("ascii")}
        return {k: _single_precision(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_single_precision(v) for v in node]
    return node


def offline_figures_html(figures: Sequence) -> tuple[list[str], str]:
    """Figures for a self-contained HTML page, gzip-compressed: ``(one block per figure, loader)``.

    Each block is the figure's ``<div>`` plus its JSON, gzip'd and base64'd; ``loader`` (to
    place after the blocks, once per page) holds plotly.js compressed the same way (about
    1.3 MB instead of 4.7 MB) and draws every block once the browser has inflated it.
    The page needs no network; it needs a browser with ``DecompressionStream`` (2023 on).
    """
    from plotly.offline import get_plotlyjs

    blocks = []
    for i, fig in enumerate(figures):
        div = f"screener-figure-{i}"
        blocks.append(f'<div id="{div}" style="width:100%"></div>\n'
                      f'<script type="application/octet-stream" id="{div}-data" data-screener-figure="{div}">'
                      f"{_gzip_b64(json.dumps(_single_precision(json.loads(go.Figure(fig).to_json()))))}</script>")
    loader = (f'<script type="application/octet-stream" id="screener-plotlyjs">{_gzip_b64(get_plotlyjs())}</script>\n'
              + _OFFLINE_LOADER)
    return blocks, loader


def to_html(figures, path, title: str = "screener_nb report", *, descriptions: Mapping[str, str] | None = None) -> Path:
    """Write figures to ONE self-contained HTML file (compressed plotly.js embedded once, no network needed).

    Args:
        figures: a figure, a list of figures, or a dict ``heading -> figure``.
        path: output file (written atomically).
        title: page title and top heading.
        descriptions: optional ``heading -> text`` shown under each heading.
    """
    if isinstance(figures, go.Figure):
        items = [(None, figures)]
    elif isinstance(figures, Mapping):
        items = list(figures.items())
    else:
        items = [(None, f) for f in figures]
    descriptions = descriptions or {}
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
        f"<title>{_html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}</style>",
        "</head><body>", f"<h1>{_html.escape(title)}</h1>",
    ]
    blocks, loader = offline_figures_html([fig for _, fig in items])
    for (heading, _), block in zip(items, blocks):
        if heading:
            parts.append(f"<h2>{_html.escape(str(heading))}</h2>")
            if heading in descriptions:
                parts.append(f"<p>{_html.escape(descriptions[heading])}</p>")
        parts.append(block)
    parts += [loader, "</body></html>"]
    return write_text(path, "\n".join(parts))


def save_png(fig, path, *, width: int | None = None, height: int | None = None, scale: float = 1.0) -> Path:
    """Save a static PNG via kaleido; if that is impossible, an HTML file instead.

    kaleido needs a Chromium (Debian's /usr/bin/chromium is found by itself). When
    kaleido is missing or fails, the figure is written to ``path`` with the
    suffix ``.html`` and a warning says why; the returned path is the file
    actually written.
    """
    path = Path(path)
    try:
        import kaleido  # noqa: F401  (dev/optional dependency)

        with atomic_path(path) as tmp:
            go.Figure(fig).write_image(str(tmp), format="png", width=width, height=height, scale=scale)
        return path
    except Exception as e:  # noqa: BLE001 - any kaleido/Chromium failure means: fall back
        html_path = path.with_suffix(".html")
        warnings.warn(
            f"{path}: PNG export needs kaleido and a Chromium browser "
            f"(pip install kaleido; apt-get install chromium), which failed: {type(e).__name__}: {e}. "
            f"Wrote an interactive HTML file instead: {html_path}", RuntimeWarning, stacklevel=2)
        return to_html([fig], html_path, title=path.stem)
