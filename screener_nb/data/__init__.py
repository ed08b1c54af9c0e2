"""Data layer: reading scans with their geometry, preprocessing, cohorts and manifests."""
from __future__ import annotations


def load_case(path_or_id, **kwargs):
    """Read a case by file path, DICOM folder or cohort id; see :func:`screener_nb.data.cohort.load_case`."""
    from .cohort import load_case as _load_case

    return _load_case(path_or_id, **kwargs)
