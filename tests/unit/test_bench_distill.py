"""``bench distill``: variant runs share the source run, and the comparison's figures are sklearn's and scipy's."""
from __future__ import annotations

import types

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from screener_nb.benchmarks.distill import compare_on_cases, variant_run


def _case(i, rng):
    label = np.zeros((12, 10, 8), np.uint8)
    label[3:6, 3:6, 2:5] = 1
    body = np.ones(label.shape, bool)
    body[0] = False
    return types.SimpleNamespace(id=f"v{i}", label=label, body=body, image=rng.random(label.shape))


def test_compare_on_cases_pools_the_voxels_and_averages_the_rank_correlation():
    rng = np.random.default_rng(0)
    cases = [_case(i, rng) for i in range(2)] + [types.SimpleNamespace(id="healthy", label=None, body=None)]
    teacher = {c.id: rng.normal(size=c.label.shape) + 2.0 * c.label for c in cases[:2]}
    student = {c.id: teacher[c.id] + rng.normal(scale=2.0, size=c.label.shape) for c in cases[:2]}
    out = compare_on_cases(None, cases, lambda c: teacher[c.id], lambda c: student[c.id])
    assert out["cases"] == ["v0", "v1"]  # the unlabelled case is left out
    y = np.concatenate([c.label[c.body] > 0 for c in cases[:2]])
    for name, maps in (("teacher", teacher), ("student", student)):
        expected = roc_auc_score(y, np.concatenate([maps[c.id][c.body] for c in cases[:2]]))
        assert out[f"auroc_{name}"] == pytest.approx(expected, abs=1e-12)
    assert out["difference"] == pytest.approx(out["auroc_student"] - out["auroc_teacher"])
    rho = np.mean([spearmanr(teacher[c.id][c.body], student[c.id][c.body]).statistic for c in cases[:2]])
    assert out["spearman_in_body"] == pytest.approx(rho)


def test_variant_run_links_the_stages_copies_the_teacher_maps_and_never_overwrites(tmp_path):
    src = tmp_path / "run"
    for stage in ("data", "density"):
        (src / stage).mkdir(parents=True)
    (src / "distill" / "teacher_maps").mkdir(parents=True)
    (src / "distill" / "teacher_maps" / "c.npy").write_bytes(b"x")
    (src / "distill" / "checkpoint.pt").write_bytes(b"old student")
    dest = variant_run(src, tmp_path / "variants" / "a")
    assert (dest / "data").is_symlink() and (dest / "density").resolve() == (src / "density").resolve()
    assert not (dest / "distill").is_symlink() and (dest / "distill" / "teacher_maps" / "c.npy").read_bytes() == b"x"
    assert not (dest / "distill" / "checkpoint.pt").exists()  # the variant trains its own student
    with pytest.raises(SystemExit, match="exists"):
        variant_run(src, dest)
