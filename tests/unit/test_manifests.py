"""Dataset manifests: shipped YAMLs valid, clear errors, images paired with labels on a fake tree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from screener_nb.data import manifests as M
from screener_nb.data.samples import load_samples_manifest
from screener_nb.errors import InputError

# The paper's datasets and case counts (docs/method.md, "Training data" / "Test"), written out by hand.
PAPER = {"nlst": ("train", 25652), "amos": ("train", 2123), "abdomenatlas": ("train", 4607),
         "lidc_idri": ("test", 1017), "midrc_ricord_1a": ("test", 115), "kits21": ("test", 298),
         "lits": ("test", 117)}


def test_every_shipped_manifest_is_valid():
    assert set(M.list_manifests()) == set(PAPER)
    for name, (role, n) in PAPER.items():
        m = M.load_manifest(name)
        assert (m.role, m.n_cases, m.modality) == (role, n, "CT")
        assert m.homepage.startswith("https://") and m.licence and m.citation and m.quirks
        if role == "test":
            assert m.labels.target and m.layout.labels, name
            assert set(m.labels.target) <= set(m.labels.values), name
    assert M.load_manifest("kits21").labels.values[2] == "tumour"
    assert M.load_manifest("kits21").labels.target == (2,)
    assert M.load_manifest("lits").label_fixes_for("lits_050")
    # every YAML in the folder parses; samples.yaml passes its own validation
    for path in M.manifest_dirs()[0].glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    assert len(load_samples_manifest()["cases"]) >= 5


def _write_without(tmp_path: Path, dotted: str) -> Path:
    data = yaml.safe_load(M.manifest_path("kits21").read_text())
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[last]
    path = tmp_path / "kits21.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("field", ["licence", "homepage", "n_cases", "role", "layout.images", "labels.target"])
def test_missing_field_names_file_and_field(tmp_path, field):
    path = _write_without(tmp_path, field)
    with pytest.raises(InputError) as e:
        M.load_manifest(path)
    assert str(path) in str(e.value) and f"'{field}'" in str(e.value)


def test_wrong_type_names_field_and_found_value(tmp_path):
    data = yaml.safe_load(M.manifest_path("lits").read_text())
    data["n_cases"] = "many"
    path = tmp_path / "lits.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="n_cases") as e:
        M.load_manifest(path)
    assert "many" in str(e.value) and str(path) in str(e.value)


def test_broken_yaml_names_file(tmp_path):
    path = tmp_path / "nlst.yaml"
    path.write_text("name: nlst\nquirks: [unclosed\n")
    with pytest.raises(InputError, match="valid YAML") as e:
        M.load_manifest(path)
    assert str(path) in str(e.value)


def test_unknown_name_lists_known_names():
    with pytest.raises(InputError) as e:
        M.load_manifest("kits19")
    msg = str(e.value)
    assert "kits19" in msg
    for name in PAPER:
        assert name in msg


def test_manifest_dir_override(tmp_path, monkeypatch):
    data = yaml.safe_load(M.manifest_path("lits").read_text())
    data["name"] = "mylits"
    (tmp_path / "mylits.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv(M.MANIFEST_DIR_ENV, str(tmp_path))
    assert "mylits" in M.list_manifests()
    assert M.load_manifest("mylits").layout == M.load_manifest("lits").layout


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


@pytest.fixture
def fake_tree(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _touch(root,
           "kits21/kits21/data/case_00000/imaging.nii.gz", "kits21/kits21/data/case_00000/aggregated_MAJ_seg.nii.gz",
           "kits21/kits21/data/case_00003/imaging.nii.gz",
           "LiTS/Training Batch 1/volume-0.nii", "LiTS/Training Batch 1/segmentation-0.nii",
           "LiTS/Training Batch 2/volume-48.nii", "LiTS/Training Batch 2/segmentation-48.nii",
           "LiTS/Test/volume-130.nii",
           "amos22/imagesTr/amos_0001.nii.gz", "amos22/labelsTr/amos_0001.nii.gz",
           "amos22/imagesVa/amos_0005.nii.gz", "amos22/labelsVa/amos_0005.nii.gz",
           "amos22/imagesTr/amos_0507.nii.gz", "amos22/labelsTr/amos_0507.nii.gz",  # MRI: excluded
           "amos22/imagesTs/amos_0100.nii.gz",
           "LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-30178/3000566-03192/1-001.dcm",
           "LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-30178/3000566-03192/069.xml",
           "LIDC-IDRI/LIDC-IDRI-0002/01-01-2000-11111/3000522-04919/1-001.dcm",
           "LIDC-IDRI/LIDC-IDRI-0002/01-01-2000-11111/3000522-04919/071.xml",
           "LIDC-IDRI/LIDC-IDRI-0002/01-01-2001-22222/3000999-00001/1-001.dcm")
    monkeypatch.setenv(M.DATA_DIR_ENV, str(root))
    return root


def _rel(cases, root):
    return [(c.case_id, c.image.relative_to(root).as_posix(), c.label.relative_to(root).as_posix() if c.label else None)
            for c in cases]


def test_find_cases_pairs_images_and_labels(fake_tree):
    r = fake_tree
    assert _rel(M.find_cases("kits21"), r) == [
        ("kits21_case_00000", "kits21/kits21/data/case_00000/imaging.nii.gz",
         "kits21/kits21/data/case_00000/aggregated_MAJ_seg.nii.gz"),
        ("kits21_case_00003", "kits21/kits21/data/case_00003/imaging.nii.gz", None),
    ]
    assert _rel(M.find_cases("lits"), r) == [
        ("lits_000", "LiTS/Training Batch 1/volume-0.nii", "LiTS/Training Batch 1/segmentation-0.nii"),
        ("lits_048", "LiTS/Training Batch 2/volume-48.nii", "LiTS/Training Batch 2/segmentation-48.nii"),
        ("lits_130", "LiTS/Test/volume-130.nii", None),
    ]
    assert _rel(M.find_cases("amos"), r) == [
        ("amos_0001", "amos22/imagesTr/amos_0001.nii.gz", "amos22/labelsTr/amos_0001.nii.gz"),
        ("amos_0005", "amos22/imagesVa/amos_0005.nii.gz", "amos22/labelsVa/amos_0005.nii.gz"),
        ("amos_0100", "amos22/imagesTs/amos_0100.nii.gz", None),
    ]
    s1 = "LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-30178/3000566-03192"
    s2 = "LIDC-IDRI/LIDC-IDRI-0002/01-01-2000-11111/3000522-04919"
    s3 = "LIDC-IDRI/LIDC-IDRI-0002/01-01-2001-22222/3000999-00001"
    assert _rel(M.find_cases("lidc_idri"), r) == [
        ("LIDC-IDRI-0001", s1, f"{s1}/069.xml"),
        ("LIDC-IDRI-0002", s2, f"{s2}/071.xml"),
        ("LIDC-IDRI-0002_2", s3, None),  # second series of the same patient
    ]


def test_find_cases_explicit_dir_without_env(fake_tree, monkeypatch):
    monkeypatch.delenv(M.DATA_DIR_ENV)
    assert [c.case_id for c in M.find_cases("kits21", fake_tree)] == ["kits21_case_00000", "kits21_case_00003"]


def test_find_cases_env_unset_names_variable(monkeypatch):
    monkeypatch.delenv(M.DATA_DIR_ENV, raising=False)
    with pytest.raises(InputError, match=M.DATA_DIR_ENV):
        M.find_cases("lits")


def test_find_cases_missing_folder_names_it(tmp_path):
    with pytest.raises(InputError) as e:
        M.find_cases("kits21", tmp_path)
    assert str(tmp_path / "kits21") in str(e.value) and "no such folder" in str(e.value)


def test_ambiguous_label_is_an_error(fake_tree):
    _touch(fake_tree, "LiTS/extra/segmentation-0.nii.gz")
    with pytest.raises(InputError, match="at most one label") as e:
        M.find_cases("lits")
    assert "volume-0.nii" in str(e.value)


def test_check_reports_presence_and_counts(fake_tree, capsys):
    from screener_nb.data import status

    rows = {r.name: r for r in status.check(fake_tree)}
    assert (rows["kits21"].present, rows["kits21"].n_found, rows["kits21"].n_labelled) == (True, 2, 1)
    assert (rows["lits"].n_found, rows["lits"].n_labelled) == (3, 2)
    assert not rows["nlst"].present and rows["nlst"].note == "not downloaded"
    assert not rows["samples"].present  # <data>/samples was never fetched
    assert status.main_check(["--data-dir", str(fake_tree)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("kits21"))
    assert line.split()[:5] == ["kits21", "test", "yes", "2", "1"]


def test_label_fix_flips_only_listed_cases():
    a = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(M.apply_label_fixes("lits", "lits_050", a), a[::-1])
    np.testing.assert_array_equal(M.apply_label_fixes("lits", "lits_047", a), a)
