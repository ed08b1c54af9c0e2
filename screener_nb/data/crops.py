"""Windows of a volume: the crops that training and the notebooks take from a preprocessed scan.

All take (X, Y, Z) arrays and ``patch`` sizes in voxels; a window that reaches past the
volume is padded (with zeros, or ``fill``), so every crop has the patch's shape.
"""
from __future__ import annotations

import numpy as np


def take_crop(array: np.ndarray, start, patch, fill: float = 0.0, dtype=np.float32) -> np.ndarray:
    """``array[start : start + patch]`` (X, Y, Z), ``fill``-padded where the array is smaller."""
    out = np.full(tuple(int(p) for p in patch), fill, dtype)
    sl = tuple(slice(int(s), min(int(s) + int(p), n)) for s, p, n in zip(start, patch, array.shape))
    region = np.asarray(array[sl], dtype=dtype)
    out[tuple(slice(0, r) for r in region.shape)] = region
    return out


def centred_start(centre, shape, patch, rng: np.random.Generator) -> np.ndarray:
    """Start (3,) of a ``patch`` window around ``centre`` (jittered by up to a quarter patch), inside
    the volume of ``shape`` where it fits."""
    patch, shape = np.asarray(patch), np.asarray(shape)
    jitter = rng.integers(-(patch // 4), patch // 4 + 1)
    return np.clip(np.asarray(centre) - patch // 2 + jitter, 0, np.maximum(shape - patch, 0))


def random_crop(image: np.ndarray, body: np.ndarray, patch, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``patch``-sized crop (zero-padded where the scan is smaller) centred near a random body
    voxel (:func:`centred_start`). Returns (crop (X, Y, Z) float32, start voxel (3,))."""
    body = np.asarray(body)
    step = max(1, body.size // 200_000)  # a strided subset of body voxels is plenty to pick a centre
    body_idx = np.flatnonzero(body.ravel()[::step])
    centre = np.array(np.unravel_index(int(rng.choice(body_idx)) * step, body.shape))
    start = centred_start(centre, image.shape, patch, rng)
    return take_crop(image, start, patch), start


def centre_slices(shape, patch) -> tuple[slice, slice, slice]:
    """The slices of the ``patch`` window at the centre of a volume of ``shape`` (cut to the volume
    where it is smaller)."""
    starts = [max(0, int(s) // 2 - int(p) // 2) for s, p in zip(shape, patch)]
    return tuple(slice(a, a + int(p)) for a, p in zip(starts, patch))
