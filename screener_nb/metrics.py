"""Voxel-level evaluation: AUROC, partial AUROC, 3D AUPRO and Dice, pooled over cases.

Conventions (paper, Evaluation section):

* **Positives** are the voxels of the binary lesion mask, **normals** the other
  voxels; both are restricted to an optional region of interest ``roi``
  (the body mask). Voxels outside the ROI are ignored entirely, lesion voxels
  included, and lesion *regions* are the connected components of
  ``label & roi``.
* A voxel is **predicted abnormal at threshold t when ``score >= t``**; higher
  scores mean "more abnormal".
* Metrics **pool over cases** (the paper reports one number per dataset): the
  ROC/PRO curves are built from all voxels (or regions) of all cases together.
  ``per_case=True`` returns one value per case instead.
* Inputs: one volume (numpy array, torch tensor or ``Volume``) or a list/tuple
  of volumes (cases). Scores keep their dtype (float32 recommended; no copy,
  no rounding that would create ties); labels and ROI must be binary
  (bool or 0/1) -- use :func:`binarize` for multi-class label maps.

Definitions (exact, ties handled by linear interpolation, as sklearn's
``roc_curve`` + trapezoid does): the ROC curve has one point per distinct
score, the partial AUROC is the area under it for FPR in ``[0, max_fpr]``
(the curve interpolated linearly at ``max_fpr``) **divided by max_fpr** -- the
paper's normalisation, not sklearn's McClish correction. AUPRO follows the
MVTec protocol in 3D: PRO(t) is the mean over all ground-truth regions (pooled
over cases) of the fraction of the region's voxels with ``score >= t``, FPR(t)
is over normal voxels (pooled); integrate PRO over FPR in ``[0, max_fpr]`` and
divide by max_fpr.

Why hand-written: sklearn's ``roc_auc_score`` needs every score in memory at
once and applies McClish's correction for ``max_fpr``; no maintained library
provides a 3D AUPRO (anomalib's is 2D, torch, per-threshold). The algorithm
here never loops over thresholds. With the normals sorted once, each
*positive* voxel ``i`` contributes to the area independently:

    area = sum_i w_i * [ max(0, m - F_ge(s_i)) + tie_i ] / m

where ``F_ge(s)`` / ``F_gt(s)`` are the fractions of normals with score
``>= s`` / ``> s`` (two ``np.searchsorted`` calls), ``m = max_fpr``, and
``tie_i = L^2 / (2 (F_ge - F_gt))`` with ``L = clip(min(F_ge, m) - F_gt, 0)``
is the integral of the linear ramp through the normals tied with ``s_i``.
``w_i = 1 / n_positive`` gives the ROC, ``w_i = 1 / (|region(i)| * n_regions)``
the PRO curve. Cost: one sort of the normals, O(N log N), then
O(P log N) for P positive voxels.

Scale: :class:`PooledMetrics` is a streaming accumulator (``update`` per
case, ``compute`` at the end). ``mode="exact"`` keeps the sorted normal scores
of every case (memory: one score per normal voxel; ``spill_dir`` keeps them
on disk as memory-mapped ``.npy``) and the positive scores. ``mode="histogram"``
keeps only per-bin counts and returns, with each metric, a guaranteed bound on
its error: scores sharing a bin are treated as tied, and the true curve
inside each bin's box differs from the interpolated one by at most
``L * dT * max(r, 1 - r)``, ``r = L / (2 dF)`` (``dF``, ``dT``: the box's
width and height, ``L``: its width inside ``[0, max_fpr]``). For the full
AUROC this is half the fraction of (positive, normal) pairs that share a
bin.
"""
from __future__ import annotations

import math
import numbers
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from screener_nb.errors import ConfigError, InputError

__all__ = [
    "voxel_auroc",
    "aupro",
    "dice",
    "best_dice",
    "threshold_from_validation",
    "calibrate_threshold",
    "binarize",
    "PooledMetrics",
    "PooledResult",
    "DiceAtThreshold",
    "PooledFROC",
    "FROCResult",
    "FROC_FP_RATES",
]

#: neighbours -> scipy ``generate_binary_structure`` rank, per number of dimensions.
CONNECTIVITY = {3: {6: 1, 18: 2, 26: 3}, 2: {4: 1, 8: 2}}
#: false positives per scan at which FROC sensitivities are reported (LUNA16's CPM points)
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_CHUNK = 1 << 22  # voxels binned at a time in histogram mode (bounds temporary memory)


# --------------------------------------------------------------------------- inputs


def binarize(label: Any, values: int | Sequence[int] | None = None) -> np.ndarray:
    """A bool lesion mask from a label map.

    Args:
        label: (X, Y, Z) integer label map (numpy, torch or ``Volume``).
        values: the label value(s) that count as lesion (e.g. ``2`` for KiTS21
            tumour); ``None``: every non-zero value.

    >>> binarize(np.array([0, 1, 2, 2]), 2).tolist()
    [False, False, True, True]
    """
    arr = _to_numpy(label)
    if values is None:
        return arr != 0
    return np.isin(arr, np.atleast_1d(np.asarray(values)))


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array, a torch tensor (any device) or a ``Volume``."""
    x = getattr(x, "array", x)  # screener_nb.data.volume.Volume
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def _as_binary(x: Any, where: str, shape: tuple[int, ...]) -> np.ndarray:
    """A bool array of ``shape`` from a bool / 0-1 mask (zero-copy for bool and (u)int8)."""
    arr = _to_numpy(x)
    if arr.shape != shape:
        raise InputError(where, f"a mask of the scores' shape {shape}", f"shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "uif":
        raise InputError(where, "a binary mask (bool or 0/1)", f"dtype {arr.dtype}")
    if arr.dtype.kind in "ui":
        ok = arr.max() <= 1 and (arr.dtype.kind == "u" or arr.min() >= 0)
    else:
        ok = bool(np.all((arr == 0) | (arr == 1)))
    if not ok:
        bad = np.unique(arr[(arr != 0) & (arr != 1)])
        shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
        raise InputError(
            where,
            "a binary mask (0/1 or bool); select lesion labels with "
            "screener_nb.metrics.binarize(label, values)",
            f"values {{0, 1}} and {shown}",
        )
    if arr.dtype.itemsize == 1 and arr.dtype.kind in "ui":
        return arr.view(bool)  # values are 0/1: a bool view is exact and free
    return arr != 0


def _check_case(scores: Any, labels: Any, roi: Any, tag: str = ""):
    """Validated (scores, bool labels, bool roi or None) of one case; ``tag`` names it in errors."""
    s = _to_numpy(scores)
    if s.dtype == bool:
        s = s.view(np.uint8)
    if s.dtype.kind not in "uif":
        raise InputError(f"scores{tag}", "a real-valued score array", f"dtype {s.dtype}")
    if s.size == 0:
        raise InputError(f"scores{tag}", "a non-empty score array", f"shape {s.shape}")
    if s.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(s)))
        if n_nan:
            raise InputError(f"scores{tag}", "scores without NaN", f"{n_nan} NaN value(s) of {s.size}")
    if labels is None:
        lab = np.zeros(s.shape, bool)
    else:
        lab_raw = _to_numpy(labels)
        if lab_raw.shape != s.shape:
            raise InputError(
                f"labels{tag}", f"labels of the scores' shape {s.shape}", f"shape {lab_raw.shape}"
            )
        lab = _as_binary(lab_raw, f"labels{tag}", s.shape)
    r = None if roi is None else _as_binary(roi, f"roi{tag}", s.shape)
    return s, lab, r


def _cases(scores: Any, labels: Any, roi: Any) -> list[tuple[Any, Any, Any, str]]:
    """Split the one-volume / list-of-volumes forms into ``(scores, labels, roi, tag)``."""
    if not isinstance(scores, (list, tuple)):
        if isinstance(labels, (list, tuple)):
            raise InputError("labels", "one label volume for one score volume", f"a list of {len(labels)}")
        return [(scores, labels, roi, "")]
    n = len(scores)
    if n == 0:
        raise InputError("scores", "at least one case", "an empty list")
    if labels is not None and (not isinstance(labels, (list, tuple)) or len(labels) != n):
        found = f"a list of {len(labels)}" if isinstance(labels, (list, tuple)) else type(labels).__name__
        raise InputError("labels", f"a list of {n} label volumes (one per score volume)", found)
    if roi is None:
        roi = [None] * n
    elif not isinstance(roi, (list, tuple)) or len(roi) != n:
        found = f"a list of {len(roi)}" if isinstance(roi, (list, tuple)) else type(roi).__name__
        raise InputError("roi", f"None or a list of {n} ROI masks (one per score volume)", found)
    labels = [None] * n if labels is None else labels
    return [(scores[i], labels[i], roi[i], f"[{i}]") for i in range(n)]


def _check_max_fpr(max_fpr: Any) -> float:
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, numbers.Real) or not (0 < max_fpr <= 1):
        raise ConfigError(f"max_fpr: expected a number in (0, 1], found {max_fpr!r}")
    return float(max_fpr)


def _structure(connectivity: int, ndim: int, where: str) -> np.ndarray:
    ranks = CONNECTIVITY.get(ndim)
    if ranks is None:
        raise InputError(where, "3D (or 2D) labels to find lesion regions", f"{ndim} dimension(s)")
    if connectivity not in ranks:
        raise ConfigError(
            f"connectivity: expected one of {sorted(ranks)} for {ndim}D labels, found {connectivity!r}"
        )
    return ndimage.generate_binary_structure(ndim, ranks[connectivity])


def _extract(s: np.ndarray, lab: np.ndarray, roi: np.ndarray | None, connectivity: int | None, tag: str):
    """Normal scores (1-D copy), positive scores, per-positive 1/|region| and region count."""
    neg_mask = ~lab if roi is None else np.greater(roi, lab)  # roi & ~lab in one pass
    neg = np.asarray(s[neg_mask])  # a copy: sorted in place later
    del neg_mask
    pos_mask = lab if roi is None else (lab & roi)
    flat = np.flatnonzero(pos_mask)
    if flat.size == 0:
        return neg, np.empty(0, s.dtype), np.empty(0), 0
    # Work in the lesions' bounding box: components and positives never need the whole volume.
    idx = np.unravel_index(flat, s.shape)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    del flat, idx
    pos_box = np.ascontiguousarray(pos_mask[box])
    pos = np.asarray(s[box][pos_box])
    if connectivity is None:
        return neg, pos, None, 0
    components, n_regions = ndimage.label(pos_box, structure=_structure(connectivity, s.ndim, f"labels{tag}"))
    ids = components[pos_box]
    weight = 1.0 / np.bincount(ids)[ids]  # each region weighs 1 in PRO, whatever its size
    return neg, pos, weight, int(n_regions)


# --------------------------------------------------------------------------- curve areas


def _area(f_gt: np.ndarray, f_ge: np.ndarray, w: np.ndarray, max_fpr: float) -> float:
    """Normalised area under a tie-interpolated curve up to ``max_fpr`` (see module docstring).

    ``w[j]`` is the curve's rise at the j-th distinct positive score, ``f_gt[j]`` /
    ``f_ge[j]`` the FPR just before / after passing that score.
    """
    full = np.clip(max_fpr - f_ge, 0.0, None)
    width = f_ge - f_gt
    run = np.clip(np.minimum(f_ge, max_fpr) - f_gt, 0.0, None)
    safe = np.where(width > 0, width, 1.0)
    tie = np.where(width > 0, run * run / (2.0 * safe), 0.0)
    return float(np.dot(w, full + tie) / max_fpr)


def _area_bound(f_gt: np.ndarray, f_ge: np.ndarray, w: np.ndarray, max_fpr: float) -> float:
    """Largest error of :func:`_area` when each entry is a bin whose members are not truly tied."""
    width = f_ge - f_gt
    run = np.clip(np.minimum(f_ge, max_fpr) - f_gt, 0.0, None)
    safe = np.where(width > 0, width, 1.0)
    r = run / (2.0 * safe)
    per_bin = np.where(width > 0, w * run * np.maximum(r, 1.0 - r), 0.0)
    return float(per_bin.sum() / max_fpr)


# --------------------------------------------------------------------------- accumulator


@dataclass(frozen=True)
class PooledResult:
    """Pooled metrics of a :class:`PooledMetrics` run.

    ``*_bound`` are guaranteed bounds on ``|value - exact value|`` (0 in exact mode).
    ``pauroc`` and ``aupro`` are integrated up to ``max_fpr`` and divided by it.
    ``dice`` is the pooled Dice at ``dice_threshold`` (None when not requested).
    """

    auroc: float
    pauroc: float
    aupro: float | None
    max_fpr: float
    auroc_bound: float
    pauroc_bound: float
    aupro_bound: float | None
    dice: float | None
    dice_threshold: float | None
    n_cases: int
    n_positive: int
    n_normal: int
    n_regions: int
    mode: str


class DiceAtThreshold(NamedTuple):
    """A Dice score and the threshold (``score >= threshold`` is lesion) it was measured at."""

    dice: Any
    threshold: Any


class PooledMetrics:
    """Streaming AUROC / partial AUROC / AUPRO / Dice over many cases.

    >>> acc = PooledMetrics()
    >>> lab = np.zeros((4, 4, 4), bool); lab[1:3, 1:3, 1:3] = True
    >>> acc.update(lab * 2.0 + 0.5, lab)
    >>> acc.compute().auroc
    1.0

    Args:
        mode: "exact" keeps every normal score (sorted, per case) and every
            positive score; "histogram" keeps per-bin counts only and reports
            error bounds.
        bins: histogram mode: an int (equal bins over ``range``) or a 1-D
            array of increasing bin edges. Scores outside are counted in the
            end bins (still covered by the bound, which then grows).
        range: histogram mode with int ``bins``: (low, high) of the scores.
        connectivity: lesion-region neighbourhood for AUPRO (6, 18 or 26 in
            3D; 4 or 8 in 2D); None skips AUPRO (any number of dimensions).
        dice_threshold: also accumulate the pooled Dice at this threshold.
        spill_dir: exact mode: keep the sorted normal scores as memory-mapped
            ``.npy`` files in a temporary folder under this directory (removed
            with the accumulator) instead of in RAM.
    """

    def __init__(
        self,
        mode: str = "exact",
        *,
        bins: int | Sequence[float] | np.ndarray = 65536,
        range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name for it
        connectivity: int | None = 26,
        dice_threshold: float | None = None,
        spill_dir: str | Path | None = None,
    ) -> None:
        if mode not in ("exact", "histogram"):
            raise ConfigError(f"mode: expected 'exact' or 'histogram', found {mode!r}")
        self.mode, self.connectivity, self.dice_threshold = mode, connectivity, dice_threshold
        if connectivity is not None and connectivity not in {6, 18, 26, 4, 8}:
            raise ConfigError(f"connectivity: expected 6, 18 or 26 (3D), 4 or 8 (2D) or None, found {connectivity!r}")
        self._n_cases = self._n_pos = self._n_neg = self._n_regions = 0
        self._tp = self._fp = 0
        self._curve: dict | None = None
        if mode == "histogram":
            self._init_bins(bins, range)
        else:
            self._neg: list[np.ndarray] = []
            self._pos: list[np.ndarray] = []
            self._pos_w: list[np.ndarray] = []
            self._spill = tempfile.TemporaryDirectory(dir=spill_dir, prefix="metrics-") if spill_dir else None

    def _init_bins(self, bins: Any, rng: Any) -> None:
        if isinstance(bins, numbers.Integral) and not isinstance(bins, bool):
            if bins < 1:
                raise ConfigError(f"bins: expected a positive number of bins, found {bins!r}")
            if rng is None or len(rng) != 2 or not all(map(math.isfinite, rng)) or not rng[0] < rng[1]:
                raise ConfigError(f"range: expected finite (low, high) with low < high for {bins} bins, found {rng!r}")
            self._edges = None
            self._lo, self._scale, self._nbins = float(rng[0]), int(bins) / (float(rng[1]) - float(rng[0])), int(bins)
        else:
            edges = np.asarray(bins, dtype=np.float64)
            if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
                raise ConfigError("bins: expected an int or at least 2 strictly increasing bin edges")
            self._edges, self._nbins = edges, edges.size - 1
        self._neg_h = np.zeros(self._nbins, np.int64)
        self._pos_h = np.zeros(self._nbins, np.int64)
        self._pro_h = np.zeros(self._nbins, np.float64)

    @property
    def n_cases(self) -> int:
        return self._n_cases

    def update(self, scores: Any, labels: Any, roi: Any = None, *, name: str | None = None) -> None:
        """Add one case: ``scores`` (X, Y, Z) real, ``labels`` binary, ``roi`` binary or None.

        ``labels=None`` adds a case without lesion (all its ROI voxels are normal).
        ``name`` (e.g. the case id) is used in error messages.
        """
        tag = f"[{name}]" if name is not None else f"[{self._n_cases}]"
        s, lab, r = _check_case(scores, labels, roi, tag)
        self._add(*_extract(s, lab, r, self.connectivity, tag))

    def _add(self, neg: np.ndarray, pos: np.ndarray, pos_w: np.ndarray | None, n_regions: int) -> None:
        self._n_cases += 1
        self._n_neg += int(neg.size)
        self._n_pos += int(pos.size)
        self._n_regions += n_regions
        self._curve = None
        if self.dice_threshold is not None:
            self._tp += int(np.count_nonzero(pos >= self.dice_threshold))
            self._fp += int(np.count_nonzero(neg >= self.dice_threshold))
        if self.mode == "histogram":
            self._neg_h += self._hist(neg)
            self._pos_h += self._hist(pos)
            if pos_w is not None:
                self._pro_h += self._hist(pos, pos_w)
            return
        neg.sort()  # our own copy (see _extract)
        if self._spill is not None:
            path = Path(self._spill.name) / f"normals_{self._n_cases:06d}.npy"
            np.save(path, neg)
            neg = np.load(path, mmap_mode="r")
        self._neg.append(neg)
        self._pos.append(pos)
        self._pos_w.append(pos_w if pos_w is not None else np.empty(0))

    def _bin_index(self, x: np.ndarray) -> np.ndarray:
        # Monotone in x (so bins never reorder scores): float64 affine map, floor, clip.
        if self._edges is None:
            t = (x.astype(np.float64) - self._lo) * self._scale
            return np.clip(np.floor(t), 0, self._nbins - 1).astype(np.intp)
        return np.clip(np.searchsorted(self._edges, x, side="right") - 1, 0, self._nbins - 1)

    def _hist(self, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        out = np.zeros(self._nbins, np.int64 if weights is None else np.float64)
        for i in np.arange(0, x.size, _CHUNK):
            w = None if weights is None else weights[i : i + _CHUNK]
            out += np.bincount(self._bin_index(x[i : i + _CHUNK]), weights=w, minlength=self._nbins).astype(out.dtype)
        return out

    # -- curves

    def _curve_inputs(self) -> dict:
        """Per distinct positive score (exact) or per bin (histogram): counts and rises."""
        if self._curve is not None:
            return self._curve
        if self.mode == "histogram":
            neg = self._neg_h
            below = np.cumsum(neg) - neg  # normals in lower bins
            c = dict(n_ge=self._n_neg - below, n_gt=self._n_neg - below - neg, n_pos_at=self._pos_h,
                     pro_at=self._pro_h, values=None)
        else:
            pos = np.concatenate(self._pos) if self._pos else np.empty(0)
            rw = np.concatenate(self._pos_w)
            order = np.argsort(pos, kind="stable")
            pos = pos[order]
            starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1]))) if pos.size else np.empty(0, np.intp)
            values = pos[starts]
            n_pos_at = np.diff(np.append(starts, pos.size))
            pro_at = np.add.reduceat(rw[order], starts) if (rw.size and starts.size) else np.zeros(values.size)
            n_lt = np.zeros(values.size, np.int64)
            n_le = np.zeros(values.size, np.int64)
            for neg in self._neg:  # pooled counts = sum of per-case counts
                n_lt += np.searchsorted(neg, values, side="left")
                n_le += np.searchsorted(neg, values, side="right")
            c = dict(n_ge=self._n_neg - n_lt, n_gt=self._n_neg - n_le, n_pos_at=n_pos_at, pro_at=pro_at,
                     values=values)
        self._curve = c
        return c

    def _require(self, what: str, need_regions: bool = False) -> None:
        found = (f"{self._n_pos} lesion and {self._n_neg} normal voxel(s) inside the ROI over "
                 f"{self._n_cases} case(s)")
        if self._n_cases == 0:
            raise InputError(what, "at least one case", "none (call update first)")
        if self._n_pos == 0 or self._n_neg == 0:
            raise InputError(what, "at least one lesion voxel and one normal voxel (else it is undefined)", found)
        if need_regions and self.connectivity is None:
            raise ConfigError("AUPRO: the accumulator was built with connectivity=None")

    def _roc_area(self, max_fpr: float, kind: str = "roc") -> tuple[float, float]:
        c = self._curve_inputs()
        f_gt, f_ge = c["n_gt"] / self._n_neg, c["n_ge"] / self._n_neg
        w = c["n_pos_at"] / self._n_pos if kind == "roc" else c["pro_at"] / self._n_regions
        value = _area(f_gt, f_ge, w, max_fpr)
        bound = _area_bound(f_gt, f_ge, w, max_fpr) if self.mode == "histogram" else 0.0
        return value, bound

    def compute(self, max_fpr: float = 0.3) -> PooledResult:
        """All pooled metrics; partial AUROC and AUPRO up to ``max_fpr`` (paper: 0.3)."""
        max_fpr = _check_max_fpr(max_fpr)
        self._require("PooledMetrics")
        auroc, auroc_b = self._roc_area(1.0)
        pauroc, pauroc_b = self._roc_area(max_fpr)
        aupro_v = aupro_b = None
        if self.connectivity is not None:
            aupro_v, aupro_b = self._roc_area(max_fpr, "pro")
        dice_v = None
        if self.dice_threshold is not None:
            dice_v = _dice_from_counts(self._tp, self._fp, self._n_pos, "PooledMetrics")
        return PooledResult(auroc, pauroc, aupro_v, max_fpr, auroc_b, pauroc_b, aupro_b, dice_v,
                            self.dice_threshold, self._n_cases, self._n_pos, self._n_neg, self._n_regions,
                            self.mode)

    def curve(self, kind: str = "roc", max_points: int | None = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Vertices ``(fpr, tpr)`` of the pooled ROC curve (``kind="roc"``) or ``(fpr, pro)`` (``"pro"``).

        The polyline through them, from (0, 0) to (1, 1), is the curve the
        metrics integrate (ties as straight segments). For plotting,
        ``max_points`` keeps that many evenly spaced vertices (None: all).
        """
        if kind not in ("roc", "pro"):
            raise ConfigError(f"kind: expected 'roc' or 'pro', found {kind!r}")
        self._require("PooledMetrics.curve", need_regions=kind == "pro")
        c = self._curve_inputs()
        w = c["n_pos_at"] / self._n_pos if kind == "roc" else c["pro_at"] / self._n_regions
        w, f_gt, f_ge = w[::-1], c["n_gt"][::-1] / self._n_neg, c["n_ge"][::-1] / self._n_neg  # high -> low
        after = np.cumsum(w)
        x = np.concatenate(([0.0], np.stack([f_gt, f_ge], 1).ravel(), [1.0]))
        y = np.concatenate(([0.0], np.stack([after - w, after], 1).ravel(), [after[-1] if after.size else 0.0]))
        if max_points is not None and x.size > max_points:
            keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.intp))
            x, y = x[keep], y[keep]
        return x, y

    def best_dice(self) -> DiceAtThreshold:
        """Largest pooled Dice over all thresholds (exact mode). An UPPER BOUND: see :func:`best_dice`."""
        if self.mode != "exact":
            raise ConfigError("best_dice: expected mode='exact' (thresholds inside bins are unknown)")
        if self._n_pos == 0:
            raise InputError("best_dice", "at least one lesion voxel inside the ROI",
                             f"0 lesion voxels over {self._n_cases} case(s)")
        c = self._curve_inputs()
        tp = self._n_pos - (np.cumsum(c["n_pos_at"]) - c["n_pos_at"])  # positives >= each value
        d = 2.0 * tp / (self._n_pos + tp + c["n_ge"])
        j = d.size - 1 - int(np.argmax(d[::-1]))  # highest threshold among equal Dice
        return DiceAtThreshold(float(d[j]), c["values"][j].item())


# --------------------------------------------------------------------------- functions


def _pooled(scores, labels, roi, per_case, make, finish, sample=None, seed=0):
    """Run ``finish(acc)`` on one accumulator over all cases, or one per case."""
    cases = _cases(scores, labels, roi)

    def feed(acc, i, s, l_, r, tag):
        s, lab, r = _check_case(s, l_, r, tag)
        neg, pos, w, n = _extract(s, lab, r, acc.connectivity, tag)
        if sample is not None:  # MOOD protocol: a fixed number of voxels per class and image
            rng = np.random.default_rng([seed, i])
            neg = neg[rng.choice(neg.size, min(sample, neg.size), replace=False)]
            pos = pos[rng.choice(pos.size, min(sample, pos.size), replace=False)]
        acc._add(neg, pos, w, n)

    if per_case:
        out = []
        for i, (s, l_, r, tag) in enumerate(cases):
            acc = make()
            feed(acc, i, s, l_, r, tag)
            out.append(finish(acc, tag))
        return out
    acc = make()
    for i, (s, l_, r, tag) in enumerate(cases):
        feed(acc, i, s, l_, r, tag)
    return finish(acc, "" if len(cases) == 1 else f" ({len(cases)} cases pooled)")


def voxel_auroc(
    scores: Any,
    labels: Any,
    roi: Any = None,
    max_fpr: float | None = None,
    sample: int | None = None,
    seed: int = 0,
    *,
    per_case: bool = False,
) -> float | np.ndarray:
    """Voxel AUROC of lesion (positive) vs normal ROI voxels, pooled over cases.

    Args:
        scores: (X, Y, Z) anomaly scores, or a list of them (cases).
        labels: binary lesion masks of the same shapes.
        roi: binary masks (e.g. body) or None (all voxels); voxels outside are ignored.
        max_fpr: None -> full AUROC; else area under the ROC for FPR in
            [0, max_fpr] divided by max_fpr (paper's AUROC@0.3; no McClish correction).
        sample: None -> exact over all ROI voxels (default). An int n -> the
            authors' MOOD protocol: n random positives and n random normals
            per case (all if fewer), pooled; seeded by ``(seed, case index)``.
        per_case: return an array with one value per case instead of the pooled value.

    Raises:
        InputError: shapes differ, non-binary labels/ROI, NaN scores, or no
            lesion / no normal voxel in the ROI (AUROC undefined; never 0.5).
        ConfigError: max_fpr outside (0, 1], sample not a positive int.
    """
    m = 1.0 if max_fpr is None else _check_max_fpr(max_fpr)
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or sample < 1):
        raise ConfigError(f"sample: expected None or a positive number of voxels per class, found {sample!r}")

    def finish(acc, tag):
        acc._require(f"labels{tag}")
        return acc._roc_area(m)[0]

    out = _pooled(scores, labels, roi, per_case, lambda: PooledMetrics(connectivity=None), finish, sample, seed)
    return np.asarray(out, dtype=np.float64) if per_case else out


def aupro(
    scores: Any,
    labels: Any,
    roi: Any = None,
    max_fpr: float = 0.3,
    connectivity: int = 26,
    *,
    per_case: bool = False,
) -> float | np.ndarray:
    """3D AUPRO (MVTec per-region overlap) up to ``max_fpr``, divided by ``max_fpr``.

    Regions are the connected components of ``label & roi`` of each case
    (``connectivity`` 6, 18 or 26 neighbours; 4 or 8 for 2D), never merged
    across cases; PRO(t) averages over all regions of all cases the fraction
    of the region with ``score >= t``; FPR(t) is over all normal ROI voxels.
    Arguments as :func:`voxel_auroc`.
    """
    m = _check_max_fpr(max_fpr)
    def finish(acc, tag):
        acc._require(f"labels{tag}", need_regions=True)
        return acc._roc_area(m, "pro")[0]

    out = _pooled(scores, labels, roi, per_case, lambda: PooledMetrics(connectivity=connectivity), finish)
    return np.asarray(out, dtype=np.float64) if per_case else out


def _dice_from_counts(tp: int, fp: int, n_pos: int, where: str) -> float:
    denom = n_pos + tp + fp
    if denom == 0:
        raise InputError(where, "a lesion voxel or a predicted voxel (Dice of two empty masks is undefined)",
                         "empty label and empty prediction inside the ROI")
    return 2.0 * tp / denom


def dice(scores: Any, labels: Any, threshold: float, roi: Any = None, *, per_case: bool = False):
    """Dice of ``score >= threshold`` (inside ``roi``) against the lesion mask.

    Pooled over cases: ``2 sum(TP) / sum(|pred| + |label|)``; ``per_case=True``
    gives one Dice per case. Raises InputError when both masks are empty.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ConfigError(f"threshold: expected a real number, found {threshold!r}")
    cases = _cases(scores, labels, roi)
    counts = []
    for s, l_, r, tag in cases:
        s, lab, r = _check_case(s, l_, r, tag)
        pos_mask = lab if r is None else lab & r
        pred = s >= threshold
        if r is not None:
            pred &= r
        tp = int(np.count_nonzero(pred & pos_mask))
        counts.append((tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(pos_mask)), tag))
    if per_case:
        return np.array([_dice_from_counts(tp, fp, n, f"labels{tag}") for tp, fp, n, tag in counts])
    tp, fp, n = (sum(c[k] for c in counts) for k in range(3))
    return _dice_from_counts(tp, fp, n, "labels")


def best_dice(scores: Any, labels: Any, roi: Any = None, *, per_case: bool = False) -> DiceAtThreshold:
    """UPPER BOUND on Dice: the best pooled Dice over all thresholds, chosen on these very cases.

    The threshold is tuned on the evaluated labels, so this is optimistic and
    must not be reported as a test result; use :func:`threshold_from_validation`
    on separate cases, then :func:`dice`. Returns ``(dice, threshold)``
    (arrays with ``per_case=True``); candidates are the distinct lesion scores.
    """
    out = _pooled(scores, labels, roi, per_case, lambda: PooledMetrics(connectivity=None),
                  lambda acc, tag: acc.best_dice())
    if per_case:
        return DiceAtThreshold(np.array([o.dice for o in out]), np.array([o.threshold for o in out]))
    return out


def threshold_from_validation(
    scores_list: Sequence[Any],
    labels_list: Sequence[Any] | None,
    roi_list: Sequence[Any] | None = None,
    criterion: str = "dice",
    percentile: float = 99.5,
) -> float:
    """A Dice threshold chosen on validation cases (never on the test cases).

    Args:
        scores_list, labels_list, roi_list: validation cases (lists, or one volume).
            ``labels_list`` may be None with "normal_percentile" (all ROI voxels normal).
        criterion: "dice" -> the threshold of the best pooled Dice on these cases;
            "normal_percentile" -> the ``percentile``-th percentile (np.percentile,
            linear) of the normal ROI voxels' scores, pooled (a few labelled or
            healthy cases suffice).
        percentile: in (0, 100). 99.5 is this package's default, not a paper value.
    """
    if criterion == "dice":
        if labels_list is None:
            raise ConfigError("threshold_from_validation: criterion 'dice' needs labels_list")
        return float(best_dice(scores_list, labels_list, roi_list).threshold)
    if criterion != "normal_percentile":
        raise ConfigError(f"criterion: expected 'dice' or 'normal_percentile', found {criterion!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 < percentile < 100:
        raise ConfigError(f"percentile: expected a number in (0, 100), found {percentile!r}")
    normals = []
    for s, l_, r, tag in _cases(scores_list, labels_list, roi_list):
        s, lab, r = _check_case(s, l_, r, tag)
        normals.append(_extract(s, lab, r, None, tag)[0])
    allnorm = np.concatenate(normals)
    if allnorm.size == 0:
        raise InputError("labels", "at least one normal voxel inside the ROI", "none")
    return float(np.percentile(allnorm, percentile))


# --------------------------------------------------------------------------- lesion-level detection (FROC)


class FROCResult(NamedTuple):
    """Lesion-level detection of a :class:`PooledFROC`.

    ``sensitivity[k]``: the best fraction of lesions hit among the thresholds with at most
    ``fp_rates[k]`` false-positive regions per scan (0 where no threshold is that strict);
    ``cpm``: their mean (LUNA16's competition performance metric); ``curve_*``: one point
    per threshold (descending thresholds).
    """

    fp_rates: np.ndarray
    sensitivity: np.ndarray
    cpm: float
    thresholds: np.ndarray
    curve_fp_per_scan: np.ndarray
    curve_sensitivity: np.ndarray
    n_lesions: int
    n_scans: int


class PooledFROC:
    """Free-response ROC over fixed thresholds, accumulated case by case (streaming).

    At each threshold ``t`` the **detected regions** of a scan are the connected components
    (``connectivity``, 26 by default) of ``score >= t`` inside the ROI, without those smaller
    than ``min_region_ml``. The **lesions** are the connected components of ``label & roi``.
    A detected region **hits** every lesion it overlaps, provided at least ``min_precision``
    of its voxels are lesion voxels: a region that spreads over the whole body touches every
    lesion but points at none, and counts as a false positive. A region that hits nothing is
    a **false positive**. Pooled over scans: sensitivity = hit lesions / lesions, and the
    mean number of false-positive regions per scan (every scan counts, with or without lesion).

    Each ``update`` keeps two counts per threshold, so memory does not grow with the cases.
    Cost: one connected-component labelling per threshold and case, in the ROI's bounding box.

    Args:
        thresholds: the score thresholds (any order; kept in descending order). Choose them
            without the test labels, e.g. quantiles of validation maps (:meth:`quantile_thresholds`).
        min_region_ml: smallest detected region counted, in ml (needs each case's spacing).
        min_precision: in [0, 1]; 0 = any overlap is a hit.
        connectivity: 6, 18 or 26 (3D).
    """

    def __init__(self, thresholds: Sequence[float], *, min_region_ml: float = 0.0, min_precision: float = 0.02,
                 connectivity: int = 26):
        t = np.asarray(thresholds, dtype=np.float64).ravel()
        if t.size == 0 or not np.all(np.isfinite(t)):
            raise ConfigError(f"PooledFROC thresholds: expected finite numbers, found {thresholds!r}")
        if not 0.0 <= float(min_precision) <= 1.0:
            raise ConfigError(f"min_precision: expected a number in [0, 1], found {min_precision!r}")
        if float(min_region_ml) < 0:
            raise ConfigError(f"min_region_ml: expected >= 0, found {min_region_ml!r}")
        self.thresholds = np.unique(t)[::-1]
        self.min_region_ml, self.min_precision = float(min_region_ml), float(min_precision)
        self.structure = _structure(connectivity, 3, "labels")
        self.hits = np.zeros(self.thresholds.size, np.int64)
        self.false_positives = np.zeros(self.thresholds.size, np.int64)
        self.n_lesions = 0
        self.n_scans = 0

    @staticmethod
    def quantile_thresholds(maps: Sequence[Any], rois: Sequence[Any] | None = None, n: int = 24,
                            top: tuple[float, float] = (1e-6, 0.2)) -> np.ndarray:
        """``n`` thresholds at the score quantiles that leave the top ``top[0]`` ... ``top[1]``
        fraction of ROI voxels above them (geometric steps), pooled over ``maps``."""
        values = []
        for i, m in enumerate(maps):
            m = _to_numpy(m)
            r = None if rois is None else _to_numpy(rois[i]).astype(bool)
            values.append(np.asarray(m if r is None else m[r], np.float64).ravel())
        v = np.concatenate(values) if values else np.empty(0)
        if v.size == 0:
            raise InputError("FROC thresholds", "maps with at least one ROI voxel", "none")
        return np.unique(np.quantile(v, 1.0 - np.geomspace(top[0], top[1], n)))

    def update(self, scores: Any, labels: Any, roi: Any = None, *, spacing: Sequence[float] = (1.0, 1.0, 1.0),
               name: str | None = None) -> None:
        """Add one scan: scores (X, Y, Z), binary labels (or None: no lesion), roi, voxel spacing (mm)."""
        tag = f" (case {name})" if name else ""
        s, lab, r = _check_case(scores, labels, roi, tag)
        if s.ndim != 3:
            raise InputError(f"scores{tag}", "a 3D map for lesion-level detection", f"{s.ndim} dimension(s)")
        if r is not None:  # work in the ROI's bounding box: nothing outside it can be detected
            box = ndimage.find_objects(r.astype(np.uint8))
            if box and box[0] is not None:
                s, lab, r = s[box[0]], lab[box[0]], r[box[0]]
            lab = lab & r
        lesions, n_les = ndimage.label(lab, structure=self.structure)
        voxel_ml = float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
        min_voxels = self.min_region_ml / voxel_ml if voxel_ml > 0 else 0.0
        in_lesion = lesions > 0
        lesion_ids = lesions[in_lesion]
        for k, t in enumerate(self.thresholds):
            pred = s >= t
            if r is not None:
                pred &= r
            regions, n_reg = ndimage.label(pred, structure=self.structure)
            if n_reg == 0:
                continue
            size = np.bincount(regions[pred], minlength=n_reg + 1)
            region_of_lesion_voxel = regions[in_lesion]
            inside = np.bincount(region_of_lesion_voxel, minlength=n_reg + 1)
            counted = size >= max(min_voxels, 1e-12)
            counted[0] = False
            pointing = counted & (inside >= self.min_precision * size) & (inside > 0)
            hit = np.unique(lesion_ids[pointing[region_of_lesion_voxel]])
            self.hits[k] += hit.size
            self.false_positives[k] += int(np.count_nonzero(counted & (inside == 0)) +
                                           np.count_nonzero(counted & (inside > 0) & ~pointing))
        self.n_lesions += int(n_les)
        self.n_scans += 1

    def compute(self, fp_rates: Sequence[float] = FROC_FP_RATES) -> FROCResult:
        """Sensitivity at each FP rate, its mean (CPM) and the curve (module docstring).

        Raises:
            InputError: no scan, or no lesion in the scans (sensitivity undefined).
        """
        if self.n_scans == 0:
            raise InputError("FROC", "at least one scan (call update)", "none")
        if self.n_lesions == 0:
            raise InputError("FROC", "at least one lesion in the scans", "none: sensitivity is undefined")
        fp = self.false_positives / self.n_scans
        sens = self.hits / self.n_lesions
        rates = np.asarray(fp_rates, np.float64)
        at = np.array([sens[fp <= x].max(initial=0.0) for x in rates])
        return FROCResult(rates, at, float(at.mean()), self.thresholds.copy(), fp, sens,
                          int(self.n_lesions), int(self.n_scans))


# --------------------------------------------------------------------------- label-free thresholds


def calibrate_threshold(healthy_maps: Sequence[Any], rois: Sequence[Any] | None, rate: float,
                        unit: str = "voxel") -> float:
    """A threshold from held-out **healthy** scans only, with a stated false-alarm rate.

    ``unit="voxel"``: the lowest score that at most ``rate`` of the healthy ROI voxels (pooled)
    reach, so that about that fraction of healthy tissue is flagged (``score >= threshold``;
    scans differ, so a single scan's fraction varies around it). ``unit="scan"``: the same on
    each healthy scan's maximum, so that about ``rate`` of healthy scans get any flagged voxel
    (each scan is one Bernoulli trial: the rate's error is binomial in the number of scans).
    Tied scores are never split: on the healthy scans themselves the flagged share is at
    most ``rate``, and as close to it as the ties allow.

    Raises:
        ConfigError: ``rate`` outside (0, 1) or an unknown ``unit``.
        InputError: no healthy scan or no ROI voxel.
    """
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < 1:
        raise ConfigError(f"rate: expected a fraction in (0, 1), found {rate!r}")
    if unit not in ("voxel", "scan"):
        raise ConfigError(f"unit: expected 'voxel' or 'scan', found {unit!r}")
    healthy_maps = list(healthy_maps)
    if not healthy_maps:
        raise InputError("healthy maps", "at least one held-out healthy scan", "none")
    rois = [None] * len(healthy_maps) if rois is None else list(rois)
    values = []
    for i, (m, r) in enumerate(zip(healthy_maps, rois)):
        s, _, r = _check_case(m, None, r, f" (healthy scan {i})")
        v = s[r] if r is not None else s.ravel()
        if v.size == 0:
            raise InputError(f"roi (healthy scan {i})", "at least one ROI voxel", "none")
        values.append(np.asarray([v.max()]) if unit == "scan" else np.asarray(v, np.float64))
    values = np.concatenate(values)
    u, counts = np.unique(values, return_counts=True)
    at_or_above = np.cumsum(counts[::-1])[::-1]  # healthy values >= each distinct value
    ok = np.flatnonzero(at_or_above <= rate * values.size)
    if ok.size == 0:  # the top value alone is tied more often than allowed: flag nothing
        return float(np.nextafter(u[-1], np.inf))
    return float(u[ok[0]])
