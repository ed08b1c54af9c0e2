"""Small synthetic scans shared by unit tests: an elliptic 'body' of soft tissue in air."""
from __future__ import annotations

import numpy as np

from screener_nb.data.volume import Volume


def elliptic_scan(seed: int = 0, shape=(30, 26, 10), lesion=(slice(13, 17), slice(11, 15), slice(4, 6)),
                  lesion_hu: float | None = None, origin=None) -> tuple[Volume, Volume]:
    """(CT volume in HU, label volume) on a non-canonical affine (axis 0 flipped).

    The body is an ellipse (semi-axes 12 x 10 voxels) of 40 +- 10 HU in -1000 HU air;
    ``lesion`` (a box of slices, or None) is labelled 1 and, when ``lesion_hu`` is
    given, set to that intensity.
    """
    rng = np.random.default_rng(seed)
    i, j, _ = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((i - shape[0] / 2) / 12.0) ** 2 + ((j - shape[1] / 2) / 10.0) ** 2 < 1
    hu[body] = 40.0 + rng.normal(0, 10, int(body.sum()))
    lab = np.zeros(shape, np.uint8)
    if lesion is not None:
        lab[lesion] = 1
        if lesion_hu is not None:
            hu[lab > 0] = lesion_hu
    aff = np.diag([-1.2, 1.1, 2.0, 1.0])  # not canonical: outputs must undo the reorientation
    if origin is not None:
        aff[:3, 3] = origin
    return Volume(hu, aff, f"scan{seed}.nii.gz"), Volume(lab, aff)
