"""The evaluation stage (notebook 06): every method's metrics, results in xarray, figures, the report.

Two layers, so the metrics can be checked without any trained model:

* **Pure evaluation of given maps** -- :class:`Evaluation` (a streaming
  accumulator: ``set_threshold`` per method from the VALIDATION maps, then
  ``add`` one test map at a time, ``finish`` -> ``xr.Dataset``) and
  :func:`evaluate_maps`, its one-call form on ``{method: {case_id: map}}``.
  Maps are (X, Y, Z) anomaly scores on the case's preprocessed grid, higher =
  more anomalous; the ROI is the body mask; lesion voxels are ``label > 0``.
* **The stage** -- :func:`run_evaluation` builds every method's maps from a run
  directory (``Screener.from_run``, the :func:`zscore_baseline`, the distilled
  student), streams them through an :class:`Evaluation` (one case's maps in
  memory at a time; the pooled accumulators keep their sorted normal scores on
  disk, ``spill_dir``), writes each test map as NIfTI on the ORIGINAL scan grid
  and as a compact float16 copy on the preprocessed grid (for the viewer), then
  saves ``eval/metrics.nc``, the figures and ``eval/report.html``. All density
  methods of a run are scored in one sliding-window pass
  (:class:`JointDensityScorer`: the shared descriptor and condition encoders run
  once per window instead of once per method; the maps are bit-identical to
  ``Screener.score_preprocessed``).

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

import html as _html
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import files
from .errors import ConfigError, InputError
from .progress import report

METRICS = ("auroc", "pauroc", "aupro", "dice", "best_dice")
THRESHOLD_RULES = ("dice", "normal_percentile")
RESULTS_FORMAT = "screener_nb.evaluation/2"
#: earlier formats :func:`screener_nb.results.load_results` still reads (format 1: dim ``method``)
READABLE_FORMATS = ("screener_nb.evaluation/1", RESULTS_FORMAT)
#: reference methods that are not a (condition, density) pair: the raw-intensity z-score and the
#: random-init descriptor's Gaussian (:mod:`screener_nb.baselines`)
BASELINES = ("zscore", "init-gaussian")
CURVE_POINTS = 1000
#: FROC: thresholds per method (quantiles of its validation maps), smallest region counted (ml)
FROC_THRESHOLDS = 24
FROC_MIN_REGION_ML = 0.1
#: label-free threshold: the fraction of healthy body voxels it flags
CALIBRATION_RATE = 1e-3
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


# --------------------------------------------------------------------------- the raw-intensity baseline
@dataclass(frozen=True)
class ZScoreBaseline:
    """Raw-intensity baseline: score = |x - mean| / std of preprocessed body intensities.

    The absolute value because pathology can be brighter (nodules, contrast-
    enhancing tumours) or darker (hypodense liver and kidney tumours, ground-glass
    against soft tissue) than normal tissue: a signed z-score would rank one of
    the two kinds as the most normal voxels of all. ``mean``/``std`` are pooled
    over every body voxel of the training cases (one number each for the whole
    body, lungs and soft tissue together: that is what makes it a weak
    baseline -- it knows intensities, not anatomy).
    Same interface as :class:`~screener_nb.inference.Screener`.
    """

    mean: float
    std: float
    method: str = "zscore"

    def score_preprocessed(self, image: np.ndarray, body: np.ndarray, spacing=None, **_: Any) -> np.ndarray:
        """(X, Y, Z) float32 map; outside the body set to the map's minimum (as Screener does)."""
        image = np.asarray(image, dtype=np.float32)
        body = np.asarray(body, dtype=bool)
        if body.shape != image.shape:
            raise InputError("zscore baseline", f"a body mask of the image's shape {image.shape}", f"shape {body.shape}")
        score = np.abs(image - np.float32(self.mean)) / np.float32(self.std)
        if body.any():
            score[~body] = score[body].min()
        return score.astype(np.float32, copy=False)


def zscore_baseline(train_cases: Iterable[Any]) -> ZScoreBaseline:
    """Fit :class:`ZScoreBaseline` on training cases (objects with ``.image``, ``.body``), streaming."""
    n, s, ss = 0, 0.0, 0.0
    for c in train_cases:
        body = np.asarray(c.body, dtype=bool)
        v = np.asarray(c.image)[body].astype(np.float64)
        n, s, ss = n + v.size, s + float(v.sum()), ss + float(np.dot(v, v))
    if n < 2:
        raise InputError("zscore baseline", "training cases with body voxels", f"{n} body voxel(s)")
    mean = s / n
    std = math.sqrt(max(ss / n - mean * mean, 0.0))
    if not std > 0:
        raise InputError("zscore baseline", "training intensities that vary", f"a constant body intensity {mean:g}")
    return ZScoreBaseline(mean, std)


# --------------------------------------------------------------------------- methods of a run
def available_methods(run_dir: str | Path) -> list[str]:
    """Every method a run can evaluate: fitted densities, ``zscore``, ``init-gaussian`` (when the
    descriptor stage is done), ``student`` (when distilled).

    Densities are the folders ``density/<condition>-<density>/model.json``
    (in the order of :meth:`~screener_nb.methods.Method.all`).
    """
    from .methods import Method

    run_dir = Path(run_dir)
    out = [str(m) for m in Method.all() if (run_dir / "density" / str(m) / "model.json").is_file()]
    out += [b for b in BASELINES if b == "zscore" or (run_dir / "descriptor" / "DONE").exists()]
    if (run_dir / "distill" / "DONE").exists():
        out.append("student")
    return out


def resolve_methods(run_dir: str | Path, methods: str | Sequence[str] = "all") -> list[str]:
    """``"all"`` -> :func:`available_methods`; a comma list -> checked against them (ConfigError)."""
    known = available_methods(run_dir)
    if isinstance(methods, str):
        if methods.strip() == "all":
            return known
        names = [m.strip() for m in methods.split(",") if m.strip()]
    else:
        names = list(methods)
    if not names:
        raise ConfigError(f"parameter 'methods': expected 'all' or a comma list of {', '.join(known)}, found {methods!r}")
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ConfigError(f"parameter 'methods': unknown method(s) {', '.join(unknown)} for run {run_dir}; "
                          f"known: {', '.join(known)} (or 'all')")
    return list(dict.fromkeys(names))


def make_scorer(run_dir: str | Path, method: str, *, device: str = "auto", overlap: float = 0.5,
                sw_batch: int = 2) -> Any:
    """An object with ``.method`` and ``.score_preprocessed(image, body, spacing)`` for one method."""
    from .data.cohort import load_cohort

    if method == "zscore":
        return zscore_baseline(load_cohort(run_dir, role="train"))
    if method == "init-gaussian":
        from .baselines import init_descriptor_gaussian

        return init_descriptor_gaussian(run_dir, device=device, overlap=overlap, sw_batch=sw_batch)
    from .inference import Screener

    if method == "student":
        return Screener.from_run(run_dir, student=True, device=device, overlap=overlap, sw_batch=sw_batch)
    from .methods import Method

    if method.count("-") != 1:
        raise ConfigError(f"method {method!r}: expected <condition>-<density>, {', '.join(BASELINES)} or student")
    m = Method.parse(method)
    return Screener.from_run(run_dir, m.density, m.condition, device=device, overlap=overlap, sw_batch=sw_batch)


# --------------------------------------------------------------------------- per-case lesion description
def lesion_coords(case: Any, lesions: Sequence[Mapping] | None = None, *, shell_voxels: int = 2) -> dict:
    """Coordinates of one case along ``case`` (see module docstring).

    Args:
        case: object with ``label`` (X, Y, Z) or None, ``body``, ``image`` (preprocessed), ``spacing`` (mm),
            ``dataset``, ``lesion_kinds``.
        lesions: the case's entries of ``data/lesions.json`` (dicts with at least "kind"; phantoms
            also "volume_ml", "contrast_hu", ...).
        shell_voxels: thickness of the shell around the lesion the measured contrast compares against.
    """
    from scipy import ndimage

    lesions = list(lesions or [])
    kinds = sorted({str(les["kind"]) for les in lesions if les.get("kind")} or set(getattr(case, "lesion_kinds", []) or []))
    out = {"case_dataset": str(case.dataset), "lesion_kind": ",".join(kinds), "lesion_volume_ml": math.nan,
           "lesion_contrast": math.nan, "lesion_contrast_hu": math.nan, "n_lesion_voxels": 0}
    hu = [float(les["contrast_hu"]) for les in lesions if _is_number(les.get("contrast_hu"))]
    if hu:
        out["lesion_contrast_hu"] = float(np.mean(hu))
    if case.label is None:
        return out
    lab = np.asarray(case.label) > 0
    body = np.asarray(case.body, dtype=bool)
    out["n_lesion_voxels"] = int(np.count_nonzero(lab & body))
    vols = [les.get("volume_ml") for les in lesions]
    if vols and all(_is_number(v) for v in vols):
        out["lesion_volume_ml"] = float(sum(float(v) for v in vols))
    else:
        out["lesion_volume_ml"] = float(np.count_nonzero(lab)) * float(np.prod(case.spacing)) / 1000.0
    if lab.any():
        idx = np.argwhere(lab)
        lo = np.maximum(idx.min(0) - shell_voxels - 1, 0)
        hi = np.minimum(idx.max(0) + shell_voxels + 2, lab.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        inside = lab[box]
        shell = ndimage.binary_dilation(inside, iterations=shell_voxels) & ~inside & body[box]
        if shell.any():
            img = np.asarray(case.image[box], dtype=np.float64)
            out["lesion_contrast"] = float(img[inside].mean() - img[shell].mean())
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(float(v))


# --------------------------------------------------------------------------- the pure evaluation
class Evaluation:
    """Streaming evaluation of anomaly maps: thresholds from validation cases, metrics of test cases.

    >>> ev = Evaluation(["m"], test_cases, lesions)                # doctest: +SKIP
    >>> ev.set_threshold("m", val_maps, val_cases)                 # doctest: +SKIP
    >>> for c in test_cases: ev.add("m", c, map_of(c))             # doctest: +SKIP
    >>> ds = ev.finish()                                           # doctest: +SKIP

    Args:
        methods: method names (the ``method`` dimension, in this order).
        cases: the test cases (``.id``, ``.dataset``, ``.image``, ``.body``, ``.label``, ``.spacing``).
        lesions: case id -> list of lesion dicts (``data/lesions.json``); optional.
        max_fpr: FPR limit of the partial AUROC and AUPRO (paper 0.3).
        threshold_rule: "dice" (the best pooled Dice on the validation cases) or
            "normal_percentile" (``percentile`` of the validation cases' normal body voxels).
        percentile: for "normal_percentile" (99.5: this package's default, not a paper value).
        connectivity: lesion-region neighbourhood of AUPRO (26 default).
        spill_dir: keep the pooled accumulators' sorted normal scores as memory-mapped
            files under this folder (hundreds of CTs); None keeps them in RAM.
        curve_points: vertices kept per pooled ROC / PRO curve (for figures).
    """

    def __init__(self, methods: Sequence[str], cases: Sequence[Any], lesions: Mapping[str, Any] | None = None, *,
                 max_fpr: float = 0.3, threshold_rule: str = "dice", percentile: float = 99.5,
                 connectivity: int = 26, spill_dir: str | Path | None = None, curve_points: int = CURVE_POINTS,
                 shell_voxels: int = 2, froc_min_region_ml: float = FROC_MIN_REGION_ML,
                 calibration_rate: float = CALIBRATION_RATE):
        from .metrics import _check_max_fpr

        self.max_fpr = _check_max_fpr(max_fpr)
        if threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(f"threshold_rule: expected one of {', '.join(THRESHOLD_RULES)}, found {threshold_rule!r}")
        self.methods = list(dict.fromkeys(methods))
        if not self.methods:
            raise ConfigError("Evaluation: expected at least one method, found none")
        self.case_ids = [str(c.id) for c in cases]
        if len(set(self.case_ids)) != len(self.case_ids):
            dup = sorted({i for i in self.case_ids if self.case_ids.count(i) > 1})
            raise InputError("Evaluation(cases)", "unique case ids", f"duplicates {dup}")
        self.threshold_rule, self.percentile, self.connectivity = threshold_rule, float(percentile), connectivity
        self.spill_dir, self.curve_points = spill_dir, int(curve_points)
        lesions = lesions or {}
        self.coords = {str(c.id): lesion_coords(c, lesions.get(str(c.id)), shell_voxels=shell_voxels) for c in cases}
        self.datasets = list(dict.fromkeys(str(c.dataset) for c in cases))
        shape = (len(self.case_ids), len(self.methods), len(METRICS))
        self.per_case = np.full(shape, np.nan)
        self.per_case_note = np.full(shape, "", dtype=object)
        self.thresholds = {m: math.nan for m in self.methods}
        self.threshold_notes = {m: "threshold not chosen yet (call set_threshold)" for m in self.methods}
        self._threshold_set: set[str] = set()
        self._acc: dict[tuple[str, str], Any] = {}
        self._added: set[tuple[str, str]] = set()
        self.n_val_cases = 0
        # lesion-level detection and label-free thresholds
        if not 0.0 < float(calibration_rate) < 1.0:
            raise ConfigError(f"calibration_rate: expected a fraction in (0, 1), found {calibration_rate!r}")
        self.froc_min_region_ml, self.calibration_rate = float(froc_min_region_ml), float(calibration_rate)
        self.froc_grid: dict[str, np.ndarray] = {}
        self._froc: dict[tuple[str, str], Any] = {}
        self.calibrated = {m: math.nan for m in self.methods}
        self.calibrated_notes = {m: "no healthy calibration case (call set_calibration)" for m in self.methods}
        # (dataset, method, operating point) -> voxel counts: tp, predicted, lesion, flagged normal, normal
        self._op_counts: dict[tuple[str, str, str], np.ndarray] = {}
        self.n_calib_cases = 0

    # -- thresholds
    def set_threshold(self, method: str, val_maps: Sequence[Any], val_cases: Sequence[Any]) -> float:
        """Choose ``method``'s Dice threshold on validation maps (never on test cases); return it (NaN: none)."""
        from .metrics import threshold_from_validation

        self._check_method(method)
        val_maps, val_cases = list(val_maps), list(val_cases)
        if len(val_maps) != len(val_cases):
            raise InputError(f"validation maps of {method}", f"one map per validation case ({len(val_cases)})",
                             f"{len(val_maps)} maps")
        self.n_val_cases = max(self.n_val_cases, len(val_cases))
        value, note = math.nan, ""
        rois = [np.asarray(c.body, dtype=bool) for c in val_cases]
        if val_maps:  # the FROC's thresholds: quantiles of the validation maps, never the test maps
            from .metrics import PooledFROC

            self.froc_grid[method] = PooledFROC.quantile_thresholds(val_maps, rois, n=FROC_THRESHOLDS)
        if self.threshold_rule == "dice":
            keep = [i for i, c in enumerate(val_cases) if c.label is not None]
            if not keep:
                note = "no labelled validation case: the Dice threshold cannot be chosen (Dice left undefined)"
            else:
                try:
                    value = threshold_from_validation([val_maps[i] for i in keep],
                                                      [np.asarray(val_cases[i].label) > 0 for i in keep],
                                                      [rois[i] for i in keep], criterion="dice")
                except InputError as e:
                    note = f"validation cases give no threshold: {e}"
        else:
            if not val_cases:
                note = "no validation case: the Dice threshold cannot be chosen (Dice left undefined)"
            else:
                # a validation case without a label is taken as healthy: the rule needs only normal tissue
                labels = [np.zeros(np.shape(m), bool) if c.label is None else np.asarray(c.label) > 0
                          for m, c in zip(val_maps, val_cases)]
                try:
                    value = threshold_from_validation(val_maps, labels, rois, criterion="normal_percentile",
                                                      percentile=self.percentile)
                except InputError as e:
                    note = f"validation cases give no threshold: {e}"
        self.set_threshold_value(method, value, note)
        return value

    def set_threshold_value(self, method: str, value: float, note: str = "") -> None:
        """Use a given threshold (e.g. from another run's validation cases); NaN needs a ``note``."""
        from .metrics import PooledMetrics

        self._check_method(method)
        if any(m == method for m, _ in self._added):
            raise ConfigError(f"threshold of {method}: set it before adding that method's test maps")
        value = float(value)
        self.thresholds[method] = value
        self.threshold_notes[method] = "" if math.isfinite(value) else (note or "no threshold")
        self._threshold_set.add(method)
        for d in self.datasets:
            self._acc[(d, method)] = PooledMetrics(
                connectivity=self.connectivity, dice_threshold=value if math.isfinite(value) else None,
                spill_dir=self.spill_dir)

    def set_calibration(self, method: str, healthy_maps: Sequence[Any], healthy_cases: Sequence[Any]) -> float:
        """The label-free threshold of ``method``: the score that flags ``calibration_rate`` of the
        body voxels of held-out healthy scans (pooled); return it (NaN with a note when there are none).

        Such a threshold needs no labelled case: "about 0.1 % of healthy tissue is flagged".
        """
        from .metrics import calibrate_threshold

        self._check_method(method)
        if any(m == method for m, _ in self._added):
            raise ConfigError(f"calibration of {method}: set it before adding that method's test maps")
        healthy_maps, healthy_cases = list(healthy_maps), list(healthy_cases)
        self.n_calib_cases = max(self.n_calib_cases, len(healthy_cases))
        if not healthy_cases:
            self.calibrated[method] = math.nan
            self.calibrated_notes[method] = "no healthy calibration case in the cohort (data stage: n_calib)"
            return math.nan
        value = calibrate_threshold(healthy_maps, [np.asarray(c.body, bool) for c in healthy_cases],
                                    self.calibration_rate, unit="voxel")
        self.calibrated[method], self.calibrated_notes[method] = float(value), ""
        return float(value)

    def _froc_for(self, dataset: str, method: str):
        """The dataset's FROC accumulator of ``method``, made at its first test case: its thresholds
        are the validation grid plus the two operating points (Dice threshold, calibrated one)."""
        from .metrics import PooledFROC

        key = (dataset, method)
        if key not in self._froc:
            points = [v for v in (self.thresholds[method], self.calibrated[method]) if math.isfinite(v)]
            grid = np.concatenate([self.froc_grid.get(method, np.empty(0)), points])
            self._froc[key] = (PooledFROC(grid, min_region_ml=self.froc_min_region_ml,
                                          connectivity=self.connectivity) if grid.size else None)
        return self._froc[key]

    # -- test cases
    def add(self, method: str, case: Any, map_: Any) -> None:
        """Evaluate one test case's map (X, Y, Z) and add it to its dataset's pooled accumulator."""
        from .metrics import PooledMetrics, dice

        self._check_method(method)
        cid = str(case.id)
        if cid not in self.coords:
            raise InputError(f"Evaluation.add({method})", f"a case among the {len(self.case_ids)} test cases",
                             repr(cid))
        if method not in self._threshold_set:
            raise ConfigError(f"Evaluation.add: set {method}'s threshold first (set_threshold on validation cases)")
        if (cid, method) in self._added:
            raise InputError(f"Evaluation.add({method})", "each case once", f"case {cid} twice")
        scores = map_.array if hasattr(map_, "array") else map_
        scores = np.asarray(scores)
        if scores.shape != tuple(np.shape(case.body)):
            raise InputError(f"map {method}/{cid}", f"the case's preprocessed shape {tuple(np.shape(case.body))}",
                             f"shape {scores.shape}")
        i, j = self.case_ids.index(cid), self.methods.index(method)
        body = np.asarray(case.body, dtype=bool)
        row, note = self.per_case[i, j], self.per_case_note[i, j]
        if case.label is None:
            note[:] = "no label for this case: every metric is undefined"
            self._added.add((cid, method))
            return
        lab = np.asarray(case.label) > 0
        n_pos = int(np.count_nonzero(lab & body))
        n_neg = int(np.count_nonzero(body)) - n_pos
        ranking = [0, 1, 2, 4]  # auroc, pauroc, aupro, best_dice
        if n_pos == 0 or n_neg == 0:
            why = ("no lesion voxel inside the body mask" if n_pos == 0 else "no normal voxel inside the body mask")
            for k in ranking:
                note[k] = f"{why}: {METRICS[k]} undefined" + (" (reported as NaN, not 0.5)" if k < 2 else "")
        else:
            acc = PooledMetrics(connectivity=self.connectivity)
            acc.update(scores, lab, body, name=cid)
            r = acc.compute(self.max_fpr)
            row[0], row[1], row[2] = r.auroc, r.pauroc, r.aupro
            row[4] = acc.best_dice().dice
            del acc
        thr = self.thresholds[method]
        if math.isfinite(thr):
            try:
                row[3] = dice(scores, lab, thr, roi=body)
            except InputError:
                note[3] = "no lesion voxel and no voxel above the threshold: Dice undefined"
        else:
            note[3] = f"no validation threshold ({self.threshold_notes[method]})"
        self._acc[(str(case.dataset), method)].update(scores, lab, body, name=cid)
        froc = self._froc_for(str(case.dataset), method)
        if froc is not None:
            froc.update(scores, lab, body, spacing=tuple(case.spacing), name=cid)
        for point, thr in zip(OPERATING_POINTS, (self.thresholds[method], self.calibrated[method])):
            if math.isfinite(thr):
                pred = (scores >= thr) & body
                tp, n_pred = int(np.count_nonzero(pred & lab)), int(np.count_nonzero(pred))
                counts = self._op_counts.setdefault((str(case.dataset), method, point), np.zeros(5, np.int64))
                counts += (tp, n_pred, n_pos, n_pred - tp, n_neg)
        self._added.add((cid, method))

    # -- results
    def finish(self, attrs: Mapping[str, Any] | None = None):
        """The results as an ``xr.Dataset`` (module docstring); frees the pooled accumulators."""
        import xarray as xr

        from . import __version__

        missing = [(c, m) for m in self.methods for c in self.case_ids if (c, m) not in self._added]
        for c, m in missing:  # a method not evaluated on a case: say so rather than leave a silent NaN
            i, j = self.case_ids.index(c), self.methods.index(m)
            self.per_case_note[i, j] = ["map not evaluated"] * len(METRICS)
        nd, nm, nk, npt = len(self.datasets), len(self.methods), len(METRICS), self.curve_points
        pooled = np.full((nd, nm, nk), np.nan)
        pooled_note = np.full((nd, nm, nk), "", dtype=object)
        curves = {k: np.full((nd, nm, npt), np.nan) for k in ("roc_fpr", "roc_tpr", "pro_fpr", "pro_overlap")}
        n_cases = np.zeros(nd, np.int64)
        for a, d in enumerate(self.datasets):
            for b, m in enumerate(self.methods):
                acc = self._acc.get((d, m))
                if acc is None or acc.n_cases == 0:
                    pooled_note[a, b] = "no labelled test case evaluated"
                    continue
                n_cases[a] = max(n_cases[a], acc.n_cases)
                try:
                    r = acc.compute(self.max_fpr)
                except InputError as e:
                    pooled_note[a, b] = f"undefined (not 0.5): {e}"
                    continue
                pooled[a, b, :3] = r.auroc, r.pauroc, r.aupro
                if r.dice is not None:
                    pooled[a, b, 3] = r.dice
                else:
                    pooled_note[a, b, 3] = f"no validation threshold ({self.threshold_notes[m]})"
                pooled[a, b, 4] = acc.best_dice().dice
                for kind, (kx, ky) in (("roc", ("roc_fpr", "roc_tpr")), ("pro", ("pro_fpr", "pro_overlap"))):
                    x, y = acc.curve(kind, max_points=npt)
                    curves[kx][a, b, : x.size], curves[ky][a, b, : y.size] = x, y
        self._acc.clear()  # removes spilled files

        from .metrics import FROC_FP_RATES

        froc_points = max([f.thresholds.size for f in self._froc.values() if f is not None] or [1])
        froc_at = np.full((nd, nm, len(FROC_FP_RATES)), np.nan)
        froc_cpm = np.full((nd, nm), np.nan)
        froc_curve = {k: np.full((nd, nm, froc_points), np.nan) for k in ("froc_threshold", "froc_fp_per_scan",
                                                                           "froc_sensitivity_curve")}
        operating = np.full((nd, nm, len(OPERATING_POINTS), len(OPERATING_METRICS)), np.nan)
        for a, d in enumerate(self.datasets):
            for b, m in enumerate(self.methods):
                froc = self._froc.get((d, m))
                r = None
                if froc is not None and froc.n_lesions:
                    r = froc.compute(FROC_FP_RATES)
                    froc_at[a, b], froc_cpm[a, b] = r.sensitivity, r.cpm
                    n = r.thresholds.size
                    froc_curve["froc_threshold"][a, b, :n] = r.thresholds
                    froc_curve["froc_fp_per_scan"][a, b, :n] = r.curve_fp_per_scan
                    froc_curve["froc_sensitivity_curve"][a, b, :n] = r.curve_sensitivity
                for p, (point, thr) in enumerate(zip(OPERATING_POINTS, (self.thresholds[m], self.calibrated[m]))):
                    counts = self._op_counts.get((d, m, point))
                    if counts is None:
                        continue
                    tp, n_pred, n_pos, flagged, n_neg = (int(v) for v in counts)
                    operating[a, b, p, 0] = 2 * tp / (n_pos + n_pred) if n_pos + n_pred else np.nan
                    operating[a, b, p, 3] = flagged / n_neg if n_neg else np.nan
                    if r is not None:  # the threshold is one of the FROC's own
                        k = int(np.argmin(np.abs(r.thresholds - thr)))
                        operating[a, b, p, 1], operating[a, b, p, 2] = r.curve_sensitivity[k], r.curve_fp_per_scan[k]
        self._froc.clear()

        case_coords = {}
        for k, dtype in CASE_COORDS.items():
            case_coords[k] = ("case", np.asarray([self.coords[c][k] for c in self.case_ids], dtype=dtype))
        ds = xr.Dataset(
            data_vars={
                "per_case": (("case", "model", "metric"), self.per_case),
                "per_case_note": (("case", "model", "metric"), self.per_case_note.astype(str).astype(object)),
                "pooled": (("dataset", "model", "metric"), pooled),
                "pooled_note": (("dataset", "model", "metric"), pooled_note.astype(str).astype(object)),
                "threshold": (("model",), np.array([self.thresholds[m] for m in self.methods], float)),
                "threshold_note": (("model",), np.array([self.threshold_notes[m] for m in self.methods], object)),
                "n_cases": (("dataset",), n_cases),
                **{k: (("dataset", "model", "curve_point"), v) for k, v in curves.items()},
                "froc_sensitivity": (("dataset", "model", "fp_rate"), froc_at),
                "froc_cpm": (("dataset", "model"), froc_cpm),
                **{k: (("dataset", "model", "froc_point"), v) for k, v in froc_curve.items()},
                "calibrated_threshold": (("model",), np.array([self.calibrated[m] for m in self.methods], float)),
                "calibrated_threshold_note": (("model",), np.array([self.calibrated_notes[m] for m in self.methods],
                                                                   object)),
                "operating": (("dataset", "model", "operating_point", "operating_metric"), operating),
            },
            coords={
                "case": np.asarray(self.case_ids, dtype=object),
                "model": np.asarray(self.methods, dtype=object),
                "metric": np.asarray(METRICS, dtype=object),
                "dataset": np.asarray(self.datasets, dtype=object),
                "metric_label": ("metric", np.asarray(metric_labels(self.max_fpr), dtype=object)),
                "fp_rate": np.asarray(FROC_FP_RATES, float),
                "operating_point": np.asarray(OPERATING_POINTS, dtype=object),
                "operating_metric": np.asarray(OPERATING_METRICS, dtype=object),
                **case_coords,
            },
        )
        ds["per_case"].attrs["description"] = "metrics of each test case alone (NaN: see per_case_note)"
        ds["pooled"].attrs["description"] = ("metrics pooled over all voxels/regions of the dataset's labelled "
                                             "test cases (the paper's per-dataset numbers)")
        ds["threshold"].attrs["description"] = f"Dice threshold chosen on the validation cases ({self.threshold_rule})"
        ds["froc_sensitivity"].attrs["description"] = (
            "lesion-level sensitivity at most fp_rate false-positive regions per scan (metrics.PooledFROC: regions "
            f">= {self.froc_min_region_ml:g} ml, 26-connected, a hit needs >= 2 % of the region inside lesions)")
        ds["froc_cpm"].attrs["description"] = "mean of froc_sensitivity over the fp_rates (LUNA16's CPM)"
        ds["calibrated_threshold"].attrs["description"] = (
            f"label-free threshold: flags {self.calibration_rate:g} of the body voxels of held-out healthy scans")
        ds["operating"].attrs["description"] = (
            "at the validation Dice threshold and at the calibrated one: pooled Dice, lesion sensitivity, "
            "false-positive regions per scan, fraction of the test cases' normal body voxels flagged")
        ds["lesion_volume_ml"].attrs["units"] = "ml"
        ds["lesion_contrast"].attrs["units"] = "preprocessed intensity ([0, 1] after window and CLAHE)"
        ds["lesion_contrast_hu"].attrs["units"] = "HU"
        ds.attrs.update({
            "format": RESULTS_FORMAT, "package": "screener_nb", "version": __version__,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "max_fpr": self.max_fpr,
            "threshold_rule": self.threshold_rule, "threshold_percentile": self.percentile,
            "connectivity": int(self.connectivity), "n_val_cases": int(self.n_val_cases),
            "n_calib_cases": int(self.n_calib_cases), "calibration_rate": self.calibration_rate,
            "froc_min_region_ml": self.froc_min_region_ml,
            "run": "", "profile": "", "best_dice": "upper bound: threshold chosen on the evaluated cases themselves",
        })
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v)
        return ds

    def _check_method(self, method: str) -> None:
        if method not in self.methods:
            raise ConfigError(f"method {method!r} is not among this evaluation's methods: {', '.join(self.methods)}")


def evaluate_maps(maps_by_method: Mapping[str, Mapping[str, Any]], cases: Sequence[Any],
                  val_maps_by_method: Mapping[str, Mapping[str, Any]] | None, val_cases: Sequence[Any],
                  lesions: Mapping[str, Any] | None = None, max_fpr: float = 0.3, threshold_rule: str = "dice", *,
                  percentile: float = 99.5, attrs: Mapping[str, Any] | None = None,
                  spill_dir: str | Path | None = None):
    """Metrics of given maps (module docstring): per case, pooled per dataset, Dice at a validation threshold.

    Args:
        maps_by_method: ``{method: {case_id: (X, Y, Z) map}}`` for the test ``cases``. A lazy
            ``Mapping`` (loading a map on access) keeps one map in memory at a time.
        cases: test cases (``.id``, ``.dataset``, ``.image``, ``.body``, ``.label``, ``.spacing``).
        val_maps_by_method: ``{method: {case_id: map}}`` of the validation cases; the Dice
            threshold of each method is chosen on these only.
        val_cases: the validation cases.
        lesions: ``data/lesions.json`` content (case id -> list of lesion dicts).
        max_fpr, threshold_rule, percentile: see :class:`Evaluation`.

    Returns:
        ``xr.Dataset`` (layout in the module docstring).
    """
    ev = Evaluation(list(maps_by_method), cases, lesions, max_fpr=max_fpr, threshold_rule=threshold_rule,
                    percentile=percentile, spill_dir=spill_dir)
    val_maps_by_method = val_maps_by_method or {}
    for method, maps in maps_by_method.items():
        vm = val_maps_by_method.get(method, {})
        vcases = [c for c in val_cases if str(c.id) in vm]
        ev.set_threshold(method, [vm[str(c.id)] for c in vcases], vcases)
        for c in cases:
            if str(c.id) not in maps:
                raise InputError(f"maps of {method}", "a map for every test case", f"none for case {c.id}")
            ev.add(method, c, maps[str(c.id)])
    return ev.finish(attrs)


# --------------------------------------------------------------------------- one pass for all densities
class JointDensityScorer:
    """Several density methods of one run scored in ONE sliding-window pass.

    Why not ``Screener.score_preprocessed`` per method: every density of a run
    sits on the same frozen descriptor (and the ``learned`` ones on the same
    condition encoder), so six methods would run the descriptor six times on
    the same windows. Here each window's descriptor (and learned condition) is
    computed once, every density scores it, and MONAI stitches one channel per
    method. Each channel is that method's ``score_preprocessed`` map: same
    windows, Gaussian blending (linear, per channel), autocast and
    outside-the-body fill (tested against it).

    Args:
        screeners: method -> ``Screener`` built by ``Screener.from_run`` (they must
            share patch, pooling stride, spacing, device, overlap and sw_batch).
    """

    def __init__(self, screeners: Mapping[str, Any]):
        from .inference import FeatureExtractor

        if not screeners:
            raise ConfigError("JointDensityScorer: expected at least one density method")
        self.methods = list(screeners)
        first = next(iter(screeners.values()))
        for m, s in screeners.items():
            if s.extractor is None or s.density is None:
                raise ConfigError(f"JointDensityScorer: {m} is not a density method (no extractor/density)")
            if joint_key(s) != joint_key(first):
                raise ConfigError(f"JointDensityScorer: {m} differs from {self.methods[0]} in "
                                  f"patch / pooling / spacing / device / window settings: {joint_key(s)} vs {joint_key(first)}")
        self.patch, self.device = first.patch, first.device
        self.overlap, self.sw_batch = first.overlap, first.sw_batch
        ext0 = first.extractor
        learned = next((s.extractor for s in screeners.values() if s.extractor.condition_kind == "learned"), None)
        # one descriptor (and one condition encoder) for all: the per-method copies are dropped
        self.base = learned or FeatureExtractor(ext0.descriptor, "none", None, ext0.spacing, ext0.pool_stride)
        self.kinds = {m: s.extractor.condition_kind for m, s in screeners.items()}
        self.sincos = {m: FeatureExtractor(self.base.descriptor, "sincos", None, s.extractor.spacing,
                                           s.extractor.pool_stride, s.extractor.sincos_dim)
                       for m, s in screeners.items() if self.kinds[m] == "sincos"}
        self.densities = {m: s.density for m, s in screeners.items()}
        self.mode = first.mode
        self.extractors = {m: s.extractor for m, s in screeners.items()}

    def score_all(self, image: np.ndarray, body: np.ndarray, spacing, methods: Sequence[str] | None = None,
                  *, source: str = "volume") -> dict[str, np.ndarray]:
        """method -> (X, Y, Z) float32 map of a preprocessed image (in [0, 1]) on its own grid."""
        import torch
        from monai.inferers import sliding_window_inference

        from .models.density import upsample_scores
        from .runtime import autocast

        methods = list(methods or self.methods)
        image = np.asarray(image, dtype=np.float32)
        if not image.flags.writeable:  # a memory-mapped case: torch wants a writable buffer
            image = image.copy()
        body = np.asarray(body, dtype=bool)
        _check_image(image, body, self.patch, spacing, source)
        spacing_t = torch.tensor(tuple(spacing), dtype=torch.float64)
        if self.mode == "scan":
            from .inference import scan_scores

            x = torch.from_numpy(image)[None, None]
            with autocast(self.device):
                scored = scan_scores(self.base, {m: self.densities[m] for m in methods}, x, self.patch,
                                     self.overlap, self.sw_batch, extractors=self.extractors, body=body)
            maps = {}
            for m in methods:
                score = scored[m].numpy().astype(np.float32)
                score[~body] = score[body].min()
                maps[m] = score
            return maps

        def predictor(win, slices):
            starts = torch.tensor([[sl.start for sl in ss[2:]] for ss in slices], dtype=torch.float64)
            origin = starts * spacing_t
            with autocast(self.device):
                y, c_learned = self.base(win, origin)
                out = []
                for m in methods:
                    kind = self.kinds[m]
                    c = (c_learned if kind == "learned" else None if kind == "none"
                         else self.sincos[m].sincos(origin, tuple(y.shape[2:])).to(y.device, y.dtype))
                    nll = -self.densities[m].log_prob(y, c)
                    out.append(upsample_scores(nll, tuple(win.shape[2:])).float())
                return torch.stack(out, 1)

        with torch.inference_mode():
            out = sliding_window_inference(
                torch.from_numpy(image)[None, None], self.patch, self.sw_batch, predictor, overlap=self.overlap,
                mode="gaussian", sw_device=self.device, device=torch.device("cpu"), progress=False, with_coord=True)
        maps = {}
        for i, m in enumerate(methods):
            score = out[0, i].numpy().astype(np.float32)
            score[~body] = score[body].min()
            maps[m] = score
        return maps


def joint_key(screener: Any) -> tuple:
    """What density methods must share to be scored in one pass."""
    e = screener.extractor
    return (tuple(screener.patch), tuple(e.pool_stride), tuple(float(v) for v in e.spacing), str(screener.device),
            float(screener.overlap), int(screener.sw_batch), screener.mode)


def _check_image(image: np.ndarray, body: np.ndarray, patch, spacing, source: str) -> None:
    """The refusals of ``Screener.score_preprocessed``, for the joint pass."""
    if image.ndim != 3:
        raise InputError(source, "a 3D preprocessed image", f"shape {image.shape}")
    if body.shape != image.shape:
        raise InputError(source, f"a body mask of the image's shape {image.shape}", f"shape {body.shape}")
    if not np.isfinite(image).all():
        raise InputError(source, "finite intensities", f"{int((~np.isfinite(image)).sum())} NaN/inf voxels")
    if not body.any():
        raise InputError(source, "a body (voxels above the air threshold)", "none: the volume is all air")
    small = [i for i in range(3) if image.shape[i] < patch[i]]
    if small:
        raise InputError(source, f"a volume at least as large as the window {tuple(patch)} voxels (after "
                         f"preprocessing to {tuple(round(float(s), 2) for s in spacing)} mm)",
                         f"shape {image.shape} (too small along {', '.join('XYZ'[i] for i in small)})")


# --------------------------------------------------------------------------- the stage
def _map_paths(eval_dir: Path, method: str, case_id: str) -> dict[str, Path]:
    return {"cache": eval_dir / "cache" / method / f"{case_id}.npy",
            "nifti": eval_dir / "maps" / method / f"{case_id}.nii.gz",
            "pre": eval_dir / "maps_pre" / method / f"{case_id}.npy"}


def _source_stamp(run_dir: Path, method: str, overlap: float) -> dict:
    """What a cached map depends on: the producing stage's completion time and the window overlap."""
    stage = {"zscore": "data", "init-gaussian": "descriptor", "student": "distill"}.get(method, "density")
    done = run_dir / stage / "DONE"
    return {"model": method, "overlap": float(overlap),
            "stage_done_mtime_ns": done.stat().st_mtime_ns if done.exists() else None}


class MapSource:
    """Maps of a run's cases for several methods: from the resume cache when valid, else computed.

    Density methods are computed together (:class:`JointDensityScorer`), the baselines and
    ``student`` on their own; models are built on first need, so a fully cached
    stage loads none. Every computed map is first saved (float32, atomically) to
    ``eval/cache/<method>/<case>.npy``; ``get`` returns memory-mapped cache arrays.
    """

    def __init__(self, run_dir: Path, methods: Sequence[str], *, device: str = "auto", overlap: float = 0.5,
                 sw_batch: int = 2, progress: Callable[[str], None] | None = None):
        self.run_dir, self.eval_dir = Path(run_dir), Path(run_dir) / "eval"
        self.methods, self.progress = list(methods), progress
        self.cases_done, self.cases_expected = 0, 0  # for "case i/n" in the progress lines
        self.device, self.overlap, self.sw_batch = device, overlap, sw_batch
        self._scorers: dict[str, Any] = {}  # method -> scorer (a JointDensityScorer is shared by its methods)
        self.computed = self.reused = 0
        self.seconds = 0.0
        for m in self.methods:
            cache_dir = self.eval_dir / "cache" / m
            stamp = _source_stamp(self.run_dir, m, overlap)
            stamp_file = cache_dir / "stamp.json"
            if stamp_file.exists() and files.read_json(stamp_file) != stamp:
                shutil.rmtree(cache_dir)  # produced by another model or overlap: recompute
            if not stamp_file.exists():
                files.write_json(stamp_file, stamp)

    def _build(self, missing: Sequence[str]) -> None:
        todo = [m for m in missing if m not in self._scorers]
        solo = (*BASELINES, "student")  # each with its own model: not in the joint pass
        dens = [m for m in todo if m not in solo]
        for m in [m for m in todo if m in solo]:
            self._scorers[m] = make_scorer(self.run_dir, m, device=self.device, overlap=self.overlap,
                                           sw_batch=self.sw_batch)
            if isinstance(self._scorers[m], ZScoreBaseline):
                files.write_json(self.eval_dir / "zscore.json", {"mean": self._scorers[m].mean,
                                                                 "std": self._scorers[m].std})
        if dens:
            screeners = {m: make_scorer(self.run_dir, m, device=self.device, overlap=self.overlap,
                                        sw_batch=self.sw_batch) for m in dens}
            groups: dict[tuple, dict] = {}
            for m, s in screeners.items():
                groups.setdefault(joint_key(s), {})[m] = s
            for group in groups.values():
                joint = JointDensityScorer(group)
                for m in group:
                    self._scorers[m] = joint
            del screeners, groups

    def get(self, case: Any, *, write_maps: bool) -> dict[str, np.ndarray]:
        """method -> map (X, Y, Z) float32 of ``case``; with ``write_maps`` also its NIfTI and float16 copies."""
        paths = {m: _map_paths(self.eval_dir, m, str(case.id)) for m in self.methods}
        for m, p in paths.items():
            if p["cache"].is_file() and not self._cache_ok(p["cache"], case):
                p["cache"].unlink()
        missing = [m for m in self.methods if not paths[m]["cache"].is_file()]
        if missing:
            self._build(missing)
            t0 = time.perf_counter()
            done: set[str] = set()
            for m in missing:
                if m in done:
                    continue
                scorer = self._scorers[m]
                if isinstance(scorer, JointDensityScorer):
                    group = [n for n in missing if self._scorers[n] is scorer]
                    fresh = scorer.score_all(case.image, case.body, case.spacing, group, source=f"case {case.id}")
                else:
                    fresh = {m: np.asarray(scorer.score_preprocessed(case.image, case.body, case.spacing),
                                           dtype=np.float32)}
                for n, arr in fresh.items():
                    files.save_npy(paths[n]["cache"], arr)
                    done.add(n)
            dt = time.perf_counter() - t0
            self.seconds += dt
            if self.progress:
                self.cases_done += 1
                count = f" ({self.cases_done}/{self.cases_expected})" if self.cases_expected else ""
                self.progress(f"[eval] {case.id}{count}: {len(missing)} map(s) computed in {dt:.1f} s"
                              + (f", {len(self.methods) - len(missing)} reused" if len(missing) < len(self.methods) else ""))
        self.computed += len(missing)
        self.reused += len(self.methods) - len(missing)
        maps = {m: np.load(paths[m]["cache"], mmap_mode="r") for m in self.methods}
        if write_maps:
            from .data.io import write_nifti
            from .data.preprocess import to_original_volume

            for m, p in paths.items():
                if m in missing or not p["nifti"].is_file():
                    write_nifti(to_original_volume(np.asarray(maps[m]), case.record, mode="linear"), p["nifti"])
                if m in missing or not p["pre"].is_file():
                    files.save_npy(p["pre"], np.asarray(maps[m]).astype(np.float16))
        return maps

    @staticmethod
    def _cache_ok(path: Path, case: Any) -> bool:
        try:
            m = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            return False
        return m.shape == tuple(np.shape(case.body)) and m.dtype == np.float32

    def close(self) -> None:
        self._scorers.clear()


def _read_lesions(run_dir: Path) -> dict:
    path = run_dir / "data" / "lesions.json"
    if not path.is_file():
        return {}
    data = files.read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, "a mapping case id -> list of lesions", type(data).__name__)
    return data


def run_evaluation(cfg: Any, *, progress: Callable[[str], None] | None = report, threshold_rule: str = "dice",
                   keep_cache: bool = False, report: bool = True):
    """The evaluate stage: every method's maps of the run's val and test cases, metrics, maps, report.

    Reads ``cfg.run_dir``, ``cfg.methods`` ("all" or a comma list), ``cfg.device``,
    ``cfg.overlap``, ``cfg.sw_batch``, ``cfg.max_fpr`` (``config.resolve("evaluate")``).

    Order: the validation cases first (their maps choose each method's Dice
    threshold), then one test case at a time: every method's map, the per-case
    metrics and pooled accumulators updated, the maps written, the maps dropped.

    Writes under ``<run>/eval/``: ``maps/<method>/<case>.nii.gz`` (test maps on the
    original scan grid), ``maps_pre/<method>/<case>.npy`` (float16, preprocessed grid,
    for the viewer), ``metrics.nc``, ``report.html``. Resumable: every map is first
    written (float32, atomically) to ``cache/<method>/<case>.npy``; a re-run after an
    interruption reuses them instead of recomputing (the cache is invalidated when the
    producing stage or the overlap changed, and removed at the end unless ``keep_cache``).
    Scratch space while it runs: about 8 bytes per body voxel, method and case (the
    cache plus the pooled accumulators' spilled normal scores).
    The stage's ``DONE`` marker is left to the caller (the notebook writes it last).
    """
    from .data.cohort import load_cohort

    run_dir = Path(cfg.run_dir)
    files.require_stage(run_dir, "data")
    files.require_stage(run_dir, "density")
    methods = resolve_methods(run_dir, cfg.methods)
    test, val = load_cohort(run_dir, role="test"), load_cohort(run_dir, role="val")
    calib = load_cohort(run_dir, role="calib")
    if not test:
        raise InputError(run_dir / "data" / "index.json", "at least one test case", "none")
    lesions = _read_lesions(run_dir)
    eval_dir = files.stage_dir(run_dir, "eval")
    for stale in eval_dir.glob("metrics-*"):  # spilled scores of a killed earlier attempt
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    t_start = time.perf_counter()
    ev = Evaluation(methods, test, lesions, max_fpr=cfg.max_fpr, threshold_rule=threshold_rule, spill_dir=eval_dir,
                    froc_min_region_ml=getattr(cfg, "froc_min_region_ml", FROC_MIN_REGION_ML),
                    calibration_rate=getattr(cfg, "calibration_rate", CALIBRATION_RATE))
    source = MapSource(run_dir, methods, device=cfg.device, overlap=cfg.overlap, sw_batch=cfg.sw_batch,
                       progress=progress)
    source.cases_expected = len(val) + len(calib) + len(test)
    val_maps = [source.get(c, write_maps=False) for c in val]  # memory-mapped cache files
    for m in methods:
        thr = ev.set_threshold(m, [vm[m] for vm in val_maps], val)
        if progress:
            progress(f"[eval] {m}: Dice threshold {thr:.4g} chosen on {len(val)} validation case(s)"
                     + (f" ({ev.threshold_notes[m]})" if not math.isfinite(thr) else ""))
    del val_maps
    calib_maps = [source.get(c, write_maps=False) for c in calib]
    for m in methods:
        thr = ev.set_calibration(m, [cm[m] for cm in calib_maps], calib)
        if progress and calib:
            progress(f"[eval] {m}: label-free threshold {thr:.4g} flags {ev.calibration_rate:g} of the body voxels of "
                     f"{len(calib)} held-out healthy scan(s)")
    del calib_maps
    for c in test:
        maps = source.get(c, write_maps=True)
        for m in methods:
            ev.add(m, c, maps[m])
        del maps
    source.close()
    if progress:
        progress(f"[eval] {source.computed} map(s) computed in {source.seconds:.1f} s, {source.reused} reused")
    ds = ev.finish({"run": str(run_dir), "profile": getattr(cfg, "profile", ""), "overlap": float(cfg.overlap),
                    "main_method": str(getattr(cfg, "main_method", "learned-flow")),
                    "seconds": round(time.perf_counter() - t_start, 2), "map_seconds": round(source.seconds, 2),
                    "maps_computed": int(source.computed), "maps_reused": int(source.reused)})
    from .results import save_results

    save_results(ds, eval_dir / "metrics.nc")
    if report:
        write_report(run_dir, ds, evaluation_figures(run_dir, ds))
    if not keep_cache:
        shutil.rmtree(eval_dir / "cache", ignore_errors=True)
    if progress:
        progress(f"[eval] results: {eval_dir / 'metrics.nc'}" + (f", report: {eval_dir / 'report.html'}" if report else ""))
    return ds


# --------------------------------------------------------------------------- figures
def pooled_curve(ds, dataset: str, method: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The pooled ``kind`` ("roc" | "pro") curve of ``method`` on ``dataset``: (fpr, tpr or overlap), without the NaN padding."""
    kx, ky = ("roc_fpr", "roc_tpr") if kind == "roc" else ("pro_fpr", "pro_overlap")
    x = ds[kx].sel(dict(dataset=dataset, model=method)).values
    y = ds[ky].sel(dict(dataset=dataset, model=method)).values
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def curve_figures(ds) -> dict:
    """Pooled ROC and PRO curves per dataset, one line per method (from the results alone)."""
    from .viz import plots

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
    from .data.cohort import load_case
    from .viz import plots

    run_dir = Path(run_dir)
    method = method or best_method(ds)
    if method is None:
        return None
    thr = float(ds.threshold.sel(dict(model=method)))
    images, overlays, labels, titles, spacings = [], [], [], [], []
    for cid in ds.case.values:
        if len(images) >= max_panels:
            break
        path = run_dir / "eval" / "maps_pre" / method / f"{cid}.npy"
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


# --------------------------------------------------------------------------- the report
_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
        "pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}.note{color:#555}")


def _table_html(df, digits: int = 3) -> str:
    return df.to_html(float_format=lambda v: f"{v:.{digits}f}", na_rep="", border=0)


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


def write_report(run_dir: str | Path, ds, figures: Mapping[str, Any] | None = None) -> Path:
    """``<run>/eval/report.html``: tables, figures, parameters, environment -- one self-contained file.

    plotly.js is inlined once, gzip-compressed with the figures
    (:func:`screener_nb.viz.plots.offline_figures_html`); nothing is fetched from the
    network, so the file opens anywhere, offline.
    """
    from .results import paper_table
    from .viz import plots

    run_dir = Path(run_dir)
    figures = dict(figures or {})
    esc = _html.escape
    max_fpr = float(ds.attrs.get("max_fpr", 0.3))
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
             f"<title>screener_nb evaluation: {esc(run_dir.name)}</title>", f"<style>{_CSS}</style>",
             "</head><body>", f"<h1>Evaluation of run {esc(run_dir.name)}</h1>",
             f"<p class='note'>{esc(str(run_dir))} &middot; screener_nb {esc(str(ds.attrs.get('version', '')))} "
             f"&middot; {esc(str(ds.attrs.get('timestamp', '')))} &middot; profile {esc(str(ds.attrs.get('profile', '')))} "
             f"&middot; {ds.sizes['case']} test case(s), {int(ds.attrs.get('n_val_cases', 0))} validation case(s)</p>",
             "<h2>What the numbers mean</h2><ul>",
             "<li><b>AUROC</b>: probability that a random lesion voxel scores higher than a random normal voxel "
             "of the body (exact, over all voxels; pooled = one ROC over all voxels of a dataset's cases).</li>",
             f"<li><b>AUROC@{max_fpr:g}</b>: area under the ROC for false-positive rates up to {max_fpr:g}, "
             f"divided by {max_fpr:g} (the paper's normalisation; a random score gets {max_fpr / 2:g}, "
             "not sklearn's McClish-corrected 0.5).</li>",
             f"<li><b>AUPRO@{max_fpr:g}</b>: per-region overlap (each 3D lesion component counts once, whatever "
             f"its size) integrated up to FPR {max_fpr:g}, divided by {max_fpr:g}.</li>",
             f"<li><b>Dice</b>: overlap of <code>map &gt;= threshold</code> with the label, the threshold chosen on "
             f"the validation cases ({esc(str(ds.attrs.get('threshold_rule', '')))}), never on the test case.</li>",
             f"<li><b>best Dice (upper bound)</b>: {esc(BEST_DICE_NOTE)}</li></ul>"]
    parts += ["<h2>Paper-style table</h2>",
              "<p class='note'>Rows 'this run' are this run's pooled numbers on its own datasets; the paper's rows "
              "(v1 Tables 2 and 3) are for reference only: other data (LIDC, MIDRC, KiTS, LiTS), other scale.</p>",
              _table_html(paper_table(ds), 2)]
    parts += ["<h2>Pooled metrics per dataset</h2>", _table_html(pooled_frame(ds))]
    notes = [(str(d), str(m), str(k), str(ds.pooled_note.sel(dict(dataset=d, model=m, metric=k)).values))
             for d in ds.dataset.values for m in ds.model.values for k in ds.metric.values]
    notes = [n for n in notes if n[3]]
    if notes:
        parts.append("<p class='note'>Undefined pooled values: " +
                     "; ".join(esc(f"{d}/{m}/{k}: {t}") for d, m, k, t in notes) + "</p>")
    if "froc_sensitivity" in ds:
        parts += ["<h2>Lesion-level detection (FROC)</h2>",
                  f"<p class='note'>{esc(str(ds.froc_sensitivity.attrs.get('description', '')))}</p>",
                  _table_html(froc_frame(ds)),
                  "<h2>At a threshold: chosen on validation cases, or calibrated on healthy scans without labels</h2>",
                  f"<p class='note'>{esc(str(ds.calibrated_threshold.attrs.get('description', '')))}; "
                  f"{int(ds.attrs.get('n_calib_cases', 0))} healthy scan(s).</p>",
                  _table_html(operating_frame(ds))]
    thr = {str(m): float(ds.threshold.sel(dict(model=m))) for m in ds.model.values}
    parts += ["<h2>Dice thresholds (chosen on the validation cases)</h2><ul>"]
    parts += [f"<li>{esc(m)}: {v:.5g}" + (f" ({esc(str(ds.threshold_note.sel(dict(model=m)).values))})" if not
                                           math.isfinite(v) else "") + "</li>" for m, v in thr.items()]
    parts.append("</ul>")
    # plotly.js and the figures gzip'd (the page stays one offline file, a few MB); the loader
    # ships plotly.js even without figures, so the page's format does not depend on the results
    blocks, loader = plots.offline_figures_html(list(figures.values()))
    if figures:
        parts.append("<h2>Figures</h2>")
    for heading, block in zip(figures, blocks):
        parts += [f"<h3>{esc(str(heading))}</h3>", block]
    parts += ["<h2>Per-case AUROC</h2>", _table_html(per_case_frame(ds))]
    for name, title in (("params.yaml", "Run parameters (params.yaml)"), ("run.json", "Environment and stage timings (run.json)")):
        path = run_dir / name
        text = path.read_text() if path.is_file() else "(not found: the run was not started by the runner)"
        parts += [f"<h2>{esc(title)}</h2>", f"<pre>{esc(text)}</pre>"]
    attrs = {k: ds.attrs[k] for k in sorted(ds.attrs)}
    parts += ["<h2>Evaluation attributes</h2>", f"<pre>{esc(json.dumps(attrs, indent=1, default=str))}</pre>",
              loader, "</body></html>"]
    return files.write_text(run_dir / "eval" / "report.html", "\n".join(parts))


__all__ = ["METRICS", "Evaluation", "JointDensityScorer", "MapSource", "ZScoreBaseline", "available_methods", "best_method", "curve_figures",
           "evaluate_maps", "evaluation_figures", "froc_figures", "froc_frame", "gallery_figure", "lesion_coords",
           "make_scorer", "metric_labels", "operating_frame",
           "resolve_methods", "run_evaluation", "scatter_figure", "write_report", "zscore_baseline"]
