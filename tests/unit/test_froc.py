"""FROC (metrics.PooledFROC) against a brute-force flood-fill implementation and hand-made cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from screener_nb.errors import ConfigError, InputError
from screener_nb.metrics import FROC_FP_RATES, PooledFROC


def flood_regions(mask):
    """Connected 26-neighbour regions of a boolean volume as lists of voxels, by explicit flood fill."""
    seen, regions = set(), []
    todo = sorted(map(tuple, np.argwhere(mask)))
    inside = set(todo)
    for start in todo:
        if start in seen:
            continue
        region, stack = [], [start]
        seen.add(start)
        while stack:
            p = stack.pop()
            region.append(p)
            for d in itertools.product((-1, 0, 1), repeat=3):
                q = (p[0] + d[0], p[1] + d[1], p[2] + d[2])
                if q in inside and q not in seen:
                    seen.add(q)
                    stack.append(q)
        regions.append(set(region))
    return regions


def brute_counts(cases, thresholds, min_voxels, min_precision):
    """(hits, false positives) per threshold, summed over the cases, straight from the definition."""
    hits, fps = np.zeros(len(thresholds), int), np.zeros(len(thresholds), int)
    n_lesions = 0
    for s, lab, roi in cases:
        lesions = flood_regions(lab & roi)
        n_lesions += len(lesions)
        lesion_voxels = set().union(*lesions) if lesions else set()
        for k, t in enumerate(thresholds):
            hit = set()
            for region in flood_regions((s >= t) & roi):
                if len(region) < min_voxels:
                    continue
                overlap = len(region & lesion_voxels)
                if overlap and overlap >= min_precision * len(region):
                    hit |= {i for i, les in enumerate(lesions) if region & les}
                else:
                    fps[k] += 1
            hits[k] += len(hit)
    return hits, fps, n_lesions


def random_case(seed, shape=(12, 11, 8)):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, bool)
    for _ in range(3):
        c = rng.integers(1, np.array(shape) - 2)
        r = rng.integers(1, 3)
        lab[tuple(slice(max(0, a - r), a + r) for a in c)] = True
    from scipy import ndimage

    s = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) + 0.8 * ndimage.gaussian_filter(lab * 1.0, 0.7)
    roi = np.ones(shape, bool)
    roi[0] = False
    return s.astype(np.float32), lab, roi


@pytest.mark.parametrize("min_voxels, min_precision", [(1, 0.0), (3, 0.02), (2, 0.5)])
def test_counts_equal_a_flood_fill_brute_force(min_voxels, min_precision):
    cases = [random_case(i) for i in range(4)]
    thresholds = np.quantile(np.concatenate([c[0][c[2]] for c in cases]), [0.5, 0.7, 0.8, 0.9, 0.95, 0.99])[::-1]
    spacing = (1.0, 2.0, 2.5)  # 5 mm^3 per voxel
    froc = PooledFROC(thresholds, min_region_ml=min_voxels * 5.0 / 1000 - 1e-9, min_precision=min_precision)
    for i, (s, lab, roi) in enumerate(cases):
        froc.update(s, lab, roi, spacing=spacing, name=str(i))
    hits, fps, n_les = brute_counts(cases, thresholds, min_voxels, min_precision)
    assert froc.n_lesions == n_les and froc.n_scans == 4
    np.testing.assert_array_equal(froc.hits, hits)
    np.testing.assert_array_equal(froc.false_positives, fps)
    assert fps.max() > 0 and hits.max() > 0  # the cases exercise both counts


def test_hand_case_sensitivity_at_fp_rates_and_cpm():
    # two scans; scan A: two lesions, scores put one lesion high (0.9), one low (0.5), and an FP
    # blob at 0.7; scan B: healthy with an FP blob at 0.8
    a = np.zeros((10, 10, 10), np.float32)
    lab = np.zeros_like(a, bool)
    lab[1:3, 1:3, 1:3] = True
    lab[6:8, 6:8, 6:8] = True
    a[1:3, 1:3, 1:3] = 0.9
    a[6:8, 6:8, 6:8] = 0.5
    a[1:3, 7:9, 1:3] = 0.7
    b = np.zeros_like(a)
    b[4:6, 4:6, 4:6] = 0.8
    froc = PooledFROC([0.95, 0.85, 0.75, 0.65, 0.45])
    froc.update(a, lab)
    froc.update(b, None)
    r = froc.compute()
    # thresholds 0.95 .. 0.45: FP regions 0, 0, 1, 2, 2 (of 2 scans); lesions hit 0, 1, 1, 1, 2 (of 2)
    np.testing.assert_allclose(r.curve_fp_per_scan, [0, 0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(r.curve_sensitivity, [0, 0.5, 0.5, 0.5, 1.0])
    expected = {0.125: 0.5, 0.25: 0.5, 0.5: 0.5, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    np.testing.assert_allclose(r.sensitivity, [expected[x] for x in FROC_FP_RATES])
    assert r.cpm == pytest.approx(np.mean(list(expected.values())))
    assert r.n_lesions == 2 and r.n_scans == 2


def test_a_region_spread_over_the_body_points_at_no_lesion():
    s = np.ones((20, 20, 20), np.float32)  # everything above the threshold: one huge region
    lab = np.zeros(s.shape, bool)
    lab[5:7, 5:7, 5:7] = True  # 8 of 8000 voxels: 0.1 % of the region
    froc = PooledFROC([0.5], min_precision=0.02)
    froc.update(s, lab)
    assert froc.hits.tolist() == [0] and froc.false_positives.tolist() == [1]
    loose = PooledFROC([0.5], min_precision=0.0)
    loose.update(s, lab)
    assert loose.hits.tolist() == [1] and loose.false_positives.tolist() == [0]


def test_quantile_thresholds_and_bad_inputs():
    m = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    t = PooledFROC.quantile_thresholds([m], n=3, top=(0.001, 0.1))
    np.testing.assert_allclose(t, np.quantile(m.ravel(), [0.9, 1 - 0.01, 0.999]))
    with pytest.raises(ConfigError, match="min_precision"):
        PooledFROC([0.5], min_precision=2)
    with pytest.raises(ConfigError, match="finite"):
        PooledFROC([np.nan])
    froc = PooledFROC([0.5])
    with pytest.raises(InputError, match="at least one scan"):
        froc.compute()
    froc.update(np.zeros((3, 3, 3)), None)
    with pytest.raises(InputError, match="sensitivity is undefined"):
        froc.compute()
    with pytest.raises(InputError, match="3D map"):
        froc.update(np.zeros((3, 3)), None)
