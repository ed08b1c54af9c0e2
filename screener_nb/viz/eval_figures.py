"""Figures of a results Dataset (notebook 06 and the report): pooled curves, FROC, per-case
scatters, a gallery of lesions with the maps."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..results import best_method
from ..rundir import RunDir

def pooled_curve(ds, dataset: str, method: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The pooled ``kind`` ("roc" | "pro") curve of ``method`` on ``dataset``: (fpr, tpr or overlap), without the NaN padding."""
    kx, ky = ("roc_fpr", "roc_tpr") if kind == "roc" else ("pro_fpr", "pro_overlap")
    x = ds[kx].sel(dict(dataset=dataset, model=method)).values
    y = ds[ky].sel(dict(dataset=dataset, model=method)).values
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def curve_figures(ds) -> dict:
    """Pooled ROC and PRO curves per dataset, one line per method (from the results alone)."""
    from . import plots

    out = {}
    max_fpr = float(ds.attrs.get("max_fpr", 0.3))
    for d in ds.dataset.values:
        n = int(ds.n_cases.sel(dataset=d))
        roc = {m: pooled_curve(ds, d, m, "roc") for m in ds.model.values}
        roc = {m: c for m, c in roc.items() if c[0].size}
        if roc:
            out[f"ROC curves · {d}"] = plots.roc_curves(roc, title=f"{d}: pooled voxel ROC over {n} test case(s)")
        pro = {m: pooled_curve(ds, d, m, "pro") for m in ds.model.values}
        pro = {m: c for m, c in pro.items() if c[0].size}
        if pro:
            out[f"PRO curves · {d}"] = plots.pro_curves(pro, max_fpr=max_fpr,
                                                        title=f"{d}: per-region overlap up to FPR {max_fpr:g}")
    return out


def scatter_figure(ds, x: str = "lesion_volume_ml", metric: str = "auroc"):
    """Per-case ``metric`` against a case coordinate (lesion volume or contrast), one colour per method."""
    import plotly.graph_objects as go

    if x not in ds.coords:
        raise InputError("scatter_figure(x)", f"a case coordinate among {sorted(k for k in ds.coords if ds[k].dims == ('case',))}", repr(x))
    xs = np.asarray(ds[x].values, dtype=float)
    titles = {"lesion_volume_ml": "lesion volume (ml)", "lesion_contrast": "lesion contrast (preprocessed intensity)",
              "lesion_contrast_hu": "lesion contrast (HU)", "n_lesion_voxels": "lesion voxels"}
    label = str(ds.metric_label.sel(metric=metric).values)
    fig = go.Figure()
    for m in ds.model.values:
        ys = ds.per_case.sel(dict(model=m, metric=metric)).values
        keep = np.isfinite(xs) & np.isfinite(ys)
        text = [f"{c} ({k})" for c, k in zip(ds.case.values[keep], ds.lesion_kind.values[keep])]
        fig.add_trace(go.Scatter(x=xs[keep], y=ys[keep], mode="markers", name=str(m), text=text,
                                 hovertemplate="%{text}<br>x=%{x:.3g}<br>" + label + "=%{y:.3f}<extra>" + str(m) + "</extra>",
                                 marker=dict(size=9, opacity=0.8)))
    fig.update_layout(title=f"per-case {label} vs {titles.get(x, x)}", xaxis_title=titles.get(x, x),
                      yaxis_title=label, height=420, margin=dict(l=60, r=20, t=50, b=40),
                      xaxis_type="log" if x in ("lesion_volume_ml", "n_lesion_voxels") else "linear")
    return fig


def contrast_coordinate(ds) -> str:
    """``lesion_contrast_hu`` when every case with a lesion has it (all phantoms), else the measured one."""
    has = np.asarray(ds.n_lesion_voxels.values) > 0
    hu = np.asarray(ds.lesion_contrast_hu.values, float)[has]
    return "lesion_contrast_hu" if hu.size and np.isfinite(hu).all() else "lesion_contrast"


def lesion_slices(label: np.ndarray, per_case: int = 2) -> list[tuple[int, int, int, int]]:
    """Largest 26-connected lesion components first: (i, j, k) of the component voxel nearest its
    centroid (so the slice cuts the lesion even when it is not convex) and its size in voxels."""
    from scipy import ndimage

    lab = np.asarray(label) > 0
    cc, n = ndimage.label(lab, ndimage.generate_binary_structure(3, 3))
    if n == 0:
        return []
    sizes = np.bincount(cc.ravel())[1:]
    out = []
    for k in np.argsort(-sizes, kind="stable")[:per_case]:
        vox = np.argwhere(cc == k + 1)
        centre = vox[np.argmin(((vox - vox.mean(0)) ** 2).sum(1))]
        out.append((int(centre[0]), int(centre[1]), int(centre[2]), int(sizes[k])))
    return out


def gallery_figure(run_dir: str | Path, ds, method: str | None = None, *, per_case: int = 2,
                   max_panels: int = 24, cols: int = 3, half_width_mm: float = 60.0):
    """Axial slices through the lesions (largest components first) with the GT outline and ``method``'s map.

    Each panel is cropped to ``half_width_mm`` around its lesion (the report stays small).

    ``method`` defaults to :func:`best_method`; the map is drawn from the validation
    threshold up (so what is coloured is what the method calls lesion). Returns
    None when no test case has both a lesion and a saved map.
    """
    from ..data.cohort import load_case
    from . import plots

    run_dir = Path(run_dir)
    method = method or best_method(ds)
    if method is None:
        return None
    thr = float(ds.threshold.sel(dict(model=method)))
    images, overlays, labels, titles, spacings = [], [], [], [], []
    for cid in ds.case.values:
        if len(images) >= max_panels:
            break
        path = RunDir(run_dir).stage_dir("evaluate", create=False) / "maps_pre" / method / f"{cid}.npy"
        if not path.is_file():
            continue
        case = load_case(str(cid), run_dir)
        if case.label is None or not np.any(case.label):
            continue
        amap = np.load(path).astype(np.float32)
        auroc = float(ds.per_case.sel(dict(case=cid, model=method, metric="auroc")))
        for i, j, k, size in lesion_slices(case.label, per_case):
            if len(images) >= max_panels:
                break
            hi, hj = (max(1, int(round(half_width_mm / sp))) for sp in case.spacing[:2])
            win = (slice(max(0, i - hi), i + hi + 1), slice(max(0, j - hj), j + hj + 1), k)
            images.append(np.asarray(case.image[win]))
            overlays.append(amap[win])
            labels.append(np.asarray(case.label[win]))
            spacings.append(case.spacing)
            titles.append(f"{cid} z={k}, {size} vox, AUROC {auroc:.2f}")
    if not images:
        return None
    if not math.isfinite(thr):
        thr = float(np.nanpercentile(np.concatenate([o.ravel() for o in overlays]), 99))
    return plots.slices_grid(images, titles, plane="axial", spacing=spacings, overlays=overlays, labels=labels,
                             overlay_threshold=thr, cols=min(cols, len(images)), panel_height=320,
                             title=f"lesions (green outline) and the {method} map above its validation threshold "
                                   f"{thr:.3g}")


def froc_figures(ds) -> dict:
    """Lesion-level FROC curves per dataset: sensitivity against false-positive regions per scan."""
    import plotly.graph_objects as go

    if "froc_fp_per_scan" not in ds:
        return {}
    out = {}
    for d in ds.dataset.values:
        fig = go.Figure()
        for m in ds.model.values:
            x = ds.froc_fp_per_scan.sel(dataset=d, model=m).values
            y = ds.froc_sensitivity_curve.sel(dataset=d, model=m).values
            keep = np.isfinite(x) & np.isfinite(y)
            if not keep.any():
                continue
            order = np.argsort(x[keep], kind="stable")
            cpm = float(ds.froc_cpm.sel(dataset=d, model=m))
            fig.add_scatter(x=x[keep][order], y=y[keep][order], mode="lines+markers", name=f"{m} (CPM {cpm:.2f})")
        if not fig.data:
            continue
        for rate in ds.fp_rate.values:
            fig.add_vline(x=float(rate), line=dict(dash="dot", color="lightgray"))
        fig.update_layout(title=f"{d}: lesions found against false-positive regions per scan",
                          xaxis=dict(type="log", title="false-positive regions per scan"),
                          yaxis=dict(range=[0, 1.02], title="fraction of lesions hit"), height=400,
                          margin=dict(l=60, r=20, t=50, b=40))
        out[f"FROC · {d}"] = fig
    return out


def evaluation_figures(run_dir: str | Path, ds) -> dict:
    """Every figure of the report: curves, FROC, scatters, gallery (heading -> plotly figure)."""
    figs = curve_figures(ds)
    figs.update(froc_figures(ds))
    if ds.sizes["case"]:
        figs["AUROC vs lesion volume"] = scatter_figure(ds, "lesion_volume_ml")
        figs["AUROC vs lesion contrast"] = scatter_figure(ds, contrast_coordinate(ds))
    gallery = gallery_figure(run_dir, ds)
    if gallery is not None:
        figs["Gallery of lesions"] = gallery
    return figs
