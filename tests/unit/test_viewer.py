"""Tests of screener_nb.viz.{plots, viewer}: figures, the offline viewer, backend choice.

References are independent of the code under test: hand-computed Dice on a
tiny volume, a flood-fill written here for connected regions, sklearn for
PCA and AUROC, raw numpy slicing for what the figure shows.
"""
from __future__ import annotations

import re
import sys
import types
from collections import deque

import numpy as np
import plotly.graph_objects as go
import pytest

from screener_nb.errors import ConfigError, InputError
from screener_nb.viz import backend, plots, viewer


def assert_shown(shown, expected):
    """Displayed slices keep 4 significant digits relative to the slice's largest |value|."""
    shown, expected = np.asarray(shown, float), np.asarray(expected, float)
    assert shown.shape == expected.shape
    np.testing.assert_allclose(shown, expected, rtol=0, atol=5e-4 * np.abs(expected).max() + 1e-12)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def tiny():
    """4 x 3 x 2 volume whose map value is flat_index / 24; lesion = flat voxels {10, 20, 21, 22}."""
    shape = (4, 3, 2)
    amap = (np.arange(24, dtype=np.float32) / 24).reshape(shape)
    label = np.zeros(24, np.uint8)
    label[[10, 20, 21, 22]] = 1
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    return image, amap, label.reshape(shape)


@pytest.fixture
def phantom():
    rng = np.random.default_rng(1)
    shape = (20, 16, 12)
    image = rng.normal(0.4, 0.1, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[5:9, 4:8, 3:6] = 1
    amap = rng.random(shape).astype(np.float32) * 0.5
    amap[6:10, 4:8, 3:6] += 0.6
    return image, amap, label


@pytest.fixture
def no_itk_import(monkeypatch):
    """Make sure a fake or real itkwidgets is not already imported."""
    monkeypatch.delitem(sys.modules, "itkwidgets", raising=False)
    viewer._probe_hosts.cache_clear()
    yield
    viewer._probe_hosts.cache_clear()


# ----------------------------------------------------------------------------- metrics
def test_dice_and_sensitivity_hand_computed(tiny):
    _, amap, label = tiny
    # threshold 19.5/24 flags flat voxels 20..23: overlap {20, 21, 22} = 3 -> Dice 2*3/(4+4)
    r = viewer.dice_and_sensitivity(amap, label, 19.5 / 24)
    assert (r["n_above"], r["n_label"], r["n_overlap"]) == (4, 4, 3)
    assert r["dice"] == pytest.approx(0.75) and r["sensitivity"] == pytest.approx(0.75)
    # roi excluding flat voxel 23 -> prediction {20, 21, 22}: Dice 2*3/(3+4)
    roi = np.ones(24, bool)
    roi[23] = False
    r = viewer.dice_and_sensitivity(amap, label, 19.5 / 24, roi.reshape(amap.shape))
    assert r["dice"] == pytest.approx(6 / 7)
    empty = viewer.dice_and_sensitivity(amap, np.zeros_like(label), 2.0)
    # two empty masks: undefined, as metrics.dice has it (there it raises)
    assert np.isnan(empty["dice"]) and np.isnan(empty["sensitivity"]) and empty["n_above"] == 0
    from screener_nb.errors import InputError
    from screener_nb.metrics import dice

    with pytest.raises(InputError, match="two empty masks"):
        dice(amap, np.zeros_like(label), 2.0)


# ----------------------------------------------------------------------------- offline viewer
def test_offline_viewer_threshold_slider_updates_dice(tiny):
    image, amap, label = tiny
    v = viewer.explore(image, amap, label, spacing=(1, 1, 1), backend="offline")
    assert isinstance(v, viewer.OfflineViewer) and v.backend == "offline"
    assert set(v._repr_mimebundle_()) >= {"application/vnd.jupyter.widget-view+json"}

    v.threshold_slider.value = 19.5 / 24  # flags {20..23}: Dice 0.75, sensitivity 0.75 (by hand)
    assert v.state["dice"] == pytest.approx(0.75)
    assert "Dice 0.750" in v.dice_label.value and "sensitivity 0.750" in v.dice_label.value
    assert "4 voxels above" in v.dice_label.value

    v.threshold_slider.value = 21.5 / 24  # flags {22, 23}: overlap 1 -> Dice 2/6, sensitivity 1/4
    assert v.state["dice"] == pytest.approx(1 / 3)
    assert "Dice 0.333" in v.dice_label.value and "sensitivity 0.250" in v.dice_label.value


def test_offline_viewer_slice_sliders_show_numpy_slices(phantom):
    image, amap, label = phantom
    v = viewer.explore(image, amap, label, spacing=(1.5, 1.5, 2.25), backend="offline", threshold=0.7)
    v.z_slider.value = 4
    v.y_slider.value = 6
    v.x_slider.value = 7
    # what plotly draws: rows = screen vertical; axial = image[:, :, k] transposed (Y rows, X columns)
    assert_shown(v.displayed_slice("axial"), image[:, :, 4].T)
    assert_shown(v.displayed_slice("coronal"), image[:, 6, :].T)
    assert_shown(v.displayed_slice("sagittal"), image[7, :, :].T)
    np.testing.assert_array_equal(v.displayed_slice("axial", "label"), (label[:, :, 4] > 0).T)
    assert_shown(v.displayed_slice("axial", "overlay"), amap[:, :, 4].T)
    # scores below the threshold are transparent (the colorscale's transparent part ends there)
    assert v.overlay_cutoff("axial") == pytest.approx(0.7, abs=1e-6)
    v.set_threshold(0.9)
    for plane in plots.PLANES:
        assert v.overlay_cutoff(plane) == pytest.approx(0.9, abs=1e-6)
    assert_shown(v.displayed_slice("axial", "overlay"), amap[:, :, 4].T)
    assert "axial z=4" in v.figure.layout.annotations[0].text
    # goto moves every slider (clamped to the volume)
    v.goto((100, 2, 3))
    assert (v.x_slider.value, v.y_slider.value, v.z_slider.value) == (19, 2, 3)
    assert_shown(v.displayed_slice("sagittal"), image[19].T)


def test_offline_viewer_method_switch_and_regions(phantom):
    image, amap, label = phantom
    v = viewer.explore(image, amap, label, backend="offline", methods={"doubled": 2 * amap}, threshold=0.7)
    assert v.method_dropdown.options == ("anomaly map", "doubled")
    frac_before = np.mean(amap >= 0.7)
    v.method_dropdown.value = "doubled"
    assert_shown(v.displayed_slice("axial", "overlay"), 2 * amap[:, :, 6].T)
    # same fraction of flagged voxels on the new map (its threshold is about doubled)
    assert v.state["method"] == "doubled"
    assert abs(np.mean(2 * amap >= v.state["threshold"]) - frac_before) < 0.01
    ref = viewer.dice_and_sensitivity(2 * amap, label, v.state["threshold"])
    assert v.state["dice"] == pytest.approx(ref["dice"])
    # the region dropdown lists top_regions at the current threshold and jumps there
    assert v.region_dropdown.options[0][1] == 0 and len(v.region_dropdown.options) == len(v.regions) + 1
    v.region_dropdown.value = 1
    assert v.state["center"] == v.regions[0]["center"]


def test_case_object_duck_typing(phantom):
    image, amap, label = phantom
    case = types.SimpleNamespace(id="case-7", image=image, anomaly_map=amap, label=label, spacing=(2.0, 1.0, 3.0),
                                 body=np.ones(image.shape, bool))
    v = viewer.explore(case, backend="offline")
    assert v.spacing == (2.0, 1.0, 3.0) and v.title == "case-7" and v.roi is not None
    assert v.state["n_label"] == int(label.sum())
    from screener_nb.data.volume import Volume

    vol = Volume.from_spacing(image, (0.7, 0.7, 2.5))
    v = viewer.explore(vol, vol.with_array(amap), backend="offline")
    assert v.spacing == pytest.approx((0.7, 0.7, 2.5)) and v.image is vol.array


# ----------------------------------------------------------------------------- backend choice
def test_auto_picks_offline_without_itkwidgets(phantom, monkeypatch, no_itk_import):
    image, amap, label = phantom
    monkeypatch.setattr(backend, "itkwidgets_installed", lambda: False)
    v = viewer.explore(image, amap, label, backend="auto", interactive=True, network=True)
    assert v.backend == "offline" and "not installed" in v.backend_reason
    assert "itkwidgets" not in sys.modules


def test_auto_picks_offline_when_cdn_unreachable(phantom, monkeypatch, no_itk_import):
    image, amap, label = phantom
    monkeypatch.setattr(backend, "itkwidgets_installed", lambda: True)
    monkeypatch.delenv("SCREENER_VIEWER_NETWORK", raising=False)
    calls = []

    def refuse(address, timeout=None):
        calls.append(address)
        raise OSError("network unreachable")

    monkeypatch.setattr(backend.socket, "create_connection", refuse)
    v = viewer.explore(image, amap, label, backend="auto", interactive=True)
    assert v.backend == "offline" and "unreachable" in v.backend_reason
    assert {h for h, _ in calls} == set(viewer.viewer_hosts()) and all(p == 443 for _, p in calls)
    assert "itkwidgets" not in sys.modules
    # the probe is cached: a second viewer does not probe again
    viewer.explore(image, amap, label, backend="auto", interactive=True)
    assert len(calls) == len(viewer.viewer_hosts())


def test_headless_never_gets_itk(phantom, monkeypatch, no_itk_import):
    image, amap, label = phantom
    monkeypatch.setattr(backend, "itkwidgets_installed", lambda: True)
    monkeypatch.setenv("SCREENER_HEADLESS", "1")
    assert viewer.detect_interactive()[0] is False
    with pytest.warns(RuntimeWarning, match="headless"):
        v = viewer.explore(image, amap, label, backend="itk", network=True)
    assert v.backend == "offline" and "itkwidgets" not in sys.modules
    # a notebook parameter interactive=True does not override a headless runner either
    assert viewer.choose_backend("auto", interactive=True, network=True)[0] == "offline"
    monkeypatch.delenv("SCREENER_HEADLESS")
    assert viewer.choose_backend("auto", interactive=True, network=True)[0] == "itk"
    # plain Python (this test process) is not an interactive kernel either
    assert viewer.detect_interactive() == (False, "not running in a Jupyter kernel")


def test_itk_backend_wiring_with_fake_itkwidgets(phantom, monkeypatch, no_itk_import):
    """The itk branch passes (z, y, x) arrays with mm spacing and re-thresholds the label image."""
    image, amap, label = phantom
    spacing = (1.5, 1.25, 2.5)
    calls = []

    class FakeViewer:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k))

    def view(**kwargs):
        calls.append(("view", (), kwargs))
        return FakeViewer()

    fake_itk = types.ModuleType("itkwidgets")
    fake_itk.view = view
    fake_ngff = types.ModuleType("ngff_zarr")
    fake_ngff.to_ngff_image = lambda data, **kw: types.SimpleNamespace(data=data, **kw)
    monkeypatch.setitem(sys.modules, "itkwidgets", fake_itk)
    monkeypatch.setitem(sys.modules, "ngff_zarr", fake_ngff)
    monkeypatch.setattr(backend, "itkwidgets_installed", lambda: True)

    v = viewer.explore(image, amap, label, spacing, backend="auto", interactive=True, network=True, threshold=0.7)
    assert isinstance(v, viewer.ItkViewer) and v.backend == "itk"
    kw = calls[0][2]
    np.testing.assert_array_equal(kw["image"].data, np.transpose(image))  # itk order (z, y, x)
    assert kw["image"].dims == ("z", "y", "x") and kw["image"].scale == {"x": 1.5, "y": 1.25, "z": 2.5}
    codes = kw["label_image"].data.transpose()  # back to (X, Y, Z)
    above, gt = amap >= 0.7, label > 0
    assert np.array_equal(codes == 3, above & gt) and np.array_equal(codes == 2, above & ~gt)
    assert np.array_equal(codes == 1, ~above & gt)

    v.set_threshold(0.95)
    name, args, _ = calls[-1]
    assert name == "set_label_image"
    np.testing.assert_array_equal(args[0].data.transpose() >= 2, amap >= 0.95)
    v.goto((4, 6, 2))
    assert [c[:2] for c in calls[-3:]] == [("set_x_slice", (6.0,)), ("set_y_slice", (7.5,)), ("set_z_slice", (5.0,))]


def test_network_probe_and_override(monkeypatch):
    viewer._probe_hosts.cache_clear()
    monkeypatch.delenv("SCREENER_VIEWER_NETWORK", raising=False)
    seen = []

    class Conn:  # a connection that works as a context manager
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(backend.socket, "create_connection", lambda addr, timeout=None: seen.append(addr) or Conn())
    assert viewer.network_available(hosts=("a.example", "b.example")) is True
    assert sorted(seen) == [("a.example", 443), ("b.example", 443)]
    monkeypatch.setenv("SCREENER_VIEWER_NETWORK", "0")
    assert viewer.network_available(hosts=("a.example",)) is False
    assert viewer.network_available(True) is True
    viewer._probe_hosts.cache_clear()


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_named(phantom, tmp_path):
    image, amap, label = phantom
    with pytest.raises(InputError, match=r"explore\(anomaly map 'anomaly map'\): expected shape \(20, 16, 12\).*found shape \(20, 16, 11\)"):
        viewer.explore(image, amap[..., :11], backend="offline")
    with pytest.raises(InputError, match=r"explore\(label\).*found shape \(3, 3, 3\)"):
        viewer.explore(image, amap, np.zeros((3, 3, 3)), backend="offline")
    with pytest.raises(InputError, match=r"explore\(image\): expected a 3D array, found shape \(20, 16\)"):
        viewer.explore(image[..., 0], backend="offline")
    with pytest.raises(InputError, match=r"explore\(spacing\).*found \(1\.0, -1\.0, 1\.0\)"):
        viewer.explore(image, spacing=(1.0, -1.0, 1.0), backend="offline")
    with pytest.raises(ConfigError, match=r"backend.*found 'vtk'"):
        viewer.explore(image, backend="vtk")
    # a path is read as a run directory (the evaluation stage's maps): an empty folder is not one
    with pytest.raises(InputError, match=re.escape(str(tmp_path)) + r": expected a preprocessed cohort.*found none"):
        viewer.explore(tmp_path, backend="offline")
    with pytest.raises(InputError, match=r"connectivity.*found 8"):
        viewer.top_regions(amap, connectivity=8)
    with pytest.raises(InputError, match=r"slices_grid\(titles\): expected 2 titles.*found 1"):
        plots.slices_grid([image, image], ["only one"])
    with pytest.raises(InputError, match=r"pca_rgb\(features\): expected a 4D array, found shape \(20, 16, 12\)"):
        plots.pca_rgb(image)


def test_run_loader_hook(phantom, tmp_path):
    image, amap, label = phantom
    seen = []

    def loader(path, case):
        seen.append((path, case))
        return types.SimpleNamespace(image=image, anomaly_maps={"m": amap}, label=label)

    v = viewer.explore(tmp_path, case="c1", backend="offline", loader=loader)
    assert seen == [(tmp_path, "c1")] and v.state["method"] == "m"


# ----------------------------------------------------------------------------- top_regions
def _flood_fill_regions(fg, conn):
    """Brute-force connected components (BFS) with 6/18/26 neighbourhoods."""
    offs = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
            if 0 < abs(a) + abs(b) + abs(c) <= {6: 1, 18: 2, 26: 3}[conn]]
    seen = np.zeros(fg.shape, bool)
    regions = []
    for start in zip(*np.nonzero(fg)):
        if seen[start]:
            continue
        seen[start] = True
        q, comp = deque([start]), []
        while q:
            p = q.popleft()
            comp.append(p)
            for o in offs:
                n = tuple(pi + oi for pi, oi in zip(p, o))
                if all(0 <= ni < s for ni, s in zip(n, fg.shape)) and fg[n] and not seen[n]:
                    seen[n] = True
                    q.append(n)
        regions.append(comp)
    return regions


@pytest.mark.parametrize("conn", [6, 18, 26])
def test_top_regions_vs_flood_fill(conn):
    rng = np.random.default_rng(conn)
    m = rng.random((9, 8, 7))
    roi = np.ones(m.shape, bool)
    roi[0] = False
    thr = 0.8
    got = viewer.top_regions(m, k=1000, threshold=thr, roi=roi, connectivity=conn, spacing=(2, 1, 1))
    ref = _flood_fill_regions((m >= thr) & roi, conn)
    assert len(got) == len(ref)
    ref_stats = sorted(((max(m[p] for p in c), len(c), float(np.mean([m[p] for p in c]))) for c in ref),
                       key=lambda t: (-t[0], -t[1]))
    for g, (mx, size, mean) in zip(got, ref_stats):
        assert (g["max"], g["size"]) == (pytest.approx(mx), size) and g["mean"] == pytest.approx(mean)
        assert g["volume_ml"] == pytest.approx(size * 2 / 1000)
        comp = next(c for c in ref if len(c) == size and max(m[p] for p in c) == pytest.approx(mx))
        assert g["center"] in comp and g["peak"] in comp and m[g["peak"]] == pytest.approx(mx)
    assert [g["rank"] for g in got] == list(range(1, len(got) + 1))
    assert len(viewer.top_regions(m, k=3, threshold=thr, roi=roi, connectivity=conn)) == min(3, len(ref))


def test_top_regions_default_threshold_is_99th_percentile_in_roi():
    m = np.random.default_rng(5).random((12, 10, 8))
    roi = np.zeros(m.shape, bool)
    roi[2:10] = True
    assert viewer.top_regions(m, k=50, roi=roi) == viewer.top_regions(
        m, k=50, threshold=float(np.quantile(m[roi], 0.99)), roi=roi)
    assert viewer.top_regions(np.zeros((3, 3, 3)), threshold=1.0) == []


# ----------------------------------------------------------------------------- plots
def test_pca_rgb_shapes_range_and_sklearn_agreement():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    c, shape = 6, (7, 6, 5)
    f = rng.normal(size=(c, *shape)) * np.arange(1, c + 1)[:, None, None, None]
    rgb = plots.pca_rgb(f, clip_percentiles=(0, 100))
    assert rgb.shape == (*shape, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    ref = PCA(n_components=3).fit_transform(f.reshape(c, -1).T)
    for i in range(3):  # unclipped scaling is affine: |correlation| with sklearn's components is 1
        r = np.corrcoef(rgb[..., i].ravel(), ref[:, i])[0, 1]
        assert abs(r) == pytest.approx(1.0, abs=1e-4)
    mask = np.zeros(shape, bool)
    mask[:3] = True
    assert plots.pca_rgb(f, mask).shape == (*shape, 3)
    two = plots.pca_rgb(f[:2])  # fewer than 3 channels: blue stays 0
    assert np.all(two[..., 2] == 0)


def test_orthogonal_slices_geometry(phantom):
    image, amap, label = phantom
    sp = (1.5, 1.0, 2.5)
    fig = plots.orthogonal_slices(image, amap, label, center=(3, 4, 5), spacing=sp, overlay_threshold=0.6,
                                  overlay_range=(0.0, 1.2))
    hm = [t for t in fig.data if isinstance(t, go.Heatmap) and t.name == "image"]
    assert len(hm) == 3
    assert_shown(hm[0].z, image[:, :, 5].T)  # axial
    assert_shown(hm[1].z, image[:, 4, :].T)  # coronal
    assert_shown(hm[2].z, image[3, :, :].T)  # sagittal
    assert (hm[0].dx, hm[0].dy, hm[1].dy, hm[2].dx) == (1.5, 1.0, 2.5, 1.0)
    # radiological: horizontal axes reversed; 1 mm = 1 mm (y anchored to x of the same panel)
    lay = fig.layout
    assert lay.xaxis.range[0] > lay.xaxis.range[1] and lay.yaxis.range[0] < lay.yaxis.range[1]
    assert lay.xaxis.range == (19.5 * 1.5, -0.5 * 1.5)
    assert (lay.yaxis.scaleanchor, lay.yaxis2.scaleanchor, lay.yaxis3.scaleanchor) == ("x", "x2", "x3")
    ov = [t for t in fig.data if t.name == "anomaly"]
    assert_shown(ov[0].z, amap[:, :, 5].T)
    lo, hi = ov[0].zmin, ov[0].zmax
    cut = (0.6 - lo) / (hi - lo)  # colour stops below the threshold's position are transparent
    assert (lo, hi, cut) == (0.0, 1.2, 0.5)
    assert all(c == plots.TRANSPARENT for p, c in ov[0].colorscale if p < cut)
    assert all(c != plots.TRANSPARENT for p, c in ov[0].colorscale if p > cut)
    contours = [t for t in fig.data if isinstance(t, go.Contour)]
    assert len(contours) == 3 and contours[0].contours.start == 0.5
    fig2 = plots.orthogonal_slices(image, radiological=False)
    assert fig2.layout.xaxis.range[0] < fig2.layout.xaxis.range[1]


def test_slices_grid_and_curves(phantom):
    image, amap, label = phantom
    rgb = plots.pca_rgb(np.stack([image, amap]))
    fig = plots.slices_grid([image, rgb, image[:, :, 2]], ["ct", "pca", "2d"], index=2,
                            overlays=[amap, None, None], labels=[label, None, None])
    heat = [t for t in fig.data if isinstance(t, go.Heatmap) and t.name == "image"]
    assert_shown(heat[0].z, image[:, :, 2].T)
    assert_shown(heat[1].z, image[:, :, 2].T)
    assert sum(isinstance(t, go.Image) for t in fig.data) == 1

    import xarray as xr

    ds = xr.Dataset({"loss": ("step", np.linspace(2, 1, 10)), "lr": ("step", np.full(10, 0.1))},
                    coords={"step": np.arange(0, 100, 10)})
    fig = plots.loss_curves(ds)
    assert {t.name for t in fig.data} == {"loss", "lr"} and list(fig.data[0].x) == list(range(0, 100, 10))
    fig = plots.loss_curves({"step": [1, 2, 3, 4], "loss": [4.0, 2.0, np.nan, 1.0]}, smooth=2)
    smooth = [t for t in fig.data if t.name == "loss"][0]
    # trailing mean of the finite values among the last 2; the NaN stays a gap
    np.testing.assert_allclose(smooth.y, [4.0, 3.0, np.nan, 1.0])


def test_histogram_by_class_is_a_density_per_class(phantom):
    _, amap, label = phantom
    roi = np.ones(amap.shape, bool)
    roi[0] = False
    fig = plots.histogram_by_class(amap, label, roi, bins=20, log_y=False)
    normal, lesion = fig.data
    n_lesion = int(((label > 0) & roi).sum())
    assert f"n={n_lesion:,}" in lesion.name and f"n={int(roi.sum()) - n_lesion:,}" in normal.name
    for bar in (normal, lesion):
        assert np.sum(np.asarray(bar.y) * np.asarray(bar.width)) == pytest.approx(1.0)
    # lesion voxels of this phantom score higher: their mean bin position is larger
    mean = lambda b: np.sum(np.asarray(b.x) * np.asarray(b.y) * np.asarray(b.width))  # noqa: E731
    assert mean(lesion) > mean(normal)


def test_roc_and_pro_legend_areas():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = rng.normal(size=500) + y
    fpr, tpr, _ = roc_curve(y, s)
    fig = plots.roc_curves({"m": (fpr, tpr)})
    assert f"AUC={roc_auc_score(y, s):.3f}" in fig.data[1].name
    # PRO curve y = x on [0, 1]: area on [0, 0.3] is 0.045, normalised 0.15 (by hand)
    fig = plots.pro_curves({"diag": (np.array([0, 1.0]), np.array([0, 1.0]))}, max_fpr=0.3)
    assert "AUPRO@0.3=0.150" in fig.data[0].name


def embedded_blobs(text):
    """``{script id: decompressed text}`` of every gzip'd base64 block of a page, decoded here
    with the standard library (the browser does it with DecompressionStream)."""
    import base64
    import gzip

    found = re.findall(r'<script type="application/octet-stream" id="([^"]+)"[^>]*>([^<]*)</script>', text)
    return {i: gzip.decompress(base64.b64decode(b)).decode("utf-8") for i, b in found}


def test_to_html_is_self_contained(tmp_path):
    import base64
    import json

    from plotly.offline import get_plotlyjs

    f1 = go.Figure(go.Scatter(x=np.array([1.0, 2.0, 3.0]), y=np.array([4.25, 5.5, 6.75]), name="unique-trace-name"))
    f2 = go.Figure(go.Bar(x=["a"], y=[1], name="second-figure"))
    out = plots.to_html({"first": f1, "second <b>": f2}, tmp_path / "r.html", title="Report")
    text = out.read_text()
    blobs = embedded_blobs(text)
    assert blobs.pop("screener-plotlyjs") == get_plotlyjs()  # plotly.js embedded exactly once, whole
    assert not re.search(r"<script[^>]*src=[\"']?https?:", text)
    figs = [json.loads(blobs[k]) for k in sorted(blobs)]
    assert [f["data"][0]["name"] for f in figs] == ["unique-trace-name", "second-figure"]
    y = figs[0]["data"][0]["y"]  # stored as float32: the values survive exactly here
    assert y["dtype"] == "f4" and np.frombuffer(base64.b64decode(y["bdata"]), np.float32).tolist() == [4.25, 5.5, 6.75]
    assert text.count('data-screener-figure="screener-figure-') == 2
    assert "second &lt;b&gt;" in text and "<title>Report</title>" in text
    assert out.stat().st_size < 0.5 * len(get_plotlyjs())  # compressed


def test_save_png_falls_back_to_html(tmp_path, monkeypatch):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]))

    def broken(self, *a, **k):
        raise RuntimeError("no Chromium here")

    monkeypatch.setattr(go.Figure, "write_image", broken)
    with pytest.warns(RuntimeWarning, match="no Chromium here"):
        out = plots.save_png(fig, tmp_path / "fig.png")
    assert out == tmp_path / "fig.html" and out.exists() and not (tmp_path / "fig.png").exists()


def test_save_png_with_kaleido(tmp_path):
    pytest.importorskip("kaleido", reason="kaleido is a dev dependency")
    import shutil

    if not shutil.which("chromium"):
        pytest.skip("kaleido needs a Chromium (apt-get install chromium)")
    out = plots.save_png(go.Figure(go.Scatter(x=[0, 1], y=[0, 1])), tmp_path / "fig.png", width=200, height=150)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
