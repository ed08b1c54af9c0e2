"""Benchmark of screener_nb.metrics on one synthetic CT-sized volume, on one thread.

Times, in the same run and on the same volume:

* ``aupro`` (AUPRO@0.3) and ``voxel_auroc`` (full and @0.3) of this package;
* sklearn's ``roc_auc_score`` on the ROI voxels (full AUROC; skip with ``--no-sklearn``);
* a straightforward per-threshold AUPRO reference: for each threshold, binarise
  the volume, count false positives and per-region overlaps
  (``scipy.ndimage.sum_labels``), then trapezoid. At full size it runs on
  ``--ref-thresholds`` thresholds only; its per-threshold cost is measured and
  the time for ``--thresholds`` thresholds is EXTRAPOLATED (printed as such);
* an exactness check on a small volume with quantised scores, where the
  reference loops over *every* distinct score, so both must agree to rounding.

Run: ``python -m screener_nb bench metrics [--shape 512 512 300]``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from screener_nb import metrics


def synthetic_case(shape=(512, 512, 300), n_lesions: int = 5, seed: int = 0):
    """(scores float32, labels bool, roi bool) of a CT-sized volume.

    ROI: an elliptic cylinder (the "body", ~60% of voxels). Scores: N(0, 1)
    noise; ``n_lesions`` balls of radius 3-20 voxels inside the body, their
    scores shifted by 0.5-3 so that AUPRO is neither 0 nor 1.
    """
    rng = np.random.default_rng(seed)
    x, y, z = (np.arange(n, dtype=np.float32) for n in shape)
    ex = ((x[:, None] - shape[0] / 2) / (0.45 * shape[0])) ** 2
    ey = ((y[None, :] - shape[1] / 2) / (0.4 * shape[1])) ** 2
    roi = np.broadcast_to((ex + ey <= 1)[:, :, None], shape).copy()
    scores = rng.standard_normal(shape, dtype=np.float32)
    labels = np.zeros(shape, bool)
    for k in range(n_lesions):
        r = float(rng.uniform(3, 20)) * min(shape) / 300
        c = [rng.uniform(0.3, 0.7) * n for n in shape]
        box = tuple(slice(max(0, int(ci - r) - 1), min(n, int(ci + r) + 2)) for ci, n in zip(c, shape))
        gx, gy, gz = np.ogrid[box]
        ball = (gx - c[0]) ** 2 + (gy - c[1]) ** 2 + (gz - c[2]) ** 2 <= r * r
        labels[box] |= ball
        scores[box][ball] += np.float32(0.5 + 2.5 * k / max(1, n_lesions - 1))
    return scores, labels & roi, roi


def reference_aupro(scores, labels, roi, thresholds, max_fpr=0.3, connectivity=26):
    """Straightforward AUPRO: one pass over the whole volume per threshold."""
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    regions, n = ndimage.label(labels & roi, structure=structure)
    sizes = np.bincount(regions.ravel())[1:]
    normal = roi & ~labels
    n_normal = np.count_nonzero(normal)
    fpr, pro = [0.0], [0.0]
    for t in np.sort(thresholds)[::-1]:
        pred = scores >= t
        fpr.append(np.count_nonzero(pred & normal) / n_normal)
        pro.append(float(np.mean(ndimage.sum_labels(pred, regions, index=np.arange(1, n + 1)) / sizes)))
    fpr, pro = np.array(fpr), np.array(pro)
    keep = fpr <= max_fpr
    if keep.all():  # thresholds stop before max_fpr: integrate what is there
        return float(np.trapezoid(pro, fpr) / max_fpr)
    j = np.argmax(~keep)
    end = pro[j - 1] + (pro[j] - pro[j - 1]) * (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
    return float(np.trapezoid(np.append(pro[keep], end), np.append(fpr[keep], max_fpr)) / max_fpr)


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench metrics", description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    p.add_argument("--lesions", type=int, default=5)
    p.add_argument("--thresholds", type=int, default=500,
                   help="threshold count the reference would need (extrapolation target)")
    p.add_argument("--ref-thresholds", type=int, default=20,
                   help="thresholds the reference actually runs at full size")
    p.add_argument("--check-shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    p.add_argument("--no-sklearn", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    try:  # one thread for every BLAS/OpenMP pool (numpy sorts and scipy.ndimage are single-threaded)
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(1)
    except ImportError:  # pragma: no cover
        limiter = None

    (scores, labels, roi), t_make = _timed(synthetic_case, tuple(a.shape), a.lesions, a.seed)
    n_roi, n_pos = int(np.count_nonzero(roi)), int(np.count_nonzero(labels))
    print(f"volume {'x'.join(map(str, a.shape))} float32 ({scores.size / 1e6:.1f} M voxels), ROI "
          f"{n_roi / 1e6:.1f} M voxels, {n_pos} lesion voxels in {a.lesions} balls; built in {t_make:.1f} s; "
          f"1 thread")

    fast_pro, t_pro = _timed(metrics.aupro, scores, labels, roi, max_fpr=0.3)
    fast_auc, t_auc = _timed(metrics.voxel_auroc, scores, labels, roi)
    fast_pauc, t_pauc = _timed(metrics.voxel_auroc, scores, labels, roi, max_fpr=0.3)
    acc = metrics.PooledMetrics()
    _, t_acc = _timed(lambda: (acc.update(scores, labels, roi), acc.compute(0.3)))
    print(f"screener_nb aupro@0.3       = {fast_pro:.6f}   {t_pro:7.3f} s")
    print(f"screener_nb voxel_auroc     = {fast_auc:.6f}   {t_auc:7.3f} s")
    print(f"screener_nb voxel_auroc@0.3 = {fast_pauc:.6f}   {t_pauc:7.3f} s")
    print(f"screener_nb PooledMetrics (all three at once, exact) {t_acc:7.3f} s")
    lo, hi = float(scores.min()), float(scores.max())
    hist = metrics.PooledMetrics("histogram", bins=65536, range=(lo, hi))
    (_, h), t_hist = _timed(lambda: (hist.update(scores, labels, roi), hist.compute(0.3)))
    print(f"screener_nb PooledMetrics histogram, 65536 bins: {t_hist:.2f} s; "
          f"auroc {h.auroc:.6f} (error {abs(h.auroc - fast_auc):.1e} <= bound {h.auroc_bound:.1e}), "
          f"auroc@0.3 error {abs(h.pauroc - fast_pauc):.1e} <= {h.pauroc_bound:.1e}, "
          f"aupro@0.3 error {abs(h.aupro - fast_pro):.1e} <= {h.aupro_bound:.1e}")

    if not a.no_sklearn:
        from sklearn.metrics import roc_auc_score
        sk, t_sk = _timed(lambda: roc_auc_score(labels[roi], scores[roi]))
        print(f"sklearn roc_auc_score       = {sk:.6f}   {t_sk:7.3f} s   |diff| = {abs(sk - fast_auc):.2e}   "
              f"sklearn/screener_nb time ratio = {t_sk / t_auc:.1f}x (measured)")

    # Reference thresholds: quantiles of the normal scores on an FPR grid reaching past 0.3.
    normal_scores = scores[roi & ~labels]
    rng = np.random.default_rng(a.seed)
    subset = normal_scores[rng.integers(0, normal_scores.size, 2_000_000)]
    del normal_scores
    n_ref = min(a.ref_thresholds, a.thresholds)
    thr = np.quantile(subset, 1 - np.linspace(0, 0.31, n_ref + 1)[1:])
    ref_pro, t_ref = _timed(reference_aupro, scores, labels, roi, thr, 0.3)
    per_thr = t_ref / n_ref
    print(f"reference aupro@0.3 on {n_ref} thresholds = {ref_pro:.6f}   {t_ref:7.3f} s measured "
          f"({per_thr:.3f} s per threshold); |diff| = {abs(ref_pro - fast_pro):.2e} "
          f"(the reference's {n_ref}-point trapezoid vs the exact curve)")
    ratio_measured = t_ref / t_pro
    print(f"  measured ratio reference({n_ref} thr)/screener_nb = {ratio_measured:.1f}x")
    if n_ref < a.thresholds:
        est = per_thr * a.thresholds
        print(f"  EXTRAPOLATED reference on {a.thresholds} thresholds: {est:.1f} s -> ratio "
              f"{est / t_pro:.0f}x (per-threshold cost x {a.thresholds}, not run)")
    del scores, labels, roi

    # Exactness: quantised scores, reference over every distinct score.
    s, lab, roi = synthetic_case(tuple(a.check_shape), a.lesions, a.seed + 1)
    s = np.round(s * 16) / 16  # ~150 distinct values: ties everywhere
    fast, t_fast = _timed(metrics.aupro, s, lab, roi, max_fpr=0.3)
    ref, t_r = _timed(reference_aupro, s, lab, roi, np.unique(s[roi]), 0.3)
    print(f"exactness check {'x'.join(map(str, a.check_shape))}, {np.unique(s[roi]).size} distinct scores: "
          f"screener_nb {fast:.12f} ({t_fast:.3f} s), reference over all thresholds {ref:.12f} "
          f"({t_r:.2f} s), |diff| = {abs(fast - ref):.1e}")
    if limiter is not None:
        limiter.restore_original_limits()


if __name__ == "__main__":  # pragma: no cover
    main()
