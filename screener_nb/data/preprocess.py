"""The method's data preparation, and its exact inverse for maps.

Steps (docs/method.md "Data prep"), every constant a field of :class:`PreprocessParams`:

1. canonical orientation: the voxel axes are permuted/flipped to the closest
   RAS axes (nibabel ``io_orientation``). Exact: no interpolation, Z becomes
   the axial axis. An oblique scan keeps its obliqueness in the affine.
2. body mask = complement of the air (< -500 HU) connected to the border.
   ``body_fill="3d"`` (default, as the authors' code): air components in 3D
   that touch the four lateral faces (X and Y) of the volume are outside;
   the top/bottom (Z) faces are not seeds, so lungs whose trachea leaves the
   field of view at the top stay inside. ``"slice"``: the same per axial
   slice in 2D (fills every air pocket enclosed in its slice: keeps the lungs
   even when the airway is open to the outside through the nose, at the
   price of also filling air enclosed between arm and torso).
3. crop to the bounding box of the body mask (+ ``crop_margin_mm``).
4. resample along the (canonical) voxel axes to ``spacing`` mm: trilinear
   for the image, the body mask resampled linearly and thresholded at 0.5,
   nearest for labels (with small lesions kept, see :func:`preprocess_label`).
   The new grid covers exactly the cropped extent: ``m = round(n * s / t)``
   voxels whose actual spacing ``n * s / m`` is within half a voxel of the
   target over the whole extent, and voxel centres follow the
   ``align_corners=False`` convention (new voxel k is centred at old
   continuous index ``(k + 0.5) * n / m - 0.5``). This makes the new affine
   exact and the inverse a plain resize back, which is why it is written
   with ``torch.nn.functional.interpolate`` rather than MONAI's
   ``Spacing`` (that keeps the exact target spacing and changes the extent,
   and its inverse needs MONAI's metadata tensors carried through the stages).
5. clip HU to ``hu_window`` and scale to [0, 1].
6. 3D CLAHE (``skimage.exposure.equalize_adapthist``).

Everything needed to map a result back to the original scan is kept in a
JSON-serialisable ``record``; :func:`to_original_grid` uses it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..errors import ConfigError, InputError
from .volume import Volume

RECORD_FORMAT = "screener_nb.preprocess/1"


@dataclass(frozen=True)
class PreprocessParams:
    """Every constant of the data preparation (paper values as defaults).

    Attributes:
        spacing: target voxel size (X, Y, Z) in mm.
        body_threshold_hu: voxels below are air (body mask and crop).
        hu_window: HU clipped to (low, high), then scaled to [0, 1].
        clahe: apply 3D CLAHE after scaling (the authors: essential).
        clahe_kernel_size: CLAHE tile size in voxels (X, Y, Z); None = skimage's
            default, 1/8 of each dimension (as the authors' code; not stated in
            the paper). On small volumes (quick-profile phantoms of ~48^3) the
            default tiles hold so few voxels that the clip limit rounds to one
            count per bin and CLAHE stops raising contrast: pass e.g. (16, 16, 8).
        clahe_clip_limit: CLAHE clip limit in [0, 1]; 0.025 as in the authors'
            preprocessing code (vox2vec), not stated in the paper.
        clahe_nbins: histogram bins of CLAHE.
        crop_margin_mm: margin kept around the body bounding box (not stated; 0).
        body_fill: "3d" (air connected in 3D to the X/Y faces is outside, as
            the authors' code) or "slice" (the same per axial slice).
        body_largest_component: keep only the largest 3D connected component
            of the body mask (drops the CT table and other objects not touching
            the patient). Off by default: the method's mask is the plain
            complement of the outside air, table included.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.25)
    body_threshold_hu: float = -500.0
    hu_window: tuple[float, float] = (-1000.0, 300.0)
    clahe: bool = True
    clahe_kernel_size: tuple[int, int, int] | None = None
    clahe_clip_limit: float = 0.025
    clahe_nbins: int = 256
    crop_margin_mm: float = 0.0
    body_fill: str = "3d"
    body_largest_component: bool = False

    def __post_init__(self) -> None:
        def setf(name, value):
            object.__setattr__(self, name, value)

        setf("spacing", tuple(float(s) for s in self.spacing))
        setf("hu_window", tuple(float(h) for h in self.hu_window))
        if self.clahe_kernel_size is not None:
            setf("clahe_kernel_size", tuple(int(k) for k in self.clahe_kernel_size))
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ConfigError(f"spacing must be 3 positive mm values, got {self.spacing}")
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ConfigError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if not 0.0 < self.clahe_clip_limit <= 1.0:
            raise ConfigError(f"clahe_clip_limit must be in (0, 1], got {self.clahe_clip_limit}")
        if self.clahe_kernel_size is not None and (len(self.clahe_kernel_size) != 3 or min(self.clahe_kernel_size) < 2):
            raise ConfigError(f"clahe_kernel_size must be None or 3 ints >= 2, got {self.clahe_kernel_size}")
        if self.clahe_nbins < 2:
            raise ConfigError(f"clahe_nbins must be >= 2, got {self.clahe_nbins}")
        if self.crop_margin_mm < 0:
            raise ConfigError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        if self.body_fill not in ("3d", "slice"):
            raise ConfigError(f"body_fill must be '3d' or 'slice', got {self.body_fill!r}")

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "PreprocessParams":
        """Inverse of :meth:`to_dict`; unknown names are a ConfigError."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class Preprocessed:
    """A scan after :func:`preprocess`.

    Attributes:
        image: float32 (X, Y, Z) in [0, 1], canonical RAS, cropped, resampled.
        body: bool (X, Y, Z) body mask on the same grid.
        spacing: actual voxel size (X, Y, Z) in mm (within half a voxel of the target over the extent).
        affine: (4, 4) voxel -> RAS+ mm of this grid (same world points as the original scan).
        record: JSON-serialisable inversion record (see :func:`to_original_grid`).
        label: uint8 (X, Y, Z) on this grid when a label was given, else None.
    """

    image: np.ndarray
    body: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    record: dict
    label: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def to_volume(self) -> Volume:
        """The preprocessed image as a ``Volume`` (e.g. to write it as NIfTI)."""
        return Volume(self.image, self.affine.copy(), self.record.get("source"), {})


# --------------------------------------------------------------------------- main entry points
def preprocess(volume: Volume | str | Path, params: PreprocessParams | None = None,
               label: Volume | str | Path | None = None) -> Preprocessed:
    """Run the method's data preparation on a CT in HU.

    Args:
        volume: a ``Volume`` (float HU, (X, Y, Z)) or a path for :func:`~screener_nb.data.io.read_volume`.
        params: :class:`PreprocessParams` (defaults: the paper's).
        label: optional label ``Volume`` (or path) on the same grid as ``volume``.

    Returns:
        :class:`Preprocessed`.
    """
    from .io import read_label, read_volume

    params = params or PreprocessParams()
    if not isinstance(volume, Volume):
        volume = read_volume(volume)
    if label is not None and not isinstance(label, Volume):
        label = read_label(label, like=volume)
    array = np.asarray(volume.array, dtype=np.float32)
    if array.ndim != 3:
        raise InputError(volume.source, "a 3D volume", f"shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(volume.source, "finite voxel values", "NaN or inf voxels")

    # 1. canonical orientation (exact permutation/flip)
    ornt = _canonical_ornt(volume.affine)
    canon = _apply_ornt(array, ornt)
    canon_affine = volume.affine @ _inv_ornt_aff(ornt, array.shape)

    # 2. body mask on the original resolution
    body_full = body_mask(canon, params.body_threshold_hu, fill=params.body_fill)
    if params.body_largest_component:
        body_full = largest_component(body_full)
    if not body_full.any():
        raise InputError(volume.source, f"a body (voxels >= {params.body_threshold_hu:g} HU)",
                         f"none: all voxels are below (range [{array.min():g}, {array.max():g}])")

    # 3. crop to the body bounding box (+ margin)
    canon_spacing = np.linalg.norm(canon_affine[:3, :3], axis=0)
    margin = np.ceil(params.crop_margin_mm / canon_spacing).astype(int)
    start, stop = bbox_of(body_full)
    start = np.maximum(start - margin, 0)
    stop = np.minimum(stop + margin, canon.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    crop_affine = canon_affine @ _translation(start)
    n = np.asarray(canon[sl].shape)

    # 4. resample to the target spacing
    m = np.maximum(1, np.round(n * canon_spacing / np.asarray(params.spacing))).astype(int)
    image_hu = resize_linear(canon[sl], m)
    body = resize_linear(body_full[sl].astype(np.float32), m) >= 0.5
    new_affine = crop_affine @ _zoom_affine(n, m)
    actual_spacing = tuple(float(s) for s in np.linalg.norm(new_affine[:3, :3], axis=0))

    # 5. clip and scale; 6. CLAHE
    image = scale_hu(image_hu, params.hu_window)
    if params.clahe:
        image = apply_clahe(image, params)

    record = {
        "format": RECORD_FORMAT,
        "source": volume.source,
        "original_shape": [int(s) for s in array.shape],
        "original_affine": volume.affine.tolist(),
        "ornt": ornt.astype(int).tolist(),
        "canonical_shape": [int(s) for s in canon.shape],
        "crop_start": [int(s) for s in start],
        "crop_stop": [int(s) for s in stop],
        "shape": [int(s) for s in m],
        "spacing": list(actual_spacing),
        "affine": new_affine.tolist(),
        "params": params.to_dict(),
    }
    out = Preprocessed(image, body, actual_spacing, new_affine, record)
    if label is not None:
        out.label = preprocess_label(label, record)
    return out


def preprocess_label(label: Volume | np.ndarray, record: dict) -> np.ndarray:
    """Bring a label map of the original scan onto the preprocessed grid.

    Nearest-neighbour resampling (voxel centres as in :func:`preprocess`),
    then every connected lesion (3D, face connectivity) of the original label
    that left no voxel on the new grid, because it is smaller than a new voxel
    or fell between sampled centres, is restored as the one new voxel that
    contains its voxel closest to its centroid, with its most frequent value.
    So no lesion vanishes; a restored one is one new voxel (at most
    1.5 x 1.5 x 2.25 mm by default).

    Args:
        label: (X, Y, Z) non-negative integers on the original scan's grid
            (a ``Volume`` is checked against the record's shape and affine).
        record: the ``record`` of the scan's :class:`Preprocessed`.

    Returns:
        uint8 (X', Y', Z') on the preprocessed grid.
    """
    _check_record(record)
    where = label.source if isinstance(label, Volume) else None
    arr = np.asarray(label.array if isinstance(label, Volume) else label)
    if tuple(arr.shape) != tuple(record["original_shape"]):
        raise InputError(where, f"a label of the scan's shape {tuple(record['original_shape'])}", f"shape {arr.shape}")
    if isinstance(label, Volume):
        from .io import _affine_distance_mm

        d = _affine_distance_mm(label.affine, np.asarray(record["original_affine"]), arr.shape)
        if d > 1e-3:
            raise InputError(where, f"a label with the scan's affine ({record.get('source')})",
                             f"an affine placing voxels up to {d:.3g} mm away")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InputError(where, "label values in [0, 255]", f"range [{arr.min()}, {arr.max()}]")
    arr = arr.astype(np.uint8)
    canon = _apply_ornt(arr, np.asarray(record["ornt"]))
    sl = tuple(slice(a, b) for a, b in zip(record["crop_start"], record["crop_stop"]))
    cropped = np.ascontiguousarray(canon[sl])
    m = np.asarray(record["shape"])
    out = resize_nearest(cropped, m)
    _restore_vanished(cropped, out)
    return out


def to_original_grid(map_: np.ndarray, record: dict, fill: float | None = None, mode: str = "auto") -> np.ndarray:
    """Map an array on the preprocessed grid back onto the ORIGINAL scan's voxel grid.

    Inverse resampling (trilinear, or nearest for integer/bool maps or
    ``mode="nearest"``), un-cropping (voxels outside the body crop get
    ``fill``, default the map's minimum), then the inverse orientation.

    Args:
        map_: (X', Y', Z') on the preprocessed grid (``record["shape"]``).
        record: the ``record`` of :class:`Preprocessed`.
        fill: value outside the crop (default ``map_.min()``).
        mode: "auto", "linear" or "nearest".

    Returns:
        array of ``record["original_shape"]``: float32 (linear) or ``map_``'s dtype (nearest).
    """
    _check_record(record)
    map_ = np.asarray(map_)
    if tuple(map_.shape) != tuple(record["shape"]):
        raise InputError("map", f"an array on the preprocessed grid, shape {tuple(record['shape'])}", f"shape {map_.shape}")
    if mode == "auto":
        mode = "nearest" if map_.dtype.kind in "biu" else "linear"
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'auto', 'linear' or 'nearest', not {mode!r}")
    start, stop = np.asarray(record["crop_start"]), np.asarray(record["crop_stop"])
    n = stop - start
    if mode == "linear":
        back = resize_linear(map_.astype(np.float32), n)
    else:
        back = resize_nearest(map_, n)
    if fill is None:
        fill = map_.min() if map_.size else 0
    canon = np.full(record["canonical_shape"], fill, dtype=back.dtype)
    canon[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))] = back
    out = _apply_ornt(canon, _inverse_ornt(np.asarray(record["ornt"])))
    assert tuple(out.shape) == tuple(record["original_shape"])
    return np.ascontiguousarray(out)


def to_original_volume(map_: np.ndarray, record: dict, fill: float | None = None, mode: str = "auto") -> Volume:
    """:func:`to_original_grid` wrapped in a ``Volume`` with the original affine (ready for ``write_nifti``)."""
    arr = to_original_grid(map_, record, fill=fill, mode=mode)
    return Volume(arr, np.asarray(record["original_affine"]), record.get("source"), {})


# --------------------------------------------------------------------------- building blocks
def body_mask(hu: np.ndarray, threshold_hu: float = -500.0, fill: str = "3d") -> np.ndarray:
    """Body = complement of the air (< ``threshold_hu``) connected to the lateral border.

    Args:
        hu: (X, Y, Z) HU in canonical orientation (Z axial).
        fill: "3d": air components (6-connected, 3D) touching an X or Y face
            are outside; "slice": per axial slice, 2D air components
            (4-connected) touching the slice's border are outside.

    Returns:
        bool (X, Y, Z).
    """
    air = np.asarray(hu) < threshold_hu
    if fill == "3d":
        return ~_border_components(air, axes=(0, 1))
    if fill == "slice":
        out = np.empty_like(air)
        for k in range(air.shape[2]):
            out[:, :, k] = ~_border_components(air[:, :, k], axes=(0, 1))
        return out
    raise ValueError(f"fill must be '3d' or 'slice', not {fill!r}")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 3D connected component (6-connectivity) of a bool mask (empty stays empty)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _border_components(mask: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """The voxels of ``mask`` connected (face connectivity) to a face of the given axes.

    A geodesic flood fill from the mask's voxels on those faces
    (``ndimage.binary_propagation``). Not ``ndimage.label``: its int32 label map
    costs 4 bytes per voxel (1.2 GB with its temporaries on a 512 x 512 x 300
    scan, over Binder's 2 GB); the fill needs two bool arrays.
    """
    mask = np.asarray(mask, dtype=bool)
    seed = np.zeros_like(mask)
    for ax in axes:
        for idx in (0, -1):
            face = [slice(None)] * mask.ndim
            face[ax] = idx
            seed[tuple(face)] = mask[tuple(face)]
    if not seed.any():
        return seed
    return ndimage.binary_propagation(seed, mask=mask)


def bbox_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) voxel indices of the bounding box of a non-empty mask (stop exclusive)."""
    idx = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != ax))) for ax in range(mask.ndim)]
    if any(len(i) == 0 for i in idx):
        raise ValueError("empty mask has no bounding box")
    return np.array([i[0] for i in idx]), np.array([i[-1] + 1 for i in idx])


def scale_hu(hu: np.ndarray, window: tuple[float, float] = (-1000.0, 300.0)) -> np.ndarray:
    """Clip HU to ``window`` and map it linearly to [0, 1] (float32)."""
    lo, hi = float(window[0]), float(window[1])
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def apply_clahe(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """3D CLAHE of an image in [0, 1] (float32 out, in [0, 1]).

    skimage stretches its input's min..max to [0, 1] first; after HU
    windowing min is air (0) and max bone (1) in any body CT.
    """
    from skimage.exposure import equalize_adapthist

    if float(image.max()) <= float(image.min()):
        return image.astype(np.float32)  # constant image: nothing to equalise
    kernel = params.clahe_kernel_size
    if kernel is not None:
        kernel = tuple(min(int(k), int(s)) for k, s in zip(kernel, image.shape))
    out = equalize_adapthist(image, kernel_size=kernel, clip_limit=params.clahe_clip_limit, nbins=params.clahe_nbins)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def resize_linear(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize of (X, Y, Z) to ``shape``, voxel centres aligned as ``align_corners=False``.

    Output voxel k sits at input continuous index ``(k + 0.5) * n / m - 0.5``
    (edges clamped); float32.
    """
    import torch
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    a = np.ascontiguousarray(array, dtype=np.float32)
    if a.shape == shape:
        return a.copy()
    t = torch.from_numpy(a)[None, None]
    with torch.no_grad():
        out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def resize_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest resize with the same voxel-centre convention (output voxel k takes input ``floor((k + 0.5) * n / m)``)."""
    idx = [np.minimum(((np.arange(m) + 0.5) * n / m).astype(int), n - 1) for n, m in zip(array.shape, shape)]
    return np.ascontiguousarray(array[np.ix_(*idx)])


def _restore_vanished(src: np.ndarray, dst: np.ndarray) -> None:
    """Give every connected lesion of ``src`` that has no voxel in ``dst`` one voxel there (in place)."""
    fg = src > 0
    if not fg.any():
        return
    lab, n_comp = ndimage.label(fg)
    f = np.asarray(src.shape, dtype=float) / np.asarray(dst.shape, dtype=float)  # old voxels per new voxel
    coords = np.nonzero(fg)
    comp = lab[coords]
    # the new voxel containing each old voxel centre: floor((p + 0.5) / f)
    new = tuple(np.minimum(((c + 0.5) / fi).astype(int), s - 1) for c, fi, s in zip(coords, f, dst.shape))
    present = np.bincount(comp, weights=(dst[new] > 0), minlength=n_comp + 1) > 0
    missing = np.flatnonzero(~present[1:]) + 1
    if len(missing) == 0:
        return
    objects = ndimage.find_objects(lab)
    for c in missing:
        box = objects[c - 1]
        local = np.argwhere(lab[box] == c) + np.array([s.start for s in box])
        centroid = local.mean(axis=0)
        p = local[np.argmin(((local - centroid) ** 2).sum(axis=1))]
        values = src[tuple(local.T)]
        q = tuple(int(min((pi + 0.5) / fi, s - 1)) for pi, fi, s in zip(p, f, dst.shape))
        dst[q] = np.bincount(values).argmax()


# --------------------------------------------------------------------------- geometry helpers
def _canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (per voxel axis: target RAS axis, flip) that brings ``affine`` closest to RAS."""
    from nibabel.orientations import io_orientation

    return io_orientation(affine)


def _apply_ornt(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(array, ornt))


def _inv_ornt_aff(ornt: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    from nibabel.orientations import inv_ornt_aff

    return inv_ornt_aff(ornt, shape)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``ornt`` (canonical axes back to the original ones)."""
    from nibabel.orientations import ornt_transform

    identity = np.array([[0, 1], [1, 1], [2, 1]])
    return ornt_transform(identity, np.asarray(ornt, dtype=float))


def _translation(offset: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


def _zoom_affine(n: Sequence[int], m: Sequence[int]) -> np.ndarray:
    """Voxel map of a resize from ``n`` to ``m`` voxels: new k -> old (k + 0.5) * n/m - 0.5."""
    f = np.asarray(n, dtype=float) / np.asarray(m, dtype=float)
    z = np.diag([*f, 1.0])
    z[:3, 3] = (f - 1.0) / 2.0
    return z


def _check_record(record: Any) -> None:
    need = ("original_shape", "original_affine", "ornt", "canonical_shape", "crop_start", "crop_stop", "shape")
    if not isinstance(record, dict) or any(k not in record for k in need):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InputError("record", f"a preprocessing record with keys {list(need)}", f"{found}")
