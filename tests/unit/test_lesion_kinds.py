"""Per-kind voxel AUROC against sklearn on hand-made cases: each kind against normal body voxels only."""
from __future__ import annotations

import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from screener_nb.lesion_kinds import kind_aurocs

SHAPE = (10, 9, 8)


def _case(cid, dataset, labels, rng, kinds=("lidc",)):
    body = np.ones(SHAPE, bool)
    body[0] = False
    return types.SimpleNamespace(id=cid, dataset=dataset, label=(labels > 0).astype(np.uint8), body=body,
                                 lesion_kinds=list(kinds))


def test_kind_aurocs_match_sklearn_by_hand():
    rng = np.random.default_rng(0)
    lab_a = np.zeros(SHAPE, np.uint8)
    lab_a[2:4, 2:4, 2:4] = 1  # kind "cyst"
    lab_a[6:8, 5:7, 4:6] = 2  # kind "nodule"
    lab_b = np.zeros(SHAPE, np.uint8)
    lab_b[3:6, 3:6, 3:6] = 1  # kind "nodule"
    lab_r = np.zeros(SHAPE, np.uint8)
    lab_r[4:7, 2:5, 1:4] = 1
    cases = [_case("a", "phantoms", lab_a, rng), _case("b", "phantoms", lab_b, rng), _case("r", "real", lab_r, rng)]
    kinds = {"a": (lab_a, ["cyst", "nodule"]), "b": (lab_b, ["nodule"])}
    maps = {"m": {c.id: rng.normal(size=SHAPE) + 1.0 * (c.label > 0) for c in cases}}
    out = kind_aurocs(maps, cases, kinds)["m"]
    assert set(out) == {("phantoms", "cyst"), ("phantoms", "nodule"), ("real", "lidc")}

    def by_hand(cs, is_kind):
        y, s = [], []
        for c in cs:
            body, lesion = c.body, c.label > 0
            keep = body & (~lesion | is_kind[c.id])  # other kinds' lesions are left out
            y.append(is_kind[c.id][keep])
            s.append(maps["m"][c.id][keep])
        return roc_auc_score(np.concatenate(y), np.concatenate(s))

    a, b, r = cases
    assert out[("phantoms", "cyst")] == pytest.approx(by_hand([a, b], {"a": lab_a == 1, "b": np.zeros(SHAPE, bool)}), abs=1e-12)
    assert out[("phantoms", "nodule")] == pytest.approx(by_hand([a, b], {"a": lab_a == 2, "b": lab_b == 1}), abs=1e-12)
    assert out[("real", "lidc")] == pytest.approx(by_hand([r], {"r": lab_r == 1}), abs=1e-12)
