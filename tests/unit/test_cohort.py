"""The preprocessed-case format: write, index, load by role / id / path, and refused inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from screener_nb.data import load_case as package_load_case
from screener_nb.data.cohort import (
    PreprocessedCase,
    crop_bbox_of,
    load_case,
    load_cohort,
    write_case,
    write_index,
)
from screener_nb.data.io import write_nifti
from screener_nb.data.preprocess import PreprocessParams, preprocess
from screener_nb.data.volume import Volume
from screener_nb.errors import InputError

from .synthetic import elliptic_scan

PARAMS = PreprocessParams(clahe=False)


def scan(seed=0, shape=(30, 26, 10)):
    return elliptic_scan(seed, shape)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "r1"
    data = run / "data"
    entries = []
    for n, role in enumerate(["train", "train", "val", "test"]):
        vol, lab = scan(n)
        pre = preprocess(vol, PARAMS, label=lab if role == "test" else None)
        entries.append(write_case(data, f"case_{n:03d}", pre, dataset="phantom", role=role,
                                  lesion_kinds=["nodule"] if role == "test" else [], source=vol.source,
                                  sha256=f"{n:064x}"))
    write_index(data, entries, PARAMS)
    return run


def test_layout_and_index_follow_the_contract(run_dir):
    data = run_dir / "data"
    index = json.loads((data / "index.json").read_text())
    assert index["preprocess"] == PARAMS.to_dict()
    assert [e["id"] for e in index["cases"]] == ["case_000", "case_001", "case_002", "case_003"]
    e = index["cases"][3]
    assert e == {"id": "case_003", "dataset": "phantom", "role": "test", "lesion_kinds": ["nodule"],
                 "has_label": True, "dir": "cases/case_003"}
    case = data / "cases" / "case_003"
    assert sorted(p.name for p in case.iterdir()) == ["body.npy", "image.npy", "label.npy", "meta.json"]
    assert np.load(case / "image.npy").dtype == np.float32
    assert np.load(case / "body.npy").dtype == bool
    assert np.load(case / "label.npy").dtype == np.uint8
    meta = json.loads((case / "meta.json").read_text())
    for key in ("spacing", "affine", "record", "source", "sha256", "params"):
        assert key in meta
    assert meta["source"] == "scan3.nii.gz" and meta["sha256"] == f"{3:064x}"
    assert not (data / "cases" / "case_000" / "label.npy").exists()


def test_load_cohort_by_role_is_memory_mapped_and_equal_to_what_was_written(run_dir):
    all_cases = load_cohort(run_dir)
    assert [c.role for c in all_cases] == ["train", "train", "val", "test"]
    train = load_cohort(run_dir, role="train")
    assert [c.id for c in train] == ["case_000", "case_001"]
    test = load_cohort(run_dir, role="test")[0]
    assert isinstance(test, PreprocessedCase) and isinstance(test.image, np.memmap)
    vol, lab = scan(3)
    pre = preprocess(vol, PARAMS, label=lab)  # recomputed independently of the files
    np.testing.assert_array_equal(test.image, pre.image)
    np.testing.assert_array_equal(test.body, pre.body)
    np.testing.assert_array_equal(test.label, pre.label)
    np.testing.assert_allclose(test.affine, pre.affine)
    assert test.spacing == pytest.approx(pre.spacing) and test.lesion_kinds == ["nodule"]
    assert train[0].label is None
    # a map on the case's grid comes back on the original scan's grid
    back = test.to_original_grid(np.asarray(test.label))
    assert back.shape == vol.shape and back[14, 12, 4] == 1
    assert load_cohort(run_dir / "data", role="val")[0].id == "case_002"  # the data dir itself works too
    with pytest.raises(InputError, match=r"r1: expected a role among \('train', 'val', 'test', 'calib'\) or None, found 'dev'"):
        load_cohort(run_dir, role="dev")


def test_load_case_by_id_path_and_folder(run_dir, tmp_path):
    c = load_case("case_002", run_dir=run_dir)
    assert isinstance(c, PreprocessedCase) and c.role == "val"
    with pytest.raises(InputError) as e:
        load_case("case_999", run_dir=run_dir)
    assert "'case_999'" in str(e.value) and "case_000, case_001, case_002, case_003" in str(e.value)
    assert "index.json" in str(e.value)

    vol, _ = scan(0)
    path = write_nifti(vol, tmp_path / "ct.nii.gz")
    v = load_case(path)
    assert isinstance(v, Volume) and v.shape == vol.shape
    assert isinstance(package_load_case(str(path)), Volume)  # the lazy package entry point
    f = load_case(run_dir / "data" / "cases" / "case_001")
    assert isinstance(f, PreprocessedCase) and f.id == "case_001"
    with pytest.raises(InputError, match=r"missing\.nii\.gz: expected an existing scan file.*found no such file"):
        load_case(tmp_path / "missing.nii.gz")


def test_missing_or_incomplete_data_is_refused(run_dir, tmp_path):
    with pytest.raises(InputError, match=r"empty_run: expected a preprocessed cohort .*run the data stage first"):
        load_cohort(tmp_path / "empty_run")
    (run_dir / "data" / "cases" / "case_001" / "meta.json").unlink()  # as after a crash mid-write
    with pytest.raises(InputError, match=r"case_001: expected a complete preprocessed case"):
        load_cohort(run_dir)
    (run_dir / "data" / "cases" / "case_000" / "body.npy").unlink()
    with pytest.raises(InputError, match=r"body\.npy: expected the body array of case case_000, found no such file"):
        load_case("case_000", run_dir=run_dir)


def test_write_checks(tmp_path):
    vol, _ = scan(0)
    pre = preprocess(vol, PARAMS)
    with pytest.raises(InputError, match=r"expected a case id of letters.*found '\.\./x'"):
        write_case(tmp_path, "../x", pre, dataset="d", role="train")
    with pytest.raises(InputError, match=r"case c1: expected a role among.*found 'training'"):
        write_case(tmp_path, "c1", pre, dataset="d", role="training")
    with pytest.raises(InputError, match=r"case c1: expected a label of the image's shape"):
        write_case(tmp_path, "c1", pre, np.zeros((2, 2, 2), np.uint8), dataset="d", role="test")
    e = write_case(tmp_path, "c1", pre, dataset="d", role="train")
    with pytest.raises(InputError, match=r"index\.json: expected unique case ids, found 'c1' twice"):
        write_index(tmp_path, [e, e], PARAMS)
    # rewriting a case without a label removes the stale label of an earlier write
    write_case(tmp_path, "c2", pre, np.ones(pre.shape, np.uint8), dataset="d", role="test")
    assert (tmp_path / "cases" / "c2" / "label.npy").exists()
    write_case(tmp_path, "c2", pre, dataset="d", role="train")
    assert not (tmp_path / "cases" / "c2" / "label.npy").exists()
    assert load_case(tmp_path / "cases" / "c2").label is None


def test_crop_bbox_of_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = np.zeros((9, 8, 7), bool)
        pts = rng.integers(0, [9, 8, 7], size=(3, 3))
        mask[tuple(pts.T)] = True
        sl = crop_bbox_of(mask, margin=1)
        ref = [(max(pts[:, a].min() - 1, 0), min(pts[:, a].max() + 2, mask.shape[a])) for a in range(3)]
        assert [(s.start, s.stop) for s in sl] == ref
        assert mask[sl].sum() == mask.sum()
