"""The in-memory form of a scan: voxels plus the geometry that places them in space.

Axis convention (used everywhere in screener_nb): arrays are indexed
``[i, j, k]`` = ``(X, Y, Z)`` and ``affine`` maps a voxel index to RAS+ world
coordinates in mm (nibabel's convention: +x toward the patient's Right, +y
Anterior, +z Superior). Files are read in their own voxel order; preprocessing
reorients to canonical RAS, where Z is the axial (slice) axis. Tensors are
``(B, C, X, Y, Z)``; spacing is in mm, CT intensities in HU (raw) or [0, 1]
(preprocessed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Volume:
    """A 3D scan or label map with its geometry.

    Attributes:
        array: (X, Y, Z) voxels; HU (float32) for CT, integers for labels.
        affine: (4, 4) float64, voxel index -> RAS+ world position in mm.
        source: where it was read from (a file, a DICOM folder, "phantom:seed=3"), for errors.
        meta: free-form provenance (sha256, series UID, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def with_array(self, array: np.ndarray, **meta) -> "Volume":
        """Same geometry, other voxels (e.g. an anomaly map on this scan's grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.affine.copy(), self.source, {**self.meta, **meta})

    @classmethod
    def from_spacing(cls, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                     source: str | None = None) -> "Volume":
        """An axis-aligned RAS volume with the given voxel size (mm) and origin (mm)."""
        affine = np.diag([*map(float, spacing), 1.0])
        affine[:3, 3] = origin
        return cls(np.asarray(array), affine, source)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.2f}" for s in self.spacing)
        return f"Volume(shape={self.shape}, spacing=({sp}) mm, dtype={self.array.dtype}, source={self.source!r})"


PathLike = str | Path
