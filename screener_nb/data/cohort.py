"""The preprocessed-case format: the contract between the data stage and every later stage.

::

    runs/<run>/data/index.json          {"cases": [{"id", "dataset", "role", "lesion_kinds",
                                                    "has_label", "dir": "cases/<id>"}],
                                         "preprocess": {params}}
    runs/<run>/data/cases/<id>/image.npy   float32 (X, Y, Z) in [0, 1]
                               body.npy    bool (X, Y, Z)
                               label.npy   uint8 (X, Y, Z), 0 = normal (only if has_label)
                               meta.json   {"spacing", "affine", "record", "source", "sha256", "params", ...}

Every file is written atomically and ``meta.json`` last, so a case folder
without ``meta.json`` is incomplete (a crash mid-write) and is refused.
Arrays are read memory-mapped (``np.load(mmap_mode="r")``): a cohort of
hundreds of CTs costs no RAM until a crop is taken.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..files import read_json, save_npy, write_json
from .preprocess import Preprocessed, PreprocessParams, bbox_of, to_original_grid
from .volume import Volume

#: train: healthy scans the models learn from; val: labelled cases for choices (thresholds);
#: test: the evaluated cases; calib: held-out healthy scans for label-free thresholds
ROLES = ("train", "val", "test", "calib")
INDEX_FILE = "index.json"
META_FILE = "meta.json"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class PreprocessedCase:
    """One preprocessed scan of a cohort.

    Attributes:
        id, dataset, role ("train" | "val" | "test"), lesion_kinds: from the index.
        image: float32 (X, Y, Z) in [0, 1] (memory-mapped).
        body: bool (X, Y, Z).
        label: uint8 (X, Y, Z) or None.
        spacing: (X, Y, Z) mm. affine: (4, 4) voxel -> RAS+ mm of this grid.
        record: inversion record for :func:`~screener_nb.data.preprocess.to_original_grid`.
        source, sha256, params: provenance. path: the case folder.
    """

    id: str
    dataset: str
    role: str
    image: np.ndarray
    body: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    record: dict
    lesion_kinds: list[str] = field(default_factory=list)
    source: str | None = None
    sha256: str | None = None
    params: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def to_volume(self) -> Volume:
        """The preprocessed image as a ``Volume`` on its own grid."""
        return Volume(self.image, np.asarray(self.affine, dtype=np.float64), f"case:{self.id}", {"source": self.source})

    def to_original_grid(self, map_: np.ndarray, fill: float | None = None, mode: str = "auto") -> np.ndarray:
        """A map on this case's grid, brought back onto the original scan's voxel grid."""
        return to_original_grid(map_, self.record, fill=fill, mode=mode)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.2f}" for s in self.spacing)
        return (f"PreprocessedCase(id={self.id!r}, dataset={self.dataset!r}, role={self.role!r}, shape={self.shape},"
                f" spacing=({sp}) mm, label={'yes' if self.label is not None else 'no'})")


# --------------------------------------------------------------------------- writing
def write_case(data_dir: str | Path, case_id: str, preprocessed: Preprocessed, label: np.ndarray | None = None, *,
               dataset: str, role: str, lesion_kinds: Sequence[str] = (), source: str | None = None,
               sha256: str | None = None, params: PreprocessParams | dict | None = None) -> dict:
    """Write one case to ``<data_dir>/cases/<case_id>/``; return its index entry.

    Args:
        label: uint8-compatible (X, Y, Z) on the preprocessed grid; default ``preprocessed.label``.
        params: recorded in meta.json; default the record's params.

    Files are written atomically, ``meta.json`` last (removed first when a
    case is rewritten, so a crash in between leaves a visibly incomplete case).
    """
    _check_id(case_id, data_dir)
    if role not in ROLES:
        raise InputError(f"case {case_id}", f"a role among {ROLES}", repr(role))
    if label is None:
        label = preprocessed.label
    image = np.asarray(preprocessed.image, dtype=np.float32)
    body = np.asarray(preprocessed.body, dtype=bool)
    if body.shape != image.shape:
        raise InputError(f"case {case_id}", f"a body mask of the image's shape {image.shape}", f"shape {body.shape}")
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape:
            raise InputError(f"case {case_id}", f"a label of the image's shape {image.shape}", f"shape {label.shape}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise InputError(f"case {case_id}", "label values in [0, 255]", f"range [{label.min()}, {label.max()}]")
        label = label.astype(np.uint8)
    if isinstance(params, PreprocessParams):
        params = params.to_dict()
    if params is None:
        params = dict(preprocessed.record.get("params", {}))

    case_dir = Path(data_dir) / "cases" / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / META_FILE).unlink(missing_ok=True)
    save_npy(case_dir / "image.npy", image)
    save_npy(case_dir / "body.npy", body)
    if label is not None:
        save_npy(case_dir / "label.npy", label)
    else:
        (case_dir / "label.npy").unlink(missing_ok=True)  # a stale label of an earlier write
    meta = {
        "id": case_id,
        "dataset": dataset,
        "role": role,
        "lesion_kinds": list(lesion_kinds),
        "has_label": label is not None,
        "spacing": [float(s) for s in preprocessed.spacing],
        "affine": np.asarray(preprocessed.affine, dtype=np.float64).tolist(),
        "record": preprocessed.record,
        "source": source if source is not None else preprocessed.record.get("source"),
        "sha256": sha256,
        "params": params,
        "shape": [int(s) for s in image.shape],
    }
    write_json(case_dir / META_FILE, meta)
    return {"id": case_id, "dataset": dataset, "role": role, "lesion_kinds": list(lesion_kinds),
            "has_label": label is not None, "dir": f"cases/{case_id}"}


def write_index(data_dir: str | Path, entries: Iterable[dict], params: PreprocessParams | dict | None) -> Path:
    """Write ``<data_dir>/index.json`` from the entries returned by :func:`write_case`."""
    entries = [dict(e) for e in entries]
    need = ("id", "dataset", "role", "lesion_kinds", "has_label", "dir")
    seen: set[str] = set()
    for e in entries:
        missing = [k for k in need if k not in e]
        if missing:
            raise InputError(Path(data_dir) / INDEX_FILE, f"index entries with keys {list(need)}", f"{e} missing {missing}")
        if e["role"] not in ROLES:
            raise InputError(Path(data_dir) / INDEX_FILE, f"a role among {ROLES}", f"{e['role']!r} for case {e['id']}")
        if e["id"] in seen:
            raise InputError(Path(data_dir) / INDEX_FILE, "unique case ids", f"{e['id']!r} twice")
        seen.add(e["id"])
    if isinstance(params, PreprocessParams):
        params = params.to_dict()
    return write_json(Path(data_dir) / INDEX_FILE, {"cases": entries, "preprocess": params or {}})


# --------------------------------------------------------------------------- reading
def data_dir_of(run_dir: str | Path) -> Path:
    """``<run_dir>/data``, or ``run_dir`` itself when it holds the index."""
    run_dir = Path(run_dir)
    if (run_dir / INDEX_FILE).is_file():
        return run_dir
    return run_dir / "data"


def read_index(run_dir: str | Path) -> dict:
    """The data stage's ``index.json`` (InputError if the data stage has not run)."""
    path = data_dir_of(run_dir) / INDEX_FILE
    if not path.is_file():
        raise InputError(run_dir, f"a preprocessed cohort ({path})",
                         "none: run the data stage first (notebook 01 or `python -m screener_nb run --stages data`)")
    index = read_json(path)
    if not isinstance(index, dict) or not isinstance(index.get("cases"), list):
        raise InputError(path, "an index with a 'cases' list", f"{type(index).__name__} with keys {sorted(index) if isinstance(index, dict) else '-'}")
    return index


def load_cohort(run_dir: str | Path, role: str | None = None) -> list[PreprocessedCase]:
    """Every case of a run's data stage (optionally only one role), arrays memory-mapped."""
    if role is not None and role not in ROLES:
        raise InputError(run_dir, f"a role among {ROLES} or None", repr(role))
    data_dir = data_dir_of(run_dir)
    index = read_index(run_dir)
    return [
        _load_case_dir(data_dir / e["dir"], entry=e)
        for e in index["cases"]
        if role is None or e.get("role") == role
    ]


def load_case(path_or_id: str | Path, run_dir: str | Path | None = None, **read_kwargs) -> Volume | PreprocessedCase:
    """A scan by file path / DICOM folder (-> ``Volume``), case folder or case id (-> ``PreprocessedCase``).

    Args:
        path_or_id: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr`` file or DICOM
            folder (read with :func:`~screener_nb.data.io.read_volume`), a
            preprocessed case folder (holding ``meta.json``), or the id of a
            case of ``run_dir``'s cohort.
        run_dir: the run whose cohort holds the case id.
        read_kwargs: passed to ``read_volume`` (``check_ct``, ``series_uid``).

    Raises:
        InputError: no such file and no run to look the id up in; an unknown
            id (the message lists the known ids).
    """
    p = Path(path_or_id)
    if p.exists():
        if p.is_dir() and (p / META_FILE).is_file():
            return _load_case_dir(p)
        from .io import read_volume

        return read_volume(p, **read_kwargs)
    if run_dir is None:
        raise InputError(p, "an existing scan file, DICOM folder or case folder (or a case id with run_dir=...)",
                         "no such file or directory")
    index = read_index(run_dir)
    for e in index["cases"]:
        if e.get("id") == str(path_or_id):
            return _load_case_dir(data_dir_of(run_dir) / e["dir"], entry=e)
    known = [e.get("id") for e in index["cases"]]
    shown = ", ".join(map(str, known[:50])) + (f", ... ({len(known)} in all)" if len(known) > 50 else "")
    raise InputError(data_dir_of(run_dir) / INDEX_FILE, f"a case id among: {shown or 'none (empty cohort)'}",
                     repr(str(path_or_id)))


def crop_bbox_of(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, slice, slice]:
    """Slices of the bounding box of a non-empty mask, grown by ``margin`` voxels and clipped to the array."""
    start, stop = bbox_of(np.asarray(mask))
    margin = np.broadcast_to(np.asarray(margin, dtype=int), start.shape)
    start = np.maximum(start - margin, 0)
    stop = np.minimum(stop + margin, np.asarray(mask.shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]


# --------------------------------------------------------------------------- internals
def _load_case_dir(case_dir: Path, entry: dict | None = None) -> PreprocessedCase:
    meta_path = case_dir / META_FILE
    if not meta_path.is_file():
        raise InputError(case_dir, f"a complete preprocessed case ({META_FILE} is written last)",
                         "no meta.json (an interrupted write: rerun the data stage)")
    meta = read_json(meta_path)
    entry = entry or {}
    arrays = {}
    for name in ("image", "body", "label"):
        f = case_dir / f"{name}.npy"
        if name == "label" and not meta.get("has_label", f.is_file()):
            arrays[name] = None
            continue
        if not f.is_file():
            raise InputError(f, f"the {name} array of case {meta.get('id', case_dir.name)}", "no such file")
        try:
            arrays[name] = np.load(f, mmap_mode="r")
        except Exception as e:
            raise InputError(f, "a readable .npy array", f"a corrupt file ({type(e).__name__}: {e})") from e
        if "shape" in meta and list(arrays[name].shape) != list(meta["shape"]):
            raise InputError(f, f"shape {tuple(meta['shape'])} (meta.json)", f"shape {arrays[name].shape}")
    return PreprocessedCase(
        id=str(entry.get("id", meta.get("id", case_dir.name))),
        dataset=str(entry.get("dataset", meta.get("dataset", ""))),
        role=str(entry.get("role", meta.get("role", ""))),
        image=arrays["image"], body=arrays["body"], label=arrays["label"],
        spacing=tuple(float(s) for s in meta["spacing"]),  # type: ignore[arg-type]
        affine=np.asarray(meta["affine"], dtype=np.float64),
        record=meta.get("record", {}),
        lesion_kinds=list(entry.get("lesion_kinds", meta.get("lesion_kinds", []))),
        source=meta.get("source"), sha256=meta.get("sha256"), params=meta.get("params", {}),
        path=case_dir,
    )


def _check_id(case_id: str, where) -> None:
    if not isinstance(case_id, str) or not _ID_RE.match(case_id) or case_id in (".", ".."):
        raise InputError(where, "a case id of letters, digits, '.', '_', '-' (no path separators)", repr(case_id))
