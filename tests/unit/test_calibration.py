"""Label-free thresholds (metrics.calibrate_threshold) on real healthy phantoms: calibrated on some,
checked on fresh ones, the flagged rate matches the nominal one within its sampling error."""
from __future__ import annotations

import numpy as np
import pytest

from screener_nb.errors import ConfigError, InputError
from screener_nb.evaluate import zscore_baseline
from screener_nb.metrics import calibrate_threshold


@pytest.fixture(scope="module")
def healthy_scores():
    """The z-score baseline's maps of 64 healthy phantoms (a real method fitted on 2 others)."""
    from screener_nb.data.phantoms import generate_case
    from screener_nb.data.preprocess import PreprocessParams, preprocess

    def healthy(seed):
        c = generate_case(seed, lesions=False, shape=(40, 40, 32), spacing=(5.0, 5.0, 5.5))
        return preprocess(c.image, PreprocessParams(clahe=False, spacing=(5.0, 5.0, 5.5)))

    baseline = zscore_baseline([healthy(s) for s in (1, 2)])
    scans = [healthy(100 + s) for s in range(64)]
    return [(baseline.score_preprocessed(c.image, c.body), np.asarray(c.body, bool)) for c in scans]


def test_scan_rule_flags_the_nominal_share_of_fresh_healthy_scans(healthy_scores):
    cal, fresh = healthy_scores[:32], healthy_scores[32:]
    rate = 0.25
    t = calibrate_threshold([m for m, _ in cal], [b for _, b in cal], rate, unit="scan")
    flagged = np.mean([m[b].max() >= t for m, b in fresh])
    # each scan is one Bernoulli trial; the threshold itself is estimated from 32 scans
    se = np.sqrt(rate * (1 - rate) * (1 / len(fresh) + 1 / len(cal)))
    assert abs(flagged - rate) <= 3 * se


def test_voxel_rule_flags_the_nominal_share_of_fresh_healthy_tissue(healthy_scores):
    cal, fresh = healthy_scores[:32], healthy_scores[32:]
    rate = 0.01
    t = calibrate_threshold([m for m, _ in cal], [b for _, b in cal], rate, unit="voxel")
    per_scan = np.array([np.mean(m[b] >= t) for m, b in fresh])
    n_body = sum(int(b.sum()) for _, b in fresh)
    pooled = sum(int((m[b] >= t).sum()) for m, b in fresh) / n_body
    # voxels of one scan are not independent: the error is the spread between scans
    se = per_scan.std(ddof=1) * np.sqrt(1 / len(fresh) + 1 / len(cal))
    assert abs(pooled - rate) <= 3 * se
    # on the calibration scans themselves: at most the nominal rate, and the next lower distinct
    # value would exceed it (a brute-force search over the distinct values)
    cal_vals = np.concatenate([m[b] for m, b in cal])
    assert np.mean(cal_vals >= t) <= rate
    lower = cal_vals[cal_vals < t].max()
    assert np.mean(cal_vals >= lower) > rate


def test_ties_are_never_split():
    m = np.array([0.0] * 90 + [1.0] * 6 + [2.0] * 4).reshape(10, 10, 1)
    assert calibrate_threshold([m], None, 0.05) == 2.0  # 4 % flagged; 1.0 would flag 10 %
    assert calibrate_threshold([m], None, 0.10) == 1.0
    assert calibrate_threshold([m], None, 0.01) > 2.0  # nothing can be flagged at 1 %


def test_calibration_errors():
    m = np.zeros((4, 4, 4))
    with pytest.raises(ConfigError, match="rate"):
        calibrate_threshold([m], None, 1.5)
    with pytest.raises(ConfigError, match="unit"):
        calibrate_threshold([m], None, 0.1, unit="patient")
    with pytest.raises(InputError, match="healthy scan"):
        calibrate_threshold([], None, 0.1)
    with pytest.raises(InputError, match="ROI voxel"):
        calibrate_threshold([m], [np.zeros((4, 4, 4), bool)], 0.1)
