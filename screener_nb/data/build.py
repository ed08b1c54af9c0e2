"""The data stage (notebook 01): build a run's cohort of preprocessed cases.

Cohorts, chosen by the ``dataset`` parameter:

* ``phantoms``: the embedded default. Healthy procedural torsos for training,
  phantoms with lesions (exact masks) for validation (threshold choice) and
  test. Deterministic from the seed; nothing to download.
* ``samples``: the real public CTs of ``data_manifests/samples.yaml`` (fetched
  once with ``make data-samples``): TotalSegmentator examples for training,
  LIDC-IDRI-0001 and the two pyradiomics lung tumours for test.
* ``phantoms+samples``: both (``make demo``).
* any dataset manifest name (``lidc_idri``, ``kits21``...): the user's own copy
  under ``$SCREENER_DATA_DIR``, read through its manifest.

Every case is preprocessed as docs/method.md says (:mod:`screener_nb.data.preprocess`)
and written in the run's format (:mod:`screener_nb.data.cohort`). Real scans go
through the preprocessing cache, so a second run does not redo them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import files
from ..errors import InputError
from ..progress import report
from .cohort import write_case, write_index
from .phantom_truth import phantom_seed
from .preprocess import PreprocessParams, preprocess



def preprocess_params(cfg: Any) -> PreprocessParams:
    return PreprocessParams(spacing=tuple(cfg.target_spacing), clahe=bool(cfg.clahe))


def _binary(label: np.ndarray | None) -> np.ndarray | None:
    return None if label is None else (np.asarray(label) > 0).astype(np.uint8)


def _phantom_cases(cfg: Any):
    """Yield (case_id, role, image Volume, label Volume|None, lesions list) for the phantom cohort."""
    from .phantoms import generate_case

    for role, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test), ("calib", cfg.n_calib)):
        for i in range(n):
            case = generate_case(phantom_seed(cfg.seed, role, i), lesions=role in ("val", "test"), shape=tuple(cfg.phantom_shape),
                                 spacing=tuple(cfg.phantom_spacing))
            lesions = list(getattr(case, "lesions", []) or [])
            yield f"phantom-{role}-{i:03d}", role, case.image, case.label, lesions


def _sample_cases(cfg: Any):
    from .io import read_label, read_volume
    from .samples import sample_cases

    found = sample_cases()
    if not found:
        raise InputError("the real sample cohort", "converted cases (run `make data-samples` once)",
                         "none in the samples folder")
    if cfg.max_cases:
        found = found[: cfg.max_cases]
    for c in found:
        image = read_volume(c.image)
        label = read_label(c.label, like=image) if c.label else None
        yield c.id, c.role, image, label, [{"kind": c.dataset}] if label is not None else []


def _manifest_cases(cfg: Any):
    from .io import read_label, read_volume
    from .manifests import apply_label_fixes, find_cases, load_manifest

    manifest = load_manifest(cfg.dataset)
    found = find_cases(manifest)
    if cfg.max_cases:
        found = found[: cfg.max_cases]
    for c in found:
        image = read_volume(c.image)
        label = None
        if c.label is not None:
            label = read_label(c.label, like=image)
            label = label.with_array(apply_label_fixes(manifest, c.case_id, label.array))
        yield c.case_id, manifest.role, image, label, []


def prepare_data(cfg: Any, *, progress: Callable[[str], None] | None = report) -> dict:
    """Build ``runs/<run>/data``: preprocessed cases, ``index.json``, ``lesions.json``.

    Returns the index (as written). Idempotent: a finished data stage is
    returned as is (the runner skips it; delete or ``--force`` to rebuild).
    """
    from ..rundir import RunDir

    run = RunDir(cfg.run_dir)
    data_dir = run.stage_dir("data")
    if run.done("data"):
        return files.read_json(data_dir / "index.json")
    params = preprocess_params(cfg)
    sources = []
    names = cfg.dataset.split("+")
    for name in names:
        if name == "phantoms":
            sources.append(("phantoms", _phantom_cases(cfg), False))
        elif name == "samples":
            sources.append(("samples", _sample_cases(cfg), True))
        else:
            sources.append((name, _manifest_cases(cfg), True))

    from .cache import PreprocessCache

    cache = PreprocessCache()
    entries, lesions = [], {}
    for dataset, cases, cached in sources:
        for case_id, role, image, label, case_lesions in cases:
            if progress:
                progress(f"[data] {case_id}: {image.shape} at {tuple(round(s, 2) for s in image.spacing)} mm")
            label_bin = None if label is None else label.with_array(_binary(label.array))
            pre = (cache.get_or_compute(image, params, label=label_bin) if cached
                   else preprocess(image, params, label=label_bin))
            kinds = sorted({les.get("kind", dataset) for les in case_lesions})
            entries.append(write_case(data_dir, case_id, pre, dataset=dataset, role=role, lesion_kinds=kinds,
                                      source=image.source, sha256=image.meta.get("sha256")))
            lesions[case_id] = [_jsonable(les) for les in case_lesions]
    if not entries:
        raise InputError(cfg.dataset, "at least one case", "an empty cohort (check n_train / n_test)")
    write_index(data_dir, entries, params)
    files.write_json(data_dir / "lesions.json", lesions)
    return files.read_json(data_dir / "index.json")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def cohort_summary(run_dir: str | Path) -> list[dict]:
    """One row per case (id, dataset, role, shape, spacing, body fraction, lesion voxels)."""
    from .cohort import load_cohort

    rows = []
    for c in load_cohort(run_dir):
        rows.append({"id": c.id, "dataset": c.dataset, "role": c.role, "shape": c.shape,
                     "spacing_mm": tuple(round(s, 2) for s in c.spacing),
                     "body_fraction": round(float(np.mean(c.body)), 3),
                     "lesion_voxels": int(np.count_nonzero(c.label)) if c.label is not None else 0,
                     "lesion_kinds": ",".join(c.lesion_kinds)})
    return rows
