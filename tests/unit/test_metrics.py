"""screener_nb.metrics against sklearn, brute-force references written here, and hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from screener_nb import metrics as M
from screener_nb.errors import ConfigError, InputError

STRUCT_RANK = {6: 1, 18: 2, 26: 3, 4: 1, 8: 2}


# ----------------------------------------------------------------------------- references


def random_case(seed, shape=(10, 9, 8), levels=12, shift=1.0, roi_frac=0.85):
    """Scores rounded to few levels (many ties), blobby lesions (connectivity matters), random ROI."""
    rng = np.random.default_rng(seed)
    labels = ndimage.uniform_filter(rng.random(shape), 2) > 0.6
    scores = np.round(rng.random(shape) * levels + shift * levels * labels * rng.random(shape)) / levels
    roi = rng.random(shape) < roi_frac
    return scores.astype(np.float32), labels, roi


def sklearn_partial(y, s, max_fpr):
    """Raw partial ROC area / max_fpr: roc_curve + trapezoid, interpolated at max_fpr (no McClish)."""
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    stop = np.searchsorted(fpr, max_fpr, "right")
    end = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1]) if stop < fpr.size else tpr[-1]
    x = np.append(fpr[:stop], max_fpr)
    y_ = np.append(tpr[:stop], end)
    return np.trapezoid(y_, x) / max_fpr


def brute_aupro(scores, labels, rois, max_fpr, connectivity):
    """Per-threshold loop over every distinct score; regions by scipy per case; segment-wise integral."""
    if not isinstance(scores, list):
        scores, labels, rois = [scores], [labels], [rois]
    structure = ndimage.generate_binary_structure(scores[0].ndim, STRUCT_RANK[connectivity])
    regions, normals = [], []
    for s, lab, roi in zip(scores, labels, rois):
        cc, n = ndimage.label(lab & roi, structure)
        regions += [s[cc == k] for k in range(1, n + 1)]
        normals.append(s[roi & ~lab])
    normals = np.concatenate(normals)
    thresholds = np.unique(np.concatenate([s[roi] for s, roi in zip(scores, rois)]))[::-1]
    pts = [(0.0, 0.0)]
    for t in thresholds:
        pts.append((np.mean(normals >= t), np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= max_fpr:
            break
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y) / 2
            break
    return area / max_fpr


# ----------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_sklearn(seed):
    s, lab, roi = random_case(seed)
    assert M.voxel_auroc(s, lab, roi) == pytest.approx(roc_auc_score(lab[roi], s[roi]), abs=1e-12)
    assert M.voxel_auroc(s, lab) == pytest.approx(roc_auc_score(lab.ravel(), s.ravel()), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_fpr", [0.01, 0.1, 0.3, 0.77, 1.0])
def test_partial_auroc_matches_roc_curve_area(seed, max_fpr):
    s, lab, roi = random_case(seed)
    expected = sklearn_partial(lab[roi], s[roi], max_fpr)
    assert M.voxel_auroc(s, lab, roi, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-12)


def test_partial_auroc_at_an_exact_roc_vertex_and_not_mcclish():
    s, lab, roi = random_case(11)
    u = np.float32(0.5 + 1 / 24)  # between two score levels: only positives there -> a vertical ROC segment
    s[tuple(np.argwhere(lab & roi)[:5].T)] = u
    neg = s[roi & ~lab]
    m = np.count_nonzero(neg > u) / neg.size  # max_fpr exactly at the foot of that segment
    fpr, tpr, _ = roc_curve(lab[roi], s[roi], drop_intermediate=False)
    assert np.count_nonzero(fpr == m) >= 2 and 0.05 < m < 0.9
    ours = M.voxel_auroc(s, lab, roi, max_fpr=m)
    assert ours == pytest.approx(sklearn_partial(lab[roi], s[roi], m), abs=1e-12)
    mcclish = roc_auc_score(lab[roi], s[roi], max_fpr=0.3)
    assert abs(M.voxel_auroc(s, lab, roi, max_fpr=0.3) - mcclish) > 1e-3  # a different normalisation


def test_auroc_hand_cases():
    lab = np.zeros((4, 4, 4), bool)
    lab[:2, :2, :2] = True
    perfect = lab * 1.0
    assert M.voxel_auroc(perfect, lab) == 1.0
    assert M.voxel_auroc(perfect, lab, max_fpr=0.3) == 1.0
    assert M.voxel_auroc(-perfect, lab) == 0.0
    assert M.voxel_auroc(-perfect, lab, max_fpr=0.3) == 0.0
    ties = np.full(lab.shape, 0.7, np.float32)
    assert M.voxel_auroc(ties, lab) == 0.5
    # the diagonal: area 0.3^2 / 2 up to FPR 0.3, normalised by 0.3
    assert M.voxel_auroc(ties, lab, max_fpr=0.3) == pytest.approx(0.15, abs=1e-12)
    assert M.voxel_auroc(ties, lab, max_fpr=0.3) == pytest.approx(sklearn_partial(lab.ravel(), ties.ravel(), 0.3))
    # 2 positives {1, 3}, 2 normals {2, 0}: pairs won 3 of 4.
    s = np.array([1.0, 3.0, 2.0, 0.0]).reshape(2, 2, 1)
    y = np.array([1, 1, 0, 0], np.uint8).reshape(2, 2, 1)
    assert M.voxel_auroc(s, y) == 0.75


@pytest.mark.parametrize("transform", [np.exp, lambda x: 3.0 * x + 7.0, lambda x: np.arctan(x) * 0.5 + 1.0])
def test_monotone_transform_invariance(transform):
    rng = np.random.default_rng(3)
    s = rng.standard_normal((9, 9, 6))
    lab = ndimage.uniform_filter(rng.random(s.shape), 2) > 0.6
    s = s + lab
    roi = rng.random(s.shape) < 0.9
    t = transform(s)
    assert M.voxel_auroc(t, lab, roi) == pytest.approx(M.voxel_auroc(s, lab, roi), abs=1e-12)
    assert M.voxel_auroc(t, lab, roi, max_fpr=0.3) == pytest.approx(M.voxel_auroc(s, lab, roi, max_fpr=0.3), abs=1e-12)
    assert M.aupro(t, lab, roi) == pytest.approx(M.aupro(s, lab, roi), abs=1e-12)


def test_pooled_list_equals_concatenation_and_per_case():
    cases = [random_case(seed, shape=(6 + seed, 7, 5)) for seed in range(4)]
    s, lab, roi = (list(x) for x in zip(*cases))
    cat = [np.concatenate(x, axis=0) for x in (s, lab, roi)]
    assert M.voxel_auroc(s, lab, roi) == pytest.approx(M.voxel_auroc(*cat), abs=1e-12)
    assert M.voxel_auroc(s, lab, roi, max_fpr=0.2) == pytest.approx(M.voxel_auroc(*cat, max_fpr=0.2), abs=1e-12)
    per = M.voxel_auroc(s, lab, roi, per_case=True)
    expected = [roc_auc_score(lab_[r], s_[r]) for s_, lab_, r in cases]
    np.testing.assert_allclose(per, expected, atol=1e-12)
    assert not np.allclose(per, per[0])  # pooled != mean of cases in general: the cases differ


def test_torch_and_volume_inputs():
    from screener_nb.data.volume import Volume

    s, lab, roi = random_case(5)
    expected = M.voxel_auroc(s, lab, roi)
    assert M.voxel_auroc(torch.from_numpy(s), torch.from_numpy(lab), torch.from_numpy(roi)) == expected
    assert M.aupro(torch.from_numpy(s).to(torch.bfloat16), lab, roi) == pytest.approx(
        brute_aupro(torch.from_numpy(s).to(torch.bfloat16).float().numpy(), lab, roi, 0.3, 26), abs=1e-12)
    assert M.voxel_auroc(Volume.from_spacing(s), Volume.from_spacing(lab.astype(np.uint8)), roi) == expected


def test_mood_sampling_option():
    s, lab, roi = random_case(2, shape=(24, 24, 16))
    exact = M.voxel_auroc(s, lab, roi)
    assert M.voxel_auroc(s, lab, roi, sample=10**6) == pytest.approx(exact, abs=1e-12)  # all voxels
    a = M.voxel_auroc(s, lab, roi, sample=200, seed=1)
    assert a == M.voxel_auroc(s, lab, roi, sample=200, seed=1)
    assert a != M.voxel_auroc(s, lab, roi, sample=200, seed=2)
    assert abs(a - exact) < 0.1


# ----------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(connectivity, seed, max_fpr):
    s, lab, roi = random_case(seed)
    expected = brute_aupro(s, lab, roi, max_fpr, connectivity)
    assert M.aupro(s, lab, roi, max_fpr=max_fpr, connectivity=connectivity) == pytest.approx(expected, abs=1e-12)


def test_connectivity_changes_regions_and_result():
    s, lab, roi = random_case(0)
    counts = {c: ndimage.label(lab & roi, ndimage.generate_binary_structure(3, STRUCT_RANK[c]))[1] for c in (6, 26)}
    assert counts[6] > counts[26]  # the random case really exercises connectivity
    assert M.aupro(s, lab, roi, connectivity=6) != M.aupro(s, lab, roi, connectivity=26)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_aupro_2d(connectivity):
    s, lab, roi = random_case(4, shape=(20, 20))
    assert M.aupro(s, lab, roi, connectivity=connectivity) == pytest.approx(
        brute_aupro(s, lab, roi, 0.3, connectivity), abs=1e-12)


def test_aupro_hand_cases():
    lab = np.zeros((12, 12, 12), bool)
    centres = [(2, 2, 2), (2, 8, 8), (8, 2, 8), (8, 8, 2)]
    for c in centres:
        lab[c[0] : c[0] + 2 + c[1] // 4, c[1] : c[1] + 2, c[2] : c[2] + 3] = True  # different sizes
    assert ndimage.label(lab)[1] == 4
    perfect = lab.astype(np.float32)
    assert M.aupro(perfect, lab) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(perfect, lab, max_fpr=1.0) == pytest.approx(1.0, abs=1e-12)
    assert M.aupro(-perfect, lab) == 0.0
    missed = perfect.copy()
    c = centres[1]
    missed[c[0] : c[0] + 4, c[1] : c[1] + 2, c[2] : c[2] + 3] = -1.0  # one region below every normal
    for m in (0.1, 0.3, 0.999):
        assert M.aupro(missed, lab, max_fpr=m) == pytest.approx(1.0 - 1 / 4, abs=1e-12)
    # half of one region detected (the other half below every normal): PRO loses 1/2 of 1/4
    half = perfect.copy()
    region = np.argwhere(ndimage.label(lab)[0] == 1)
    half[tuple(region[: len(region) // 2].T)] = -1.0
    assert len(region) % 2 == 0
    assert M.aupro(half, lab) == pytest.approx(1.0 - 0.5 / 4, abs=1e-12)


def test_aupro_pools_regions_without_merging_across_cases():
    # Case A has a lesion on its last x-slice, case B on its first: concatenated naively they would merge.
    cases = []
    for seed in range(3):
        s, lab, roi = random_case(seed, shape=(8, 8, 6))
        lab[-1, 2:5, 2:4] = lab[0, 2:5, 2:4] = True
        roi[-1] = roi[0] = True
        cases.append((s, lab, roi))
    s, lab, roi = (list(x) for x in zip(*cases))
    pooled = M.aupro(s, lab, roi)
    assert pooled == pytest.approx(brute_aupro(s, lab, roi, 0.3, 26), abs=1e-12)
    gap = np.zeros((1, 8, 6), bool)  # a slice outside the ROI keeps the cases' regions apart
    sep = [np.concatenate(sum(([x, gap.astype(x.dtype)] for x in arr), [])[:-1], axis=0) for arr in (s, lab, roi)]
    assert pooled == pytest.approx(M.aupro(*sep), abs=1e-12)
    merged = [np.concatenate(x, axis=0) for x in (s, lab, roi)]
    assert abs(pooled - M.aupro(*merged)) > 1e-6  # merging regions would change the result
    per = M.aupro(s, lab, roi, per_case=True)
    np.testing.assert_allclose(per, [brute_aupro(*c, 0.3, 26) for c in cases], atol=1e-12)


# ----------------------------------------------------------------------------- streaming


def test_accumulator_exact_equals_functions_and_spill(tmp_path):
    cases = [random_case(seed, shape=(7, 8, 6)) for seed in range(5)]
    s, lab, roi = (list(x) for x in zip(*cases))
    for acc in (M.PooledMetrics(dice_threshold=0.5), M.PooledMetrics(dice_threshold=0.5, spill_dir=tmp_path)):
        for i, c in enumerate(cases):
            acc.update(*c, name=f"case{i}")
        r = acc.compute(max_fpr=0.3)
        assert r.auroc == pytest.approx(roc_auc_score(np.concatenate([l_[o] for _, l_, o in cases]),
                                                      np.concatenate([s_[o] for s_, _, o in cases])), abs=1e-12)
        assert r.pauroc == pytest.approx(M.voxel_auroc(s, lab, roi, max_fpr=0.3), abs=1e-12)
        assert r.aupro == pytest.approx(brute_aupro(s, lab, roi, 0.3, 26), abs=1e-12)
        assert r.dice == pytest.approx(M.dice(s, lab, 0.5, roi), abs=1e-12)
        assert (r.auroc_bound, r.pauroc_bound, r.aupro_bound) == (0.0, 0.0, 0.0)
        assert r.n_cases == 5 and r.n_positive == sum(np.count_nonzero(l_ & o) for _, l_, o in cases)
    assert any(tmp_path.iterdir())  # spilled to disk


@pytest.mark.parametrize("bins", [8, 32, 256])
def test_histogram_mode_within_reported_bound(bins):
    rng = np.random.default_rng(bins)
    cases = []
    for seed in range(3):
        s, lab, roi = random_case(seed, shape=(10, 10, 8), levels=1000)
        cases.append((s + rng.normal(0, 0.01, s.shape).astype(np.float32), lab, roi))
    exact, hist = M.PooledMetrics(), M.PooledMetrics("histogram", bins=bins, range=(0.0, 2.0))
    for c in cases:
        exact.update(*c)
        hist.update(*c)
    e, h = exact.compute(0.3), hist.compute(0.3)
    for name in ("auroc", "pauroc", "aupro"):
        err, bound = abs(getattr(e, name) - getattr(h, name)), getattr(h, f"{name}_bound")
        assert err <= bound + 1e-12, (name, err, bound)
        assert 0 < bound < 1
    if bins == 8:
        assert abs(e.auroc - h.auroc) > 1e-4  # coarse bins do change the value: the test can fail
    # Full-AUROC bound = half the fraction of (positive, normal) pairs sharing a bin, counted by brute force.
    pos = np.concatenate([s[lab & r] for s, lab, r in cases])
    neg = np.concatenate([s[r & ~lab] for s, lab, r in cases])
    bin_of = lambda x: np.clip(np.floor(x.astype(np.float64) / 2.0 * bins), 0, bins - 1)  # noqa: E731
    same = (bin_of(pos)[:, None] == bin_of(neg)[None, :]).mean()
    assert h.auroc_bound == pytest.approx(0.5 * same, rel=1e-9)


def test_histogram_with_explicit_edges_and_out_of_range_scores():
    s, lab, roi = random_case(1, levels=1000)
    s = s * 3 - 1  # beyond the edges on both sides: counted in the end bins
    edges = np.linspace(0, 1, 65)
    acc = M.PooledMetrics("histogram", bins=edges)
    acc.update(s, lab, roi)
    r = acc.compute()
    exact = M.voxel_auroc(s, lab, roi)
    assert abs(r.auroc - exact) <= r.auroc_bound + 1e-12
    assert abs(r.aupro - M.aupro(s, lab, roi)) <= r.aupro_bound + 1e-12


def test_curve_vertices_match_sklearn_and_areas():
    cases = [random_case(seed, shape=(7, 8, 6)) for seed in range(3)]
    acc = M.PooledMetrics()
    for c in cases:
        acc.update(*c)
    x, y = acc.curve("roc", max_points=None)
    y_true = np.concatenate([lab[r] for _, lab, r in cases])
    fpr, tpr, _ = roc_curve(y_true, np.concatenate([s[r] for s, _, r in cases]), drop_intermediate=False)
    ours = {(round(a, 12), round(b, 12)) for a, b in zip(x, y)}
    assert {(round(a, 12), round(b, 12)) for a, b in zip(fpr, tpr)} <= ours  # every sklearn vertex is on it
    assert np.all(np.diff(x) >= -1e-15) and np.all(np.diff(y) >= -1e-15)
    assert np.trapezoid(y, x) == pytest.approx(acc.compute().auroc, abs=1e-12)
    xp, yp = acc.curve("pro", max_points=None)
    assert np.trapezoid(yp, xp) == pytest.approx(brute_aupro(*(list(v) for v in zip(*cases)), 1.0, 26), abs=1e-12)
    assert len(acc.curve("roc", max_points=10)[0]) == 10


# ----------------------------------------------------------------------------- Dice


def test_dice_by_hand_and_roi():
    s = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.6]).reshape(1, 2, 3)
    y = np.array([1, 1, 1, 0, 0, 0]).reshape(1, 2, 3)
    # >= 0.6: predicted {0.9, 0.8, 0.7, 0.6}; TP 2, |pred| 4, |label| 3 -> 4/7
    assert M.dice(s, y, 0.6) == pytest.approx(4 / 7)
    roi = np.array([1, 1, 1, 0, 1, 1], bool).reshape(1, 2, 3)  # drop the 0.7 false positive
    assert M.dice(s, y, 0.6, roi) == pytest.approx(4 / 6)
    assert M.dice(s, y, 0.85) == pytest.approx(2 / 4)
    assert M.dice([s, s], [y, y], 0.6) == pytest.approx(8 / 14)
    np.testing.assert_allclose(M.dice([s, s], [y, y], 0.6, [None, roi], per_case=True), [4 / 7, 4 / 6])


def test_best_dice_is_max_over_thresholds():
    cases = [random_case(seed) for seed in range(3)]
    s, lab, roi = (list(x) for x in zip(*cases))
    best = M.best_dice(s, lab, roi)
    thresholds = np.unique(np.concatenate([x.ravel() for x in s]))
    every = np.array([M.dice(s, lab, float(t), roi) for t in thresholds])
    assert best.dice == pytest.approx(every.max(), abs=1e-12)
    assert np.all(best.dice >= every - 1e-12)
    assert M.dice(s, lab, best.threshold, roi) == pytest.approx(best.dice, abs=1e-12)
    per = M.best_dice(s, lab, roi, per_case=True)
    for k, c in enumerate(cases):
        assert per.dice[k] == pytest.approx(max(M.dice(*c[:2], float(t), c[2]) for t in np.unique(c[0])), abs=1e-12)


def test_validation_threshold_ignores_the_test_case():
    val = [random_case(seed) for seed in range(3)]
    vs, vl, vr = (list(x) for x in zip(*val))
    test_s, test_l, test_r = random_case(10, shift=3.0)
    thr = M.threshold_from_validation(vs, vl, vr, criterion="dice")
    # brute force, by hand: the pooled validation Dice at every distinct validation score
    s_all = np.concatenate([s[r] for s, r in zip(vs, vr)])
    y_all = np.concatenate([(lab > 0)[r] for lab, r in zip(vl, vr)])
    dices = {float(t): 2 * np.sum((s_all >= t) & y_all) / ((s_all >= t).sum() + y_all.sum()) for t in np.unique(s_all)}
    assert dices[thr] == pytest.approx(max(dices.values()), abs=1e-12)
    # the test-tuned threshold is another one: the validation rule did not see the test case
    # (that a pipeline's test maps never move it is tested end to end in test_evaluate.py)
    test_dices = {float(t): M.dice(test_s, test_l, float(t), test_r) for t in np.unique(test_s[test_r])}
    assert max(test_dices.values()) > M.dice(test_s, test_l, thr, test_r)
    p = M.threshold_from_validation(vs, vl, vr, criterion="normal_percentile", percentile=99.0)
    assert p == pytest.approx(np.percentile(np.concatenate([s[r & ~lab] for s, lab, r in val]), 99.0))
    # no labels: all ROI voxels count as normal (healthy validation scans)
    healthy = M.threshold_from_validation(vs, None, vr, criterion="normal_percentile", percentile=90.0)
    assert healthy == pytest.approx(np.percentile(np.concatenate([s[r] for s, _, r in val]), 90.0))


def test_binarize():
    lab = np.array([0, 1, 2, 2, 3])
    assert M.binarize(lab).tolist() == [False, True, True, True, True]
    assert M.binarize(lab, 2).tolist() == [False, False, True, True, False]
    assert M.binarize(torch.tensor(lab), [1, 3]).tolist() == [False, True, False, False, True]


# ----------------------------------------------------------------------------- bad input


def test_shape_mismatch():
    with pytest.raises(InputError, match=r"labels.*\(4, 4, 4\).*found shape \(4, 4, 3\)"):
        M.voxel_auroc(np.zeros((4, 4, 4)), np.zeros((4, 4, 3), bool))
    with pytest.raises(InputError, match=r"roi\[1\].*found shape \(2, 2, 2\)"):
        M.aupro([np.zeros((3, 3, 3))] * 2, [np.ones((3, 3, 3), bool)] * 2, [None, np.ones((2, 2, 2), bool)])
    with pytest.raises(InputError, match="list of 2 label volumes.*found a list of 1"):
        M.voxel_auroc([np.zeros((3, 3, 3))] * 2, [np.ones((3, 3, 3), bool)])


def test_non_binary_labels_name_the_values():
    s = np.zeros((3, 3, 3))
    lab = np.zeros((3, 3, 3), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 2, 7
    with pytest.raises(InputError, match=r"labels: expected a binary mask.*binarize.*found values \{0, 1\} and 2, 7"):
        M.voxel_auroc(s, lab)
    with pytest.raises(InputError, match=r"found values \{0, 1\} and 0.5"):
        M.aupro(s, np.full((3, 3, 3), 0.5))
    with pytest.raises(InputError, match=r"roi: expected a binary mask.*-1"):
        M.dice(s, np.zeros((3, 3, 3), bool), 0.5, roi=-np.ones((3, 3, 3), np.int16))


def test_undefined_auroc_raises_instead_of_half():
    s = np.random.default_rng(0).random((4, 4, 4))
    lab = np.zeros((4, 4, 4), bool)
    lab[0] = True
    with pytest.raises(InputError, match=r"labels: expected at least one lesion voxel and one normal.*found 16 lesion and 0 normal"):
        M.voxel_auroc(s, lab, roi=lab)  # ROI holds no normal voxel
    with pytest.raises(InputError, match=r"found 0 lesion and 48 normal"):
        M.voxel_auroc(s, lab, roi=~lab)  # ROI holds no lesion voxel
    with pytest.raises(InputError, match=r"found 0 lesion"):
        M.aupro(s, np.zeros((4, 4, 4), bool))
    with pytest.raises(InputError, match=r"labels\[1\].*found 0 lesion"):
        M.voxel_auroc([s, s], [lab, np.zeros_like(lab)], per_case=True)
    with pytest.raises(InputError, match="empty label and empty prediction"):
        M.dice(s, np.zeros_like(lab), 2.0)


def test_nan_scores():
    s = np.zeros((3, 3, 3), np.float32)
    s[0, 0, :2] = np.nan
    with pytest.raises(InputError, match=r"scores: expected scores without NaN, found 2 NaN value\(s\) of 27"):
        M.voxel_auroc(s, np.ones((3, 3, 3), bool))
    acc = M.PooledMetrics()
    with pytest.raises(InputError, match=r"scores\[ct_007\].*2 NaN"):
        acc.update(s, np.ones((3, 3, 3), bool), name="ct_007")


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.3", True])
def test_max_fpr_outside_unit_interval(bad):
    s, lab, roi = random_case(0)
    with pytest.raises(ConfigError, match=r"max_fpr: expected a number in \(0, 1\], found"):
        M.voxel_auroc(s, lab, roi, max_fpr=bad)
    with pytest.raises(ValueError, match="max_fpr"):
        M.aupro(s, lab, roi, max_fpr=bad)


def test_bad_parameters():
    s, lab, roi = random_case(0)
    with pytest.raises(ConfigError, match="connectivity.*found 5"):
        M.aupro(s, lab, roi, connectivity=5)
    with pytest.raises(ConfigError, match=r"connectivity: expected one of \[4, 8\] for 2D.*found 26"):
        M.aupro(s[:, :, 0], lab[:, :, 0], roi[:, :, 0])
    with pytest.raises(ConfigError, match="range"):
        M.PooledMetrics("histogram", bins=10)
    with pytest.raises(ConfigError, match="criterion.*found 'f1'"):
        M.threshold_from_validation([s], [lab], criterion="f1")
    with pytest.raises(ConfigError, match="sample"):
        M.voxel_auroc(s, lab, sample=0)
    with pytest.raises(ConfigError, match="best_dice: expected mode='exact'"):
        M.PooledMetrics("histogram", bins=4, range=(0, 1)).best_dice()
