"""Reading and writing scans with their geometry, and the checks that refuse bad input.

Formats: NIfTI (``.nii``, ``.nii.gz``, via nibabel), NRRD (``.nrrd``, ``.nhdr``,
via pynrrd) and DICOM series (a folder, or one file of the series, via pydicom).
Every reader returns a :class:`~screener_nb.data.volume.Volume`: an ``(X, Y, Z)``
array and a 4x4 affine from voxel index to RAS+ world mm (nibabel's convention).

Why the NRRD and DICOM geometry is written here by hand: both formats store
geometry in LPS (DICOM patient coordinates, NRRD ``space``), and the exact
rules are short (a sign flip of x and y, plus DICOM's slice sorting), while
MONAI's ``PydicomReader`` / ``NrrdReader`` add a dependency layer whose axis and
affine conventions changed between releases. The few lines below follow the
DICOM standard (PS3.3 C.7.6.2.1.1) and the NRRD spec directly, and the tests
check them against hand-computed world positions.

Checks (each raises :class:`~screener_nb.errors.InputError` naming the file,
what was expected and what was found): missing file, unknown format, corrupt or
truncated file, 2D or 4D data (a trailing singleton 4th axis is squeezed),
NaN/inf voxels, absurd voxel spacing, non-CT intensities
(:func:`check_ct_intensities`), a label whose grid differs from its image
(:func:`read_label`) and a volume smaller than a patch (:func:`require_min_shape`).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..files import atomic_path
from .volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
SUPPORTED = "a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) file or a DICOM series folder"

#: LPS (DICOM, NRRD "left-posterior-superior") -> RAS+ (nibabel): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0


# --------------------------------------------------------------------------- public API
def read_volume(path: str | Path, *, check_ct: bool = True, series_uid: str | None = None) -> Volume:
    """Read a CT scan as a float32 ``Volume`` in HU with a voxel -> RAS+ mm affine.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr`` file, a DICOM series
            folder, or one ``.dcm`` file (its whole series is read from its folder).
        check_ct: run :func:`check_ct_intensities` (turn off for non-CT maps,
            e.g. anomaly maps written by the evaluation stage).
        series_uid: which DICOM series to read when a folder holds several.

    Returns:
        ``Volume`` with ``array`` float32 (X, Y, Z) and ``affine`` (4, 4).

    Raises:
        InputError: missing/corrupt file, unsupported format, not 3D, NaN/inf
            voxels, spacing outside (0.05, 20] mm, or (``check_ct``) not CT in HU.
    """
    path = Path(path)
    array, affine, meta = _read_any(path, series_uid=series_uid)
    try:
        array = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(path, "a scalar numeric volume", f"dtype {array.dtype} ({e})") from e
    volume = Volume(array, affine, str(path), meta)
    validate_volume(volume)
    if check_ct:
        if meta.get("modality") not in (None, "CT"):
            raise InputError(path, "a CT series (DICOM Modality CT)", f"Modality {meta['modality']!r}")
        check_ct_intensities(volume)
    return volume


def read_label(path: str | Path, like: Volume, *, atol_mm: float = 1e-3) -> Volume:
    """Read a label map that must lie on the voxel grid of the image ``like``.

    Returns:
        ``Volume`` with an unsigned integer array (uint8, or uint16 above 255),
        0 = background, and ``like``'s affine.

    Raises:
        InputError: as :func:`read_volume`; a shape differing from the image's;
            an affine whose voxel corners are more than ``atol_mm`` mm away from
            the image's; negative or non-integer label values. The message
            names both files.
    """
    path = Path(path)
    array, affine, meta = _read_any(path)
    array = _squeeze_to_3d(np.asanyarray(array), path)
    image_name = like.source or "the image"
    if array.shape != like.shape:
        raise InputError(path, f"a label with the shape of its image {image_name} {like.shape}",
                         f"shape {array.shape}")
    dist = _affine_distance_mm(affine, like.affine, array.shape)
    if not dist <= atol_mm:
        raise InputError(
            path,
            f"a label on the grid of its image {image_name} (affines equal within {atol_mm} mm;"
            f" image affine {_fmt_affine(like.affine)})",
            f"affine {_fmt_affine(affine)}, {dist:.4g} mm away",
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(path, "finite label values", "NaN or inf voxels")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        bad = array[array != np.round(array)].ravel()[:3]
        raise InputError(path, "integer label values", f"non-integer values, e.g. {bad.tolist()}")
    if array.size and array.min() < 0:
        raise InputError(path, "non-negative label values (0 = background)", f"minimum {array.min()}")
    top = int(array.max()) if array.size else 0
    array = array.astype(np.uint8 if top <= 255 else np.uint16)
    return Volume(array, like.affine.copy(), str(path), meta)


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` to ``.nii``/``.nii.gz`` atomically, with qform and sform both set.

    Both codes are 1 (scanner anatomical) and hold the same affine, so 3D
    Slicer, ITK-SNAP (ITK reads the qform) and nibabel (reads the sform) place
    it identically. bool is stored as uint8, float64 as float32, int64 as int32.
    A sheared affine (gantry tilt) cannot be stored in a qform; nibabel then
    keeps the nearest rigid one there and the exact one in the sform.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(path, "a file name ending in .nii or .nii.gz", f"suffix {''.join(path.suffixes) or 'none'!r}")
    array = np.asarray(volume.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == np.int64:
        array = array.astype(np.int32)
    elif array.dtype == np.uint64:
        array = array.astype(np.uint32)
    img = nib.Nifti1Image(array, volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def validate_volume(volume: Volume) -> Volume:
    """Check a volume is 3D, finite, and has a sane voxel spacing; return it (squeezed).

    A trailing singleton 4th axis (``(X, Y, Z, 1)``) is squeezed in place.
    """
    where = volume.source
    volume.array = _squeeze_to_3d(volume.array, where)
    if volume.affine.shape != (4, 4) or not np.isfinite(volume.affine).all():
        raise InputError(where, "a finite 4x4 voxel-to-world affine", f"{volume.affine!r}")
    if volume.array.dtype.kind in "fc":
        finite = np.isfinite(volume.array)
        if not finite.all():
            n_nan = int(np.isnan(volume.array).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise InputError(where, "finite voxel values", f"{n_nan} NaN and {n_inf} inf voxels")
    spacing = np.asarray(volume.spacing)
    if np.any(spacing <= MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise InputError(where, f"voxel spacing in ({MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm",
                         f"spacing {_fmt_tuple(spacing)} mm")
    if abs(np.linalg.det(volume.affine[:3, :3])) < 1e-12:
        raise InputError(where, "an invertible affine", f"a singular one {_fmt_affine(volume.affine)}")
    return volume


def check_ct_intensities(volume: Volume, *, air_hu: float = -500.0, min_air_fraction: float = 1e-3) -> Volume:
    """Refuse a volume whose intensities do not look like CT in Hounsfield units.

    Heuristic: a body CT in HU always contains air, around -1000 HU (around
    the patient, in the lungs, bowel gas, the field-of-view padding at -1024
    or -3024), so at least ``min_air_fraction`` of the voxels must lie below
    ``air_hu`` (-500 HU, the body threshold of the method). MRI (non-negative,
    e.g. 0..4000), CT stored without its rescale intercept (raw 0..4095 with
    air at 0) and already-normalised images ([0, 1]) have no such voxels and
    are rejected with a hint. A CT cropped so tightly that it holds no air
    would be rejected too: pass ``check_ct=False`` to the reader then.

    Returns the volume unchanged when it passes.
    """
    a = np.asarray(volume.array)
    air = float(np.count_nonzero(a < air_hu)) / max(a.size, 1)
    if air >= min_air_fraction:
        return volume
    lo, hi = float(a.min()), float(a.max())
    med = float(np.median(a.ravel()[:: max(1, a.size // 1_000_000)]))  # subsampled: cheap on big scans
    if lo >= 0.0 and hi <= 1.0:
        hint = "it looks already normalised to [0, 1]"
    elif lo >= 0.0:
        hint = "it looks like MRI, or CT stored without its rescale intercept (air at 0 instead of -1000 HU)"
    else:
        hint = "it does not look like CT"
    raise InputError(
        volume.source,
        f"CT intensities in HU (at least {min_air_fraction:.1%} of voxels below {air_hu:g} HU, i.e. air)",
        f"range [{lo:g}, {hi:g}], median {med:g}, {air:.3%} below {air_hu:g}: {hint}"
        " (pass check_ct=False to read it anyway)",
    )


def require_min_shape(volume: Volume | np.ndarray, min_shape: Sequence[float], *, unit: str = "vox") -> None:
    """Raise InputError if ``volume`` is smaller than ``min_shape`` along some axis.

    Args:
        volume: a ``Volume`` (or an array when ``unit="vox"``).
        min_shape: (X, Y, Z) minimum size, e.g. a patch (96, 96, 64) voxels.
        unit: ``"vox"`` compares the array shape; ``"mm"`` compares the
            physical extent ``shape * spacing`` (e.g. a patch of 96 x 96 x 64
            voxels at 1.5 x 1.5 x 2.25 mm is 144 x 144 x 144 mm).
    """
    if unit not in ("vox", "mm"):
        raise ValueError(f"unit must be 'vox' or 'mm', not {unit!r}")
    shape = np.asarray(volume.shape if isinstance(volume, Volume) else np.shape(volume), dtype=float)
    where = volume.source if isinstance(volume, Volume) else None
    need = np.asarray(min_shape, dtype=float)
    if unit == "mm":
        if not isinstance(volume, Volume):
            raise TypeError("unit='mm' needs a Volume (its spacing)")
        have = shape * np.asarray(volume.spacing)
    else:
        have = shape
    if have.shape != need.shape or np.any(have < need):
        raise InputError(where, f"a volume of at least {_fmt_tuple(need)} {unit} (one patch)",
                         f"{_fmt_tuple(have)} {unit}")


# --------------------------------------------------------------------------- dispatch
def _read_any(path: Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    if not path.exists():
        raise InputError(path, SUPPORTED, "no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        return _read_dicom_series(path, series_uid=series_uid)
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    if name.endswith(NRRD_SUFFIXES):
        return _read_nrrd(path)
    if name.endswith(".dcm") or _looks_like_dicom(path):
        import pydicom

        try:
            uid = series_uid or str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        except Exception as e:
            raise InputError(path, "a readable DICOM file", f"a corrupt file ({type(e).__name__}: {e})") from e
        return _read_dicom_series(path.parent, series_uid=uid)
    raise InputError(path, SUPPORTED, f"suffix {''.join(path.suffixes) or 'none'!r}")


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _squeeze_to_3d(array: np.ndarray, where) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:  # (X, Y, Z, 1): a 3D volume stored as 4D
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        what = "a 2D image" if array.ndim < 3 or min(array.shape) < 2 else f"{array.ndim}D data"
        raise InputError(where, "a 3D volume with at least 2 voxels along each axis",
                         f"{what} of shape {tuple(array.shape)}")
    return array


# --------------------------------------------------------------------------- NIfTI
def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        # dataobj applies scl_slope/scl_inter; reading it is where a truncated gzip fails
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # ImageFileError, EOFError, zlib.error, OSError, ValueError
        raise InputError(path, "a readable NIfTI file", f"a corrupt or truncated file ({type(e).__name__}: {e})") from e
    hdr = img.header
    meta = {"format": "nifti", "qform_code": int(hdr["qform_code"]), "sform_code": int(hdr["sform_code"])}
    return array, np.asarray(img.affine, dtype=np.float64), meta


# --------------------------------------------------------------------------- NRRD
_NRRD_SPACE_TO_RAS = {
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "right-anterior-superior": np.eye(3),
    "ras": np.eye(3),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0]),
}


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """NRRD -> (array, RAS affine). Voxel axes in file order (fastest first), as NIfTI.

    ``space directions`` row i is the world step of voxel axis i in ``space``
    coordinates; it becomes column i of the affine, then LPS/LAS are mapped to
    RAS. Without ``space`` (only ``spacings``), the volume is taken as LPS
    with identity directions, as ITK (hence 3D Slicer) does.
    """
    import nrrd

    try:
        array, header = nrrd.read(str(path))
    except Exception as e:
        raise InputError(path, "a readable NRRD file", f"a corrupt or truncated file ({type(e).__name__}: {e})") from e
    space = str(header.get("space", "")).lower()
    if "space directions" in header:
        dirs = np.asarray(header["space directions"], dtype=np.float64)
        spatial = np.all(np.isfinite(dirs), axis=1)
        if space not in _NRRD_SPACE_TO_RAS:
            raise InputError(path, f"an NRRD space among {sorted(_NRRD_SPACE_TO_RAS)}", f"space {space or 'none'!r}")
        to_ras = _NRRD_SPACE_TO_RAS[space]
    elif "spacings" in header:
        sp = np.asarray(header["spacings"], dtype=np.float64)
        spatial = np.isfinite(sp)
        dirs = np.zeros((len(sp), 3))
        dirs[np.flatnonzero(spatial), np.arange(int(spatial.sum())) % 3] = sp[spatial]
        to_ras = _NRRD_SPACE_TO_RAS["lps"]
    else:
        raise InputError(path, "an NRRD header with 'space directions' or 'spacings'", "neither (no geometry)")
    # drop non-spatial axes of size 1 (e.g. a 'list' axis of a scalar volume)
    keep = [i for i in range(array.ndim) if spatial[i] or array.shape[i] != 1]
    if any(not spatial[i] for i in keep):
        raise InputError(path, "a scalar 3D NRRD volume", f"shape {array.shape} with non-spatial axes of size > 1")
    array = array.reshape([array.shape[i] for i in keep])
    dirs = dirs[keep]
    if array.ndim != 3:
        _squeeze_to_3d(array, path)  # raises with the shape
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ dirs.T
    affine[:3, 3] = to_ras @ origin
    return array, affine, {"format": "nrrd", "space": space or "lps (assumed)"}


# --------------------------------------------------------------------------- DICOM
def _read_dicom_series(folder: Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A DICOM series folder -> (array in HU, RAS affine, meta).

    Slices are sorted by their ImagePositionPatient projected on the slice
    normal (row cosine x column cosine), pixel values become HU with each
    slice's RescaleSlope/Intercept, and the affine follows PS3.3 C.7.6.2.1.1:
    voxel (i, j, k) = (column, row, slice) lies at IPP_0 + i * PixelSpacing[1]
    * row_cosine + j * PixelSpacing[0] * column_cosine + k * slice_step (LPS),
    then x and y are negated for RAS.
    """
    import pydicom

    series: dict[str, list] = defaultdict(list)
    n_files = 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        n_files += 1
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM (an XML annotation, a README, ...)
            continue
        if not all(hasattr(ds, k) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
            continue  # DICOMDIR, structured reports, ... : not image slices
        series[str(getattr(ds, "SeriesInstanceUID", ""))].append((f, ds))
    if not series:
        raise InputError(folder, "a folder holding a DICOM image series", f"no DICOM image slices among {n_files} files")
    if series_uid is None:
        if len(series) > 1:
            listing = ", ".join(f"{uid} ({len(v)} slices)" for uid, v in series.items())
            raise InputError(folder, "a single DICOM series (or pass series_uid=...)", f"{len(series)} series: {listing}")
        series_uid = next(iter(series))
    if series_uid not in series:
        raise InputError(folder, f"DICOM series {series_uid}", f"series {sorted(series)}")
    slices = series[series_uid]
    if len(slices) < 2:
        raise InputError(folder, "a 3D volume with at least 2 voxels along each axis", "a 2D image (a single DICOM slice)")

    iop = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    for f, ds in slices:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise InputError(f, f"the ImageOrientationPatient of the series {iop.tolist()}",
                             f"{list(map(float, ds.ImageOrientationPatient))}")
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    dist = positions @ normal
    gaps = np.diff(dist)
    if np.any(gaps < 1e-3):
        raise InputError(folder, "distinct slice positions", f"{int(np.sum(gaps < 1e-3)) + 1} slices sharing a position")
    med = float(np.median(gaps))
    if np.max(np.abs(gaps - med)) > 0.1 * med:
        raise InputError(folder, f"evenly spaced slices (median gap {med:.3g} mm)",
                         f"gaps from {gaps.min():.3g} to {gaps.max():.3g} mm (a missing slice?)")

    arrays = []
    for f, _ in slices:
        try:
            ds = pydicom.dcmread(f)
            px = ds.pixel_array
        except Exception as e:
            raise InputError(f, "a DICOM slice with decodable pixel data (compressed ones need pylibjpeg or gdcm)",
                             f"{type(e).__name__}: {e}") from e
        if px.ndim != 2:
            raise InputError(f, "a single-frame 2D slice", f"pixel data of shape {px.shape}")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        arrays.append((px.astype(np.float32) * np.float32(slope) + np.float32(intercept)).T)  # (cols, rows) = (X, Y)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(folder, "slices of one size", f"sizes {sorted(shapes)}")
    array = np.stack(arrays, axis=-1)

    ps = np.asarray(slices[0][1].PixelSpacing, dtype=np.float64)  # [between rows, between columns]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * ps[1]
    affine_lps[:3, 1] = col_cos * ps[0]
    affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine_lps[:3, 3] = positions[0]
    first = slices[0][1]
    meta = {
        "format": "dicom",
        "series_uid": series_uid,
        "n_slices": len(slices),
        "modality": str(getattr(first, "Modality", "")) or None,
        "files": [str(f) for f, _ in slices],
    }
    return array, LPS_TO_RAS @ affine_lps, meta


# --------------------------------------------------------------------------- helpers
def _affine_distance_mm(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance (mm) between where ``a`` and ``b`` put the 8 corner voxels of ``shape``."""
    corners = np.array(np.meshgrid(*[[0, max(int(s) - 1, 0)] for s in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.max(np.linalg.norm((np.asarray(a) @ corners - np.asarray(b) @ corners)[:3], axis=0)))


def _fmt_tuple(x) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in np.ravel(x)) + ")"


def _fmt_affine(a: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(a)[:3]) + "]"
