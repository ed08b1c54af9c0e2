"""The pure evaluation of given maps: a streaming accumulator and its one-call form.

:class:`Evaluation` (``set_threshold`` per method from the VALIDATION maps, ``set_calibration``
from healthy scans, then ``add`` one test map at a time, ``finish`` -> ``xr.Dataset`` in the
schema of :mod:`screener_nb.results`) and :func:`evaluate_maps`, its one-call form on
``{method: {case_id: map}}``. Maps are (X, Y, Z) anomaly scores on the case's preprocessed
grid, higher = more anomalous; the ROI is the body mask; lesion voxels are ``label > 0``. No
trained model is needed, so every metric can be checked against independent references.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError, InputError
from .results import (CASE_COORDS, CURVE_POINTS, METRICS, OPERATING_METRICS, OPERATING_POINTS,
                      RESULTS_FORMAT, metric_labels)

THRESHOLD_RULES = ("dice", "normal_percentile")
#: FROC: thresholds per method (quantiles of its validation maps), smallest region counted (ml)
FROC_THRESHOLDS = 24
FROC_MIN_REGION_ML = 0.1
#: label-free threshold: the fraction of healthy body voxels it flags
CALIBRATION_RATE = 1e-3


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
