"""Reading/writing scans: geometry against hand-computed world positions, and every refused input."""
from __future__ import annotations

import gzip

import nibabel as nib
import nrrd
import numpy as np
import pytest

from screener_nb.data.io import (
    check_ct_intensities,
    read_label,
    read_volume,
    require_min_shape,
    write_nifti,
)
from screener_nb.data.volume import Volume
from screener_nb.errors import InputError


def ct_like(shape=(12, 10, 8), seed=0) -> np.ndarray:
    """Air around a soft-tissue block with some bone: valid CT in HU."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000.0, np.float32) + rng.normal(0, 5, shape).astype(np.float32)
    a[2:-2, 2:-2, 1:-1] = 40.0
    a[4:6, 4:6, 2:4] = 700.0
    return a


OBLIQUE_AFFINE = np.array([
    [0.0, 0.0, -2.5, 100.0],
    [-0.7, 0.1, 0.0, -20.0],
    [0.05, 0.8, 0.0, 33.0],
    [0.0, 0.0, 0.0, 1.0],
])


# --------------------------------------------------------------------------- NIfTI
def test_nifti_roundtrip_keeps_values_and_affine_in_qform_and_sform(tmp_path):
    vol = Volume(ct_like(), OBLIQUE_AFFINE, "mem")
    path = write_nifti(vol, tmp_path / "ct.nii.gz")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    img = nib.load(str(path))
    q, qcode = img.header.get_qform(coded=True)
    s, scode = img.header.get_sform(coded=True)
    assert int(qcode) == 1 and int(scode) == 1
    # the qform is a rotation+zoom: this affine has a tiny shear, so compare the rigid parts loosely
    np.testing.assert_allclose(s, vol.affine, atol=1e-4)
    np.testing.assert_allclose(q[:3, 3], vol.affine[:3, 3], atol=1e-3)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_nifti_orthogonal_affine_qform_equals_sform(tmp_path):
    aff = np.diag([-0.8, 0.8, 2.0, 1.0])
    aff[:3, 3] = [10, -5, 3]
    path = write_nifti(Volume(ct_like(), aff), tmp_path / "a.nii")
    q, _ = nib.load(str(path)).header.get_qform(coded=True)
    np.testing.assert_allclose(q, aff, atol=1e-5)


def test_write_nifti_refuses_other_suffix(tmp_path):
    with pytest.raises(InputError, match=r"out\.mha.*\.nii"):
        write_nifti(Volume(ct_like(), np.eye(4)), tmp_path / "out.mha")


def test_nifti_4d_trailing_singleton_is_squeezed(tmp_path):
    path = tmp_path / "ct4.nii.gz"
    nib.save(nib.Nifti1Image(ct_like()[..., None], np.eye(4)), str(path))
    assert read_volume(path).shape == (12, 10, 8)


@pytest.mark.parametrize("shape,found", [((12, 10), "2D"), ((12, 10, 8, 2), "4D"), ((12, 10, 1), "2D")])
def test_not_3d_is_refused(tmp_path, shape, found):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full(shape, -1000, np.int16), np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"bad\.nii\.gz: expected a 3D volume") as e:
        read_volume(path)
    assert found in str(e.value) and str(shape).replace(" ", "") in str(e.value).replace(" ", "")


def test_truncated_gzip_is_refused(tmp_path):
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(ct_like((40, 40, 20), seed=1), np.eye(4)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: expected a readable NIfTI file, found a corrupt or truncated"):
        read_volume(path)


def test_garbage_nifti_is_refused(tmp_path):
    path = tmp_path / "junk.nii"
    path.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(InputError, match=r"junk\.nii: .*corrupt"):
        read_volume(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.nii\.gz: expected .*found no such file"):
        read_volume(tmp_path / "nothere.nii.gz")
    other = tmp_path / "scan.mha"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match=r"scan\.mha: expected a NIfTI .*found suffix '\.mha'"):
        read_volume(other)


def test_nan_and_inf_are_refused(tmp_path):
    a = ct_like()
    a[1, 1, 1] = np.nan
    a[2, 2, 2] = np.inf
    a[3, 3, 3] = -np.inf
    path = write_nifti(Volume(a, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan\.nii\.gz: expected finite voxel values, found 1 NaN and 2 inf"):
        read_volume(path)


@pytest.mark.parametrize("spacing", [0.01, 25.0])
def test_absurd_spacing_is_refused(tmp_path, spacing):
    path = write_nifti(Volume(ct_like(), np.diag([1.0, 1.0, spacing, 1.0])), tmp_path / "sp.nii")
    with pytest.raises(InputError, match=r"sp\.nii: expected voxel spacing in \(0\.05, 20\] mm, found spacing \(1, 1, " + f"{spacing:g}\\)"):
        read_volume(path)


def test_zero_spacing_is_refused(tmp_path):
    path = tmp_path / "zero.nrrd"  # NIfTI writers refuse a singular affine; NRRD stores it
    nrrd.write(str(path), ct_like().astype(np.int16), {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 0.0])})
    with pytest.raises(InputError, match=r"zero\.nrrd: expected voxel spacing in \(0\.05, 20\] mm, found spacing \(1, 1, 0\)"):
        read_volume(path)


def test_mri_like_intensities_are_refused_with_a_hint(tmp_path):
    rng = np.random.default_rng(0)
    mri = rng.uniform(0, 4000, (12, 10, 8)).astype(np.float32)
    mri[:2] = 0.0  # background of an MRI is 0, not air in HU
    path = write_nifti(Volume(mri, np.eye(4)), tmp_path / "t1.nii.gz")
    with pytest.raises(InputError, match=r"t1\.nii\.gz: expected CT intensities in HU.*found range \[0, 39\d\d.*MRI") as e:
        read_volume(path)
    assert "0.000% below -500" in str(e.value)
    assert read_volume(path, check_ct=False).shape == (12, 10, 8)
    with pytest.raises(InputError, match="normalised"):
        check_ct_intensities(Volume(rng.uniform(0, 1, (5, 5, 5)), np.eye(4), "unit"))
    check_ct_intensities(Volume(ct_like(), np.eye(4)))  # passes


# --------------------------------------------------------------------------- NRRD
def test_nrrd_lps_geometry_against_hand_computed_world_points(tmp_path):
    a = ct_like().astype(np.int16)
    dirs = np.array([[0.0, 0.9, 0.0], [-0.6, 0.0, 0.0], [0.0, 0.0, 3.0]])  # rows: world step of voxel axes i, j, k (LPS)
    origin = np.array([12.0, -30.0, 50.0])
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), a, {"space": "left-posterior-superior", "space directions": dirs, "space origin": origin})
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, a.astype(np.float32))
    # voxel (2, 3, 4) in LPS = origin + 2*d_i + 3*d_j + 4*d_k = (12-1.8, -30+1.8, 50+12) = (10.2, -28.2, 62)
    # in RAS: negate x and y -> (-10.2, 28.2, 62)
    np.testing.assert_allclose(vol.affine @ [2, 3, 4, 1], [-10.2, 28.2, 62.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(vol.spacing, (0.9, 0.6, 3.0))  # |row i| of space directions


def test_nrrd_ras_space_and_list_axis_and_detached_header(tmp_path):
    a = ct_like().astype(np.int16)[None]  # a 'list' axis of size 1 first
    dirs = np.vstack([[np.nan] * 3, np.diag([1.0, 2.0, 3.0])])
    path = tmp_path / "ct.nhdr"
    nrrd.write(str(path), a, {"space": "right-anterior-superior", "space directions": dirs,
                              "space origin": np.array([1.0, 2.0, 3.0]), "kinds": ["list", "domain", "domain", "domain"]},
               detached_header=True)
    vol = read_volume(path)
    assert vol.shape == (12, 10, 8)
    np.testing.assert_allclose(vol.affine @ [1, 1, 1, 1], [2.0, 4.0, 6.0, 1.0])


def test_truncated_nrrd_is_refused(tmp_path):
    path = tmp_path / "cut.nrrd"
    nrrd.write(str(path), ct_like((30, 30, 20)).astype(np.int16),
               {"space": "left-posterior-superior", "space directions": np.eye(3)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.nrrd: expected a readable NRRD file, found a corrupt or truncated"):
        read_volume(path)


def test_gzip_stream_cut_is_detected_independently_of_nibabel(tmp_path):
    # sanity check of the fixture: the half file really is a broken gzip stream
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(ct_like((40, 40, 20)), np.eye(4)), str(path))
    data = path.read_bytes()
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(data[: len(data) // 2])


# --------------------------------------------------------------------------- DICOM
def _write_dicom_series(folder, hu, *, iop, ipp0, step, pixel_spacing, slope=2.0, intercept=-1024.0,
                        series_uid=None, order=None, modality="CT"):
    """Write hu[:, :, k] (X=column, Y=row) as slices; file names in a shuffled order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    nz = hu.shape[2]
    order = order if order is not None else np.random.default_rng(0).permutation(nz)
    for n, k in enumerate(order):
        stored = np.round((hu[:, :, k].T - intercept) / slope).astype(np.int16)  # (rows, cols)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3"
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ipp0) + k * np.asarray(step)]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.save_as(folder / f"IMG{n:04d}.dcm", enforce_file_format=True)
    return series_uid


def _oblique_geometry():
    t = np.deg2rad(20)
    row = np.array([np.cos(t), np.sin(t), 0.0])  # LPS direction along a row (increasing column)
    col = np.array([0.0, 0.0, -1.0])  # coronal-like: rows go down (inferior)
    normal = np.cross(row, col)
    return row, col, normal


def test_dicom_series_geometry_and_hu(tmp_path):
    hu = ct_like((12, 10, 7), seed=3)
    hu = np.round(hu / 2) * 2  # representable with slope 2
    row, col, normal = _oblique_geometry()
    ps = (0.8, 0.6)  # (between rows, between columns)
    ipp0 = np.array([-40.0, 25.0, 110.0])
    step = 2.5 * normal
    folder = tmp_path / "series"
    _write_dicom_series(folder, hu, iop=[*row, *col], ipp0=ipp0, step=step, pixel_spacing=ps)
    (folder / "notes.xml").write_text("<xml>annotations</xml>")  # non-DICOM files are skipped

    vol = read_volume(folder)
    assert vol.shape == hu.shape
    np.testing.assert_array_equal(vol.array, hu.astype(np.float32))  # sorted back to k order, in HU
    # DICOM PS3.3 C.7.6.2.1.1: P = IPP + col_index * PS[1] * row_cos + row_index * PS[0] * col_cos (LPS)
    for i, j, k in [(0, 0, 0), (11, 0, 0), (3, 7, 5), (11, 9, 6)]:
        lps = ipp0 + k * step + i * ps[1] * row + j * ps[0] * col
        ras = lps * [-1, -1, 1]
        np.testing.assert_allclose((vol.affine @ [i, j, k, 1])[:3], ras, atol=1e-4)
    assert vol.meta["n_slices"] == 7 and vol.meta["modality"] == "CT"

    # independent reference for the in-plane geometry: nibabel's DICOM wrapper of the first slice
    # (its array is (row, column), ours (column, row): swap its first two columns; it is in LPS)
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers
    first = vol.meta["files"][0]
    assert np.allclose(pydicom.dcmread(first).ImagePositionPatient, ipp0)
    ref = dicomwrappers.wrapper_from_data(pydicom.dcmread(first)).affine
    ours_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    np.testing.assert_allclose(ours_lps[:3, [1, 0, 3]], ref[:3, [0, 1, 3]], atol=1e-5)

    # one file of the series reads the whole series
    one = read_volume(next(folder.glob("*.dcm")))
    np.testing.assert_array_equal(one.array, vol.array)

    # and it survives a NIfTI round trip
    back = read_volume(write_nifti(vol, tmp_path / "series.nii.gz"))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


def test_dicom_reversed_slice_order_gives_the_same_world_geometry(tmp_path):
    hu = np.round(ct_like((8, 8, 5), seed=4) / 2) * 2
    row, col, normal = _oblique_geometry()
    # same slices, but stored with positions decreasing along the normal
    a = tmp_path / "a"
    _write_dicom_series(a, hu, iop=[*row, *col], ipp0=[0, 0, 0], step=2.0 * normal, pixel_spacing=(1, 1))
    b = tmp_path / "b"
    _write_dicom_series(b, hu[:, :, ::-1], iop=[*row, *col], ipp0=8.0 * normal, step=-2.0 * normal, pixel_spacing=(1, 1))
    va, vb = read_volume(a), read_volume(b)
    np.testing.assert_array_equal(va.array, vb.array)
    np.testing.assert_allclose(va.affine, vb.affine, atol=1e-6)


def test_dicom_errors(tmp_path):
    hu = np.round(ct_like((8, 8, 4)) / 2) * 2
    row, col, normal = _oblique_geometry()
    two = tmp_path / "two"
    _write_dicom_series(two, hu, iop=[*row, *col], ipp0=[0, 0, 0], step=normal, pixel_spacing=(1, 1), series_uid="1.1")
    _write_dicom_series(two / "sub", hu, iop=[*row, *col], ipp0=[0, 0, 0], step=normal, pixel_spacing=(1, 1), series_uid="1.2")
    with pytest.raises(InputError, match=r"two: expected a single DICOM series.*found 2 series: .*1\.1 \(4 slices\)"):
        read_volume(two)
    assert read_volume(two, series_uid="1.2").shape == (8, 8, 4)

    dup = tmp_path / "dup"
    _write_dicom_series(dup, hu, iop=[*row, *col], ipp0=[0, 0, 0], step=0 * normal, pixel_spacing=(1, 1))
    with pytest.raises(InputError, match=r"dup: expected distinct slice positions, found 4 slices sharing"):
        read_volume(dup)

    gap = tmp_path / "gap"
    _write_dicom_series(gap, hu, iop=[*row, *col], ipp0=[0, 0, 0], step=normal, pixel_spacing=(1, 1), order=[0, 1, 3])
    with pytest.raises(InputError, match=r"gap: expected evenly spaced slices.*missing slice"):
        read_volume(gap)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match=r"empty: expected a folder holding a DICOM image series, found no DICOM image slices among 1"):
        read_volume(empty)

    mr = tmp_path / "mr"
    _write_dicom_series(mr, hu, iop=[*row, *col], ipp0=[0, 0, 0], step=normal, pixel_spacing=(1, 1), modality="MR")
    with pytest.raises(InputError, match=r"mr: expected a CT series .*found Modality 'MR'"):
        read_volume(mr)


# --------------------------------------------------------------------------- labels
def test_read_label_checks_grid_and_values(tmp_path):
    aff = np.diag([0.7, 0.7, 2.0, 1.0])
    img = read_volume(write_nifti(Volume(ct_like(), aff), tmp_path / "img.nii.gz"))
    lab = np.zeros((12, 10, 8), np.float32)
    lab[3:5, 3:5, 2:4] = 2
    ok = read_label(write_nifti(Volume(lab, aff), tmp_path / "lab.nii.gz"), like=img)
    assert ok.array.dtype == np.uint8 and int(ok.array.sum()) == 16

    shifted = aff.copy()
    shifted[0, 3] = 1.0  # 1 mm off
    with pytest.raises(InputError) as e:
        read_label(write_nifti(Volume(lab, shifted), tmp_path / "off.nii.gz"), like=img)
    assert "off.nii.gz" in str(e.value) and "img.nii.gz" in str(e.value) and "1 mm away" in str(e.value)

    with pytest.raises(InputError, match=r"small\.nii\.gz: expected a label with the shape of its image .*img\.nii\.gz.*found shape \(12, 10, 7\)"):
        read_label(write_nifti(Volume(lab[..., :7], aff), tmp_path / "small.nii.gz"), like=img)

    frac = lab.copy()
    frac[0, 0, 0] = 0.5
    with pytest.raises(InputError, match=r"frac\.nii\.gz: expected integer label values, found .*0\.5"):
        read_label(write_nifti(Volume(frac, aff), tmp_path / "frac.nii.gz"), like=img)

    # within tolerance: float32 round-off in a header is fine
    tiny = aff.copy()
    tiny[0, 3] = 5e-4
    read_label(write_nifti(Volume(lab, tiny), tmp_path / "tiny.nii.gz"), like=img)


def test_require_min_shape():
    vol = Volume(ct_like((100, 90, 40)), np.diag([1.5, 1.5, 2.25, 1.0]), "small.nii.gz")
    require_min_shape(vol, (96, 90, 40))
    with pytest.raises(InputError, match=r"small\.nii\.gz: expected a volume of at least \(96, 96, 64\) vox .*found \(100, 90, 40\) vox"):
        require_min_shape(vol, (96, 96, 64))
    # 100 x 90 x 40 voxels = 150 x 135 x 90 mm < a 144 mm cube
    with pytest.raises(InputError, match=r"found \(150, 135, 90\) mm"):
        require_min_shape(vol, (144, 144, 144), unit="mm")
    require_min_shape(vol, (150, 135, 90), unit="mm")
