"""The two pictures of an evaluated run for a README or a slide, as small PNGs.

``python -m screener_nb figures runs/demo docs/`` writes

* ``anomaly_map.png``: axial, coronal and sagittal slices of one labelled test case
  through its largest lesion, the main method's anomaly map overlaid (transparent
  below the method's validation-chosen threshold) and the ground truth outlined;
* ``curves.png``: the pooled ROC and PRO curves of a few methods, one row per dataset.

The PNGs come from kaleido (:func:`screener_nb.viz.plots.save_png`), which needs a
Chromium; without one each figure is written as an HTML file and a warning says so.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..rundir import RunDir
from .plots import lesion_centre

#: the curves drawn beside the main method, where the run has them
CURVE_BASELINES = ("none-gaussian", "sincos-gaussian", "zscore")


def _main_method(ds, method: str | None) -> str:
    names = [str(m) for m in ds.model.values]
    if method:
        if method not in names:
            raise InputError("--method", f"one of the run's methods ({', '.join(names)})", repr(method))
        return method
    from ..results import main_method

    return main_method(ds)


def _labelled_case(run: Path, ds, case_id: str | None) -> str:
    """The requested case, else the first real (non-phantom) labelled test case, else the first labelled one."""
    if case_id:
        return case_id
    lesion_voxels = dict(zip(map(str, ds.case.values), ds.n_lesion_voxels.values))
    datasets = dict(zip(map(str, ds.case.values), map(str, ds.case_dataset.values)))
    labelled = [c for c, n in lesion_voxels.items() if n > 0]
    if not labelled:
        raise InputError(RunDir(run).stage_dir("evaluate", create=False) / "metrics.nc", "at least one test case with lesion voxels", "none")
    real = [c for c in labelled if datasets[c] != "phantoms"]
    return (real or labelled)[0]


def anomaly_map_figure(run_dir: str | Path, case_id: str | None = None, method: str | None = None):
    """Orthogonal slices of one test case through its largest lesion, map overlaid, truth outlined."""
    from ..results import load_case_maps, load_results
    from . import plots

    run = Path(run_dir)
    ds = load_results(run)
    method = _main_method(ds, method)
    case = load_case_maps(run, _labelled_case(run, ds, case_id), methods=[method])
    if case.label is None or not np.any(case.label):
        raise InputError(f"case {case.id}", "a test case with a lesion label", "no lesion voxel")
    centre = lesion_centre(case.label)
    amap = np.asarray(case.anomaly_maps[method], np.float32)
    thr = case.thresholds.get(method, float("nan"))
    if not np.isfinite(thr):  # no validation threshold: show the top 1 % of body voxels
        thr = float(np.quantile(amap[np.asarray(case.body, bool)], 0.99))
    auroc = float(ds.per_case.sel(case=case.id, model=method, metric="auroc"))
    title = f"{case.id} ({case.dataset}): {method} anomaly map above its threshold, lesion outlined (AUROC {auroc:.2f})"
    return plots.orthogonal_slices(case.image, amap, case.label, centre, case.spacing, window=(0.0, 1.0),
                                   overlay_threshold=thr, title=title, height=360)


def curves_figure(run_dir: str | Path, methods: Sequence[str] | None = None):
    """Pooled ROC (left) and PRO (right) curves, one row per dataset, for a few methods."""
    import plotly.colors
    from plotly.subplots import make_subplots

    from .eval_figures import pooled_curve
    from ..results import load_results
    from . import plots

    ds = load_results(run_dir)
    names = [str(m) for m in ds.model.values]
    main = _main_method(ds, None)
    methods = list(methods) if methods else [main] + [m for m in (*CURVE_BASELINES, "student") if m in names and m != main]
    max_fpr = float(ds.attrs.get("max_fpr", 0.3))
    datasets = [str(d) for d in ds.dataset.values]
    fig = make_subplots(rows=len(datasets), cols=2, horizontal_spacing=0.08, vertical_spacing=0.12,
                        subplot_titles=[t for d in datasets for t in (f"{d}: pooled voxel ROC",
                                                                         f"{d}: per-region overlap (PRO)")])
    palette = plotly.colors.qualitative.Plotly
    for r, d in enumerate(datasets, start=1):
        for k, m in enumerate(methods):
            for c, (kind, area_to) in enumerate((("roc", None), ("pro", max_fpr)), start=1):
                x, y = pooled_curve(ds, d, m, kind)
                if not x.size:
                    continue
                tag = (f"AUROC {plots.curve_area(x, y, None):.2f}" if kind == "roc"
                       else f"AUPRO@{max_fpr:g} {plots.curve_area(x, y, max_fpr):.2f}")
                fig.add_scatter(x=x, y=y, mode="lines", row=r, col=c, line=dict(color=palette[k % len(palette)]),
                                name=f"{m}", legendgroup=m, showlegend=(r == 1 and c == 1),
                                hovertemplate=f"{m} ({tag})<extra></extra>")
            fig.update_xaxes(range=[0, max_fpr], row=r, col=2)
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"), row=r, col=1,
                        name="chance", showlegend=(r == 1), hoverinfo="skip")
    fig.update_xaxes(title_text="false positive rate")
    fig.update_yaxes(range=[0, 1.01])
    fig.update_layout(height=300 * len(datasets) + 80, width=900, margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.08))
    return fig


def write_run_figures(run_dir: str | Path, out_dir: str | Path, *, case_id: str | None = None,
                      method: str | None = None) -> list[Path]:
    """Write ``anomaly_map.png`` and ``curves.png`` of an evaluated run to ``out_dir``; return the paths."""
    from .plots import save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [save_png(anomaly_map_figure(run_dir, case_id, method), out / "anomaly_map.png", width=1000, height=360),
            save_png(curves_figure(run_dir), out / "curves.png")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener_nb figures",
                                 description="The README's two figures of an evaluated run, as PNGs.")
    ap.add_argument("run", help="an evaluated run directory, e.g. runs/demo")
    ap.add_argument("out", help="folder to write anomaly_map.png and curves.png into, e.g. docs/")
    ap.add_argument("--case", default=None, help="test case to show (default: the first real labelled one)")
    ap.add_argument("--method", default=None, help="method whose map to show (default: the run's main method)")
    args = ap.parse_args(argv)
    for p in write_run_figures(args.run, args.out, case_id=args.case, method=args.method):
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KiB)")
    return 0
