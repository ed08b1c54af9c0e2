"""Evaluation results: their schema, save / load ``eval/metrics.nc``, tables, ``compare``, maps for the viewer.

* The schema (below; :data:`METRICS`, :data:`RESULTS_FORMAT`, :func:`metric_labels`): what
  :class:`screener_nb.evaluation.Evaluation` produces and every reader reads.
* :func:`load` (the reader to use), :func:`save_results` / :func:`load_results`: the ``xr.Dataset``
  as netCDF (h5netcdf engine), written atomically; loading checks it is ours.
* Tables of a results Dataset: :func:`pooled_frame`, :func:`per_case_frame`, :func:`froc_frame`,
  :func:`operating_frame`, :func:`run_summary`, :func:`baseline_ladder`; :func:`best_method`.
* :data:`PAPER_TABLE2`, :data:`PAPER_TABLE3` and :func:`paper_table`: our pooled
  numbers in the layout of the paper's Tables 2-3, with the paper's numbers
  alongside -- for reference only: they are on LIDC, MIDRC, KiTS and LiTS
  after 300k training steps on ~32k CTs, not on this run's data.
* :func:`main_compare`: ``python -m screener_nb compare runs/a runs/b [--html f]``.
* :func:`load_case_maps`: one evaluated case with every method's map, for
  :func:`screener_nb.viz.viewer.explore` (its default ``loader``).

Metrics (exact, from :mod:`screener_nb.metrics`; ``metric`` coordinate):

=============  ==============================================================
``auroc``      voxel AUROC, lesion vs normal body voxels
``pauroc``     area under the ROC for FPR in [0, max_fpr] divided by max_fpr
               (the paper's AUROC@0.3; NOT sklearn's McClish-corrected value:
               a random score gets max_fpr / 2 = 0.15 here, 0.5 there)
``aupro``      MVTec per-region overlap in 3D (26-connected lesion
               components), integrated to max_fpr, divided by max_fpr
``dice``       Dice of ``map >= threshold``, the threshold chosen on the
               validation cases only (``threshold_rule``), never on the test case
``best_dice``  best Dice over all thresholds chosen on the evaluated cases
               themselves: an UPPER BOUND, not a result
=============  ==============================================================

A metric that is undefined (a case without lesion voxels in the body has no
AUROC) is NaN and its reason is recorded in ``per_case_note`` / ``pooled_note``
-- never 0.5.

Results layout (``xr.Dataset``, saved as ``eval/metrics.nc`` with the h5netcdf engine)::

    dims:  case (test cases, cohort order), model (one per method), metric, dataset (pooled groups), curve_point
    data variables
      per_case       (case, model, metric)      float64  metrics of each case alone
      per_case_note  (case, model, metric)      str      why a value is NaN ("" when defined)
      pooled         (dataset, model, metric)   float64  pooled over the dataset's labelled test
                                                          cases (one ROC over all their voxels: the paper's protocol)
      pooled_note    (dataset, model, metric)   str
      threshold      (model)                    float64  Dice threshold chosen on the validation cases
      threshold_note (model)                    str
      n_cases        (dataset)                  int64    labelled test cases pooled per dataset
      roc_fpr, roc_tpr     (dataset, model, curve_point)   pooled ROC vertices (NaN-padded)
      pro_fpr, pro_overlap (dataset, model, curve_point)   pooled PRO-curve vertices (NaN-padded)
    coordinates
      case_dataset (case)       the case's dataset (named so because ``dataset`` is the pooled dim)
      lesion_kind (case)        comma-joined lesion kinds ("" without lesion)
      lesion_volume_ml (case)   summed lesion volume: the phantom's recorded ``volume_ml`` where
                                every lesion has one, else measured from the label
      lesion_contrast (case)    measured: mean preprocessed intensity (CLAHE'd [0, 1]) inside the
                                label minus that of a ``shell_voxels``-thick shell around it (body only)
      lesion_contrast_hu (case) mean of the phantoms' recorded ``contrast_hu`` (NaN where unknown)
      n_lesion_voxels (case)    lesion voxels inside the body mask (preprocessed grid)
      metric_label (metric)     "AUROC", "AUROC@0.3", "AUPRO@0.3", "Dice", "best Dice (upper bound)"
    attrs: format, run, profile, max_fpr, threshold_rule, threshold_percentile, connectivity,
           n_val_cases, package, version, timestamp

Selecting a value: the dimension of the methods is ``model`` (``method`` is a keyword
of xarray's ``.sel``), so ``ds.pooled.sel(dataset="phantoms", model="learned-flow",
metric="auroc")`` works; :func:`screener_nb.results.load` also reads files of format 1,
whose dimension was still called ``method``.

Two contrasts: the measured contrast (in preprocessed
intensity units, comparable across every case) and the phantoms' recorded
contrast in HU are two coordinates instead of one mixed-unit coordinate.
Evaluation happens on the preprocessed grid (where the maps are computed and
the ROI lives); the NIfTI maps on the original grid are for viewing elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import files
from .errors import ConfigError, InputError
from .rundir import RunDir
from .stages import get as get_stage

RESULTS_FILE = "metrics.nc"
REQUIRED_VARIABLES = ("per_case", "pooled", "threshold")
PAPER_DATASETS = ("LIDC", "MIDRC", "KiTS", "LiTS")
SOURCE_RUN = "this run"
SOURCE_TABLE2 = "paper Table 2 (other data)"
SOURCE_TABLE3 = "paper Table 3, ablation (other data)"

#: the metrics of the results (``metric`` coordinate), in the paper's order
METRICS = ("auroc", "pauroc", "aupro", "dice", "best_dice")
RESULTS_FORMAT = "screener_nb.evaluation/2"
#: earlier formats :func:`load_results` still reads (format 1: dim ``method``)
READABLE_FORMATS = ("screener_nb.evaluation/1", RESULTS_FORMAT)
#: vertices kept per pooled ROC / PRO curve
CURVE_POINTS = 1000
#: the two thresholds the results report Dice and lesion-level detection at
OPERATING_POINTS = ("validation", "calibrated")
OPERATING_METRICS = ("dice", "lesion_sensitivity", "fp_per_scan", "normal_flagged")
#: coordinates along ``case`` and their dtypes (object = str)
CASE_COORDS = {"case_dataset": object, "lesion_kind": object, "lesion_volume_ml": np.float64,
               "lesion_contrast": np.float64, "lesion_contrast_hu": np.float64, "n_lesion_voxels": np.int64}
BEST_DICE_NOTE = ("best Dice is the largest Dice over all thresholds, the threshold being chosen on the "
                  "evaluated cases' own labels: an UPPER BOUND that no real use can reach, shown only to say how "
                  "much of the gap to it comes from the threshold. The honest number is Dice, whose threshold "
                  "comes from the validation cases. Labels are incomplete (only the target pathology is "
                  "annotated), so both underestimate.")


def metric_labels(max_fpr: float = 0.3) -> list[str]:
    """Display names of :data:`METRICS` (the paper's: AUROC, AUROC@0.3, AUPRO@0.3, Dice)."""
    return ["AUROC", f"AUROC@{max_fpr:g}", f"AUPRO@{max_fpr:g}", "Dice", "best Dice (upper bound)"]


def _paper_frame(rows: dict[str, dict[str, Sequence[float]]]) -> pd.DataFrame:
    cols = pd.MultiIndex.from_tuples([(m, d) for m in next(iter(rows.values())) for d in PAPER_DATASETS],
                                     names=["metric", "dataset"])
    data = [[v for m in r for v in r[m]] for r in rows.values()]
    return pd.DataFrame(data, index=pd.Index(list(rows), name="method"), columns=cols)


#: v1 Table 2 (docs/method.md): AUROC | AUROC@0.3 | AUPRO@0.3 on LIDC, MIDRC, KiTS, LiTS.
PAPER_TABLE2 = _paper_frame({
    "Autoencoder": {"auroc": (.71, .65, .66, .68), "pauroc": (.31, .21, .24, .25), "aupro": (.59, .24, .26, .37)},
    "f-AnoGAN": {"auroc": (.82, .66, .67, .67), "pauroc": (.52, .21, .24, .22), "aupro": (.46, .18, .24, .22)},
    "DRAEM": {"auroc": (.63, .72, .82, .83), "pauroc": (.21, .31, .50, .51), "aupro": (.17, .20, .50, .57)},
    "MOOD-Top1": {"auroc": (.79, .79, .77, .80), "pauroc": (.43, .43, .40, .46), "aupro": (.32, .29, .40, .32)},
    "MSFlow": {"auroc": (.70, .66, .64, .64), "pauroc": (.26, .20, .18, .17), "aupro": (.21, .14, .19, .17)},
    "Screener": {"auroc": (.96, .87, .90, .93), "pauroc": (.88, .64, .68, .80), "aupro": (.65, .40, .67, .63)},
})

#: v1 Table 3 (ablation, VICReg d32), AUROC only; index = the paper's wording.
PAPER_TABLE3 = _paper_frame({
    "no condition + Gaussian": {"auroc": (.81, .81, .61, .71)},
    "sin-cos + Gaussian": {"auroc": (.82, .80, .74, .77)},
    "masking-invariant + Gaussian": {"auroc": (.96, .84, .87, .90)},
    "no condition + flow": {"auroc": (.96, .89, .88, .93)},
    "masking-invariant + flow": {"auroc": (.96, .87, .90, .93)},
})

#: our method name -> the paper's Table 3 row (learned-flow is also Table 2's "Screener").
TABLE3_METHODS = {
    "none-gaussian": "no condition + Gaussian",
    "sincos-gaussian": "sin-cos + Gaussian",
    "learned-gaussian": "masking-invariant + Gaussian",
    "none-flow": "no condition + flow",
    "learned-flow": "masking-invariant + flow",
}


# --------------------------------------------------------------------------- save / load
def save_results(ds, path: str | Path) -> Path:
    """Write the results Dataset as netCDF (h5netcdf) atomically: a tmp file, then a rename."""
    path = Path(path)
    with files.atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def _results_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    if p.is_file():
        return p
    if (p / RESULTS_FILE).is_file():  # the eval folder itself
        return p / RESULTS_FILE
    return RunDir(p).stage_dir("evaluate", create=False) / RESULTS_FILE


def load_results(run_dir: str | Path):
    """The evaluation results of a run (``<run>/eval/metrics.nc``; a run dir, its eval dir or the file).

    Raises:
        InputError: no such run, no results (the evaluate stage has not run), or a
            file that is not screener_nb's evaluation results.
    """
    import xarray as xr

    p = Path(run_dir)
    if not p.exists():
        raise InputError(run_dir, "a run directory", "no such file or directory")
    path = _results_path(p)
    if not path.is_file():
        raise InputError(run_dir, f"evaluation results ({Path('eval') / RESULTS_FILE})",
                         "none: run the evaluate stage first (notebook 06 or "
                         "`python -m screener_nb run --stages evaluate`)")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as f:
            ds = f.load()
    except Exception as e:  # h5py / netCDF parse errors of a foreign or truncated file
        raise InputError(path, "a netCDF file written by screener_nb's evaluate stage",
                         f"an unreadable file ({type(e).__name__}: {e})") from e
    fmt = ds.attrs.get("format")
    if fmt in READABLE_FORMATS and fmt != RESULTS_FORMAT and "method" in ds.dims:
        # format 1 named the methods' dimension ``method``, a keyword of ``.sel``
        ds = ds.rename({"method": "model"})
        ds.attrs["format"] = fmt = RESULTS_FORMAT
    missing = [v for v in REQUIRED_VARIABLES if v not in ds.variables]
    if fmt != RESULTS_FORMAT or missing:
        raise InputError(path, f"screener_nb evaluation results (attribute format={RESULTS_FORMAT!r}, variables "
                         f"{', '.join(REQUIRED_VARIABLES)})",
                         f"format={fmt!r}, variables {sorted(map(str, ds.data_vars))}")
    return ds


def load(run_dir: str | Path):
    """The evaluation results of a run as an ``xr.Dataset`` (layout: the module docstring).

    ``run_dir`` is a run directory, its ``eval`` folder or the ``metrics.nc`` file itself.
    The methods are the ``model`` dimension, the metrics the ``metric`` dimension, the
    pooled groups the ``dataset`` dimension:

    >>> import tempfile, types
    >>> import numpy as np
    >>> from screener_nb import evaluation, results
    >>> body = np.ones((8, 8, 8), bool)
    >>> label = np.zeros((8, 8, 8), np.uint8); label[2:5, 2:5, 2:5] = 1
    >>> case = types.SimpleNamespace(id="c0", dataset="phantoms", label=label, body=body,
    ...                              image=np.zeros((8, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0))
    >>> ds = evaluation.evaluate_maps({"learned-flow": {"c0": label + 0.1 * np.arange(512).reshape(8, 8, 8) / 512}},
    ...                             [case], None, [])
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = save_results(ds, run / "eval" / "metrics.nc")
    >>> ds = results.load(run)
    >>> round(float(ds.pooled.sel(dataset="phantoms", model="learned-flow", metric="auroc")), 6)
    1.0

    Raises:
        InputError: as :func:`load_results`.
    """
    return load_results(run_dir)


def main_method(ds) -> str:
    """The method a run leads with: its ``main_method`` attribute (evaluate parameter), else
    learned-flow (the paper's Screener), else the first method of the results."""
    names = [str(m) for m in ds.model.values]
    for name in (ds.attrs.get("main_method"), "learned-flow"):
        if name in names:
            return str(name)
    return names[0]


def display_thresholds(ds, maps: dict, body) -> dict[str, float]:
    """The threshold each map of ``maps`` (method -> (X, Y, Z) scores) is shown at: its Dice
    threshold chosen on the validation cases (the results' ``threshold``) where the results have
    a finite one, else the 99th percentile of the map inside ``body`` (a run without validation
    cases)."""
    body = np.asarray(body, bool)
    chosen = {}
    if "threshold" in ds:
        chosen = {str(m): float(v) for m, v in zip(ds.model.values, np.asarray(ds["threshold"].values, float))}
    return {m: chosen[m] if math.isfinite(chosen.get(m, math.nan)) else float(np.quantile(np.asarray(a)[body], 0.99))
            for m, a in maps.items()}


def run_summary(ds, main: str = "learned-flow") -> pd.DataFrame:
    """The end-of-run table: per dataset, the ``main`` method's pooled AUROC, AUROC@fpr,
    AUPRO@fpr and Dice, and the other method with the highest pooled AUROC beside it.

    Rows: datasets; columns: ``(metric label, main)`` then ``"best other"`` (its name) and
    ``(metric label, "best other")``. A ``main`` the run did not evaluate is a ConfigError.
    """
    methods = [str(m) for m in ds.model.values]
    if main not in methods:
        raise ConfigError(f"run summary: method {main!r} is not in these results (found {', '.join(methods)})")
    shown = METRICS[:4]
    labels = dict(zip(METRICS, metric_labels(float(ds.attrs.get("max_fpr", 0.3)))))

    def value(d, m, k):
        return float(ds.pooled.loc[{"dataset": d, "model": m, "metric": k}])

    rows = {}
    for d in (str(v) for v in ds.dataset.values):
        others = [m for m in methods if m != main and not math.isnan(value(d, m, "auroc"))]
        best = max(others, key=lambda m: value(d, m, "auroc")) if others else None
        row = {(labels[k], main): value(d, main, k) for k in shown}
        row[("best other", "")] = best or ""
        row.update({(labels[k], "best other"): value(d, best, k) if best else math.nan for k in shown})
        rows[d] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    df.index.name = "dataset"
    return df


#: notebook 06's ladder: each rung adds one part of Screener to the one above it
LADDER = (
    ("zscore", "intensity z-score"),
    ("init-gaussian", "random-init descriptor + Gaussian"),
    ("none-gaussian", "SSL descriptor + Gaussian"),
    ("sincos-gaussian", "+ sin-cos position condition"),
    ("learned-gaussian", "+ learned condition (instead of sin-cos)"),
    ("learned-flow", "+ flow (instead of the Gaussian): the paper's Screener"),
    ("learned-residual", "+ the context's own residual (instead of the descriptor's density)"),
)


def baseline_ladder(ds, metrics: Sequence[str] = ("auroc", "aupro")) -> pd.DataFrame:
    """The rungs of :data:`LADDER` this run evaluated, in order: pooled ``metrics`` per dataset.

    Rows: ``(rung, method)``; columns: ``(metric label, dataset)``. Rungs the run did not evaluate
    are left out (a run without a distilled student or a residual density has fewer)."""
    labels = dict(zip(METRICS, (str(v) for v in ds.metric_label.values))) if "metric_label" in ds.coords else \
        {k: k for k in METRICS}
    unknown = [k for k in metrics if k not in METRICS]
    if unknown:
        raise ConfigError(f"baseline ladder: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    names = [str(m) for m in ds.model.values]
    rows = {}
    for method, rung in LADDER:
        if method in names:
            rows[(rung, method)] = {(labels[k], str(d)): float(ds.pooled.loc[{"dataset": d, "model": method, "metric": k}])
                                    for k in metrics for d in ds.dataset.values}
    df = pd.DataFrame.from_dict(rows, orient="index")
    if len(df):
        df.index = pd.MultiIndex.from_tuples(df.index, names=["rung", "method"])
        df.columns = pd.MultiIndex.from_tuples(df.columns, names=["metric", "dataset"])
    return df


# --------------------------------------------------------------------------- the paper-style table
def paper_table(ds, *, include_paper: bool = True) -> pd.DataFrame:
    """Pooled metrics in the layout of the paper's Tables 2-3, the paper's numbers alongside.

    Rows: ``(source, method)``: this run's methods, then (``include_paper``) the
    paper's Table 2 methods and Table 3 ablation rows (named "<paper wording>
    [<our method>]"). Columns: ``(metric, dataset)`` with the metric's display
    label (AUROC, AUROC@0.3, AUPRO@0.3, Dice, best Dice (upper bound)); this
    run's datasets first, then LIDC, MIDRC, KiTS, LiTS for the paper's rows.
    Empty cells are NaN. The paper's numbers are on other data: a reference
    for the order of magnitude and the ranking, not a target.
    """
    labels = dict(zip(METRICS, (str(v) for v in ds.metric_label.values))) if "metric_label" in ds.coords else \
        dict(zip(METRICS, metric_labels(float(ds.attrs.get("max_fpr", 0.3)))))
    paper_labels = dict(zip(METRICS, metric_labels(0.3)))
    ours = [str(d) for d in ds.dataset.values]
    columns: list[tuple[str, str]] = []
    for k in METRICS:
        columns += [(labels[k], d) for d in ours]
        if include_paper and k in ("auroc", "pauroc", "aupro"):
            columns += [(paper_labels[k], d) for d in PAPER_DATASETS if (paper_labels[k], d) not in columns]
    # keep one block per metric label (labels differ when this run's max_fpr is not 0.3)
    order = list(dict.fromkeys(c[0] for c in columns))
    columns = [c for lab in order for c in columns if c[0] == lab]
    rows: dict[tuple[str, str], dict] = {}
    for m in ds.model.values:
        rows[(SOURCE_RUN, str(m))] = {(labels[k], str(d)): float(ds.pooled.sel(dict(dataset=d, model=m, metric=k)))
                                      for k in METRICS for d in ds.dataset.values}
    if include_paper:
        for name, r in PAPER_TABLE2.iterrows():
            rows[(SOURCE_TABLE2, name)] = {(paper_labels[k], d): v for (k, d), v in r.items()}
        ours_of = {v: k for k, v in TABLE3_METHODS.items()}
        for name, r in PAPER_TABLE3.iterrows():
            rows[(SOURCE_TABLE3, f"{name} [{ours_of[name]}]")] = {(paper_labels[k], d): v for (k, d), v in r.items()}
    df = pd.DataFrame([[row.get(c, math.nan) for c in columns] for row in rows.values()],
                      index=pd.MultiIndex.from_tuples(list(rows), names=["source", "method"]),
                      columns=pd.MultiIndex.from_tuples(columns, names=["metric", "dataset"]))
    return df


def styled(df: pd.DataFrame, digits: int = 2):
    """A notebook display of a results table: ``digits`` decimals, empty cells blank."""
    return df.style.format(precision=digits, na_rep="")


# --------------------------------------------------------------------------- compare
def compare_frame(results: dict[str, Any]) -> pd.DataFrame:
    """Pooled metrics of several runs: rows (dataset, method), column groups per run, then differences.

    ``results``: run name -> results Dataset (first = reference). Difference groups
    are named "<run> - <first run>".
    """
    names = list(results)
    first = results[names[0]]
    labels = [str(v) for v in first.metric_label.values] if "metric_label" in first.coords else list(METRICS)
    keys: list[tuple[str, str]] = []
    for ds in results.values():
        keys += [(str(d), str(m)) for d in ds.dataset.values for m in ds.model.values]
    keys = list(dict.fromkeys(keys))

    def values(ds, d, m):
        if d in ds.dataset.values and m in ds.model.values:
            return [float(ds.pooled.sel(dict(dataset=d, model=m, metric=k))) for k in METRICS]
        return [math.nan] * len(METRICS)

    blocks = {n: np.array([values(ds, d, m) for d, m in keys]).reshape(len(keys), len(METRICS))
              for n, ds in results.items()}
    data, cols = [], []
    for n in names:
        data.append(blocks[n])
        cols += [(n, lab) for lab in labels]
    for n in names[1:]:
        data.append(blocks[n] - blocks[names[0]])
        cols += [(f"{n} - {names[0]}", lab) for lab in labels]
    return pd.DataFrame(np.concatenate(data, axis=1) if data else None,
                        index=pd.MultiIndex.from_tuples(keys, names=["dataset", "method"]),
                        columns=pd.MultiIndex.from_tuples(cols, names=["run", "metric"]))


def compare_figure(results: dict[str, Any]):
    """Grouped bars: one panel per metric, bars per run, x = dataset/method."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = compare_frame(results)
    names = list(results)
    labels = list(dict.fromkeys(c[1] for c in df.columns))
    x = [f"{d} / {m}" for d, m in df.index]
    fig = make_subplots(rows=len(METRICS), cols=1, shared_xaxes=True, subplot_titles=labels, vertical_spacing=0.04)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for r, lab in enumerate(labels, start=1):
        for i, n in enumerate(names):
            fig.add_trace(go.Bar(x=x, y=df[(n, lab)].values, name=n, legendgroup=n, showlegend=r == 1,
                                 marker_color=palette[i % len(palette)]), row=r, col=1)
        fig.update_yaxes(range=[0, 1], row=r, col=1)
    fig.update_layout(barmode="group", height=230 * len(labels) + 80, title="pooled metrics per run",
                      margin=dict(l=60, r=20, t=70, b=120))
    return fig


def main_compare(runs: list[str], html: str | None = None) -> int:
    """``python -m screener_nb compare runs/a runs/b [...] [--html out.html]``: print (and plot) side by side.

    Raises InputError naming the run when one has no (valid) results.
    """
    if len(runs) < 2:
        raise ConfigError(f"compare: expected two or more run directories, found {len(runs)}: {runs}")
    if len(set(map(str, runs))) != len(runs):
        raise ConfigError(f"compare: a run is given twice in {runs}")
    short = [Path(r).name or str(r) for r in runs]
    names = short if len(set(short)) == len(short) else [str(r) for r in runs]  # column groups
    results = {name: load_results(r) for name, r in zip(names, runs)}
    for (name, ds), r in zip(results.items(), runs):
        print(f"{name} = {r}: profile {ds.attrs.get('profile') or '?'}, {ds.sizes['case']} test case(s), "
              f"methods {', '.join(map(str, ds.model.values))}, evaluated {ds.attrs.get('timestamp', '?')}")
    fprs = {n: float(ds.attrs.get("max_fpr", math.nan)) for n, ds in results.items()}
    if len(set(fprs.values())) > 1:
        print(f"note: the runs use different max_fpr ({fprs}); partial metrics are not comparable")
    df = compare_frame(results)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(df.to_string(float_format=lambda v: f"{v:.3f}", na_rep="-"))
    if html:
        from .viz.plots import to_html

        path = to_html(compare_figure(results), html, title=f"compare: {' vs '.join(results)}")
        print(f"figure: {path}")
    return 0


# --------------------------------------------------------------------------- maps for the viewer
@dataclass
class CaseMaps:
    """One evaluated case on its preprocessed grid, with every method's anomaly map.

    Attributes: id, dataset, image (X, Y, Z) in [0, 1], body (bool), label (uint8 or None),
    spacing (mm), anomaly_maps (method -> float32 (X, Y, Z)), thresholds (method -> Dice
    threshold chosen on the validation cases, when the results are there).
    """

    id: str
    dataset: str
    image: np.ndarray
    body: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    anomaly_maps: dict[str, np.ndarray] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


def _run_dir_of(path: str | Path) -> Path:
    p = Path(path)
    if p.name == get_stage("evaluate").folder and (p / "maps_pre").is_dir():
        return p.parent
    return p


def load_case_maps(run_dir: str | Path, case_id: str | None = None, methods: str | Sequence[str] | None = None) -> CaseMaps:
    """A test case of an evaluated run with its maps from ``eval/maps_pre`` (the viewer's run loader).

    Args:
        run_dir: the run (or its ``eval`` folder).
        case_id: a case id; None or "" -> the first test case.
        methods: None -> every method with a map of this case; else names (list or comma string).
    """
    from .data.cohort import load_case, load_cohort

    run = _run_dir_of(run_dir)
    if not run.is_dir():
        raise InputError(run_dir, "a run directory", "no such directory")
    if not case_id:
        test = load_cohort(run, role="test")
        if not test:
            raise InputError(run / "data" / "index.json", "at least one test case", "none")
        case = test[0]
    else:
        case = load_case(str(case_id), run)
    pre_dir = RunDir(run).stage_dir("evaluate", create=False) / "maps_pre"
    have = sorted(p.parent.name for p in pre_dir.glob(f"*/{case.id}.npy"))
    thresholds = {}
    try:
        ds = load_results(run)
        order = [str(m) for m in ds.model.values]
        have = [m for m in order if m in have] + [m for m in have if m not in order]
        thresholds = {str(m): float(ds.threshold.sel(dict(model=m))) for m in ds.model.values}
    except InputError:
        pass
    if not have:
        raise InputError(pre_dir, f"anomaly maps of case {case.id} (run the evaluate stage, notebook 06)", "none")
    if methods is None:
        chosen = have
    else:
        chosen = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
        unknown = [m for m in chosen if m not in have]
        if unknown:
            raise InputError(pre_dir, f"methods among {', '.join(have)} for case {case.id}", ", ".join(unknown))
    maps = {}
    for m in chosen:
        path = pre_dir / m / f"{case.id}.npy"
        try:
            arr = np.load(path)
        except (ValueError, OSError) as e:
            raise InputError(path, "a readable .npy anomaly map", f"a corrupt file ({type(e).__name__}: {e})") from e
        if arr.shape != case.shape:
            raise InputError(path, f"a map of the case's preprocessed shape {case.shape}", f"shape {arr.shape}")
        maps[m] = arr.astype(np.float32)
    return CaseMaps(id=case.id, dataset=case.dataset, image=np.asarray(case.image), body=np.asarray(case.body, bool),
                    label=None if case.label is None else np.asarray(case.label), spacing=tuple(case.spacing),
                    anomaly_maps=maps, thresholds={m: thresholds[m] for m in chosen if m in thresholds})


__all__ = ["PAPER_TABLE2", "PAPER_TABLE3", "TABLE3_METHODS", "CaseMaps", "compare_figure", "compare_frame",
           "load_case_maps", "load_results", "main_compare", "paper_table", "save_results", "styled"]


# --------------------------------------------------------------------------- tables of a results Dataset
def best_method(ds, metric: str = "auroc") -> str | None:
    """The method with the highest pooled ``metric`` averaged over datasets (None if all undefined)."""
    vals = ds.pooled.sel(metric=metric).values  # (dataset, method)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(vals, axis=0) if vals.size else np.array([])
    if mean.size == 0 or not np.isfinite(mean).any():
        return None
    return str(ds.model.values[int(np.nanargmax(mean))])


def pooled_frame(ds):
    """``pooled`` as a DataFrame: rows (dataset, method), columns metric labels."""
    import pandas as pd

    rows = {}
    for d in ds.dataset.values:
        for m in ds.model.values:
            rows[(str(d), str(m))] = ds.pooled.sel(dict(dataset=d, model=m)).values
    df = pd.DataFrame.from_dict(rows, orient="index", columns=[str(v) for v in ds.metric_label.values])
    df.index = pd.MultiIndex.from_tuples(df.index, names=["dataset", "method"]) if len(df) else df.index
    return df


def per_case_frame(ds, metric: str = "auroc"):
    """One row per case: coordinates, ``metric`` per method, and the notes of undefined values."""
    import pandas as pd

    df = pd.DataFrame({k: ds[k].values for k in ("case_dataset", "lesion_kind", "n_lesion_voxels",
                                                  "lesion_volume_ml", "lesion_contrast", "lesion_contrast_hu")},
                      index=pd.Index(ds.case.values, name="case"))
    for m in ds.model.values:
        df[str(m)] = ds.per_case.sel(dict(model=m, metric=metric)).values
    notes = ["; ".join(sorted({str(n) for n in ds.per_case_note.sel(case=c, metric=metric).values if str(n)}))
             for c in ds.case.values]
    df["note"] = notes
    return df


def froc_frame(ds):
    """Lesion-level sensitivity at 1/8 ... 8 false positives per scan and the CPM: rows (dataset, method)."""
    import pandas as pd

    rows = {}
    for d in ds.dataset.values:
        for m in ds.model.values:
            v = ds.froc_sensitivity.sel(dataset=d, model=m).values
            rows[(str(d), str(m))] = [*v, float(ds.froc_cpm.sel(dataset=d, model=m))]
    cols = [f"{r:g} FP/scan" for r in ds.fp_rate.values] + ["CPM"]
    df = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
    df.index = pd.MultiIndex.from_tuples(df.index, names=["dataset", "method"]) if len(df) else df.index
    return df


def operating_frame(ds):
    """Dice and lesion-level detection at the validation Dice threshold and at the label-free one."""
    import pandas as pd

    labels = {"dice": "Dice", "lesion_sensitivity": "lesions hit", "fp_per_scan": "FP regions / scan",
              "normal_flagged": "normal voxels flagged"}
    rows = {}
    for d in ds.dataset.values:
        for m in ds.model.values:
            rows[(str(d), str(m))] = {(str(p), labels[str(k)]): float(ds.operating.sel(
                dataset=d, model=m, operating_point=p, operating_metric=k)) for p in ds.operating_point.values
                for k in ds.operating_metric.values}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.columns = pd.MultiIndex.from_tuples(df.columns, names=["threshold", "metric"])
    df.index = pd.MultiIndex.from_tuples(df.index, names=["dataset", "method"]) if len(df) else df.index
    return df
