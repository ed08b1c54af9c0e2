"""Voxel-wise Dice / sensitivity and the largest suprathreshold regions of an anomaly map (the viewer's readouts).

Computed here with a few lines of numpy and scipy so the viewer does not depend on
``screener_nb.metrics``; the evaluation numbers of record come from that module.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InputError
from . import plots


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
