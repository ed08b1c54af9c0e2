"""Voxel AUROC per lesion kind: which findings a method finds, pooled over an evaluated run's test cases.

For a kind k, the positives are the voxels of every lesion of kind k, and the negatives the
body voxels outside every lesion, over the same cases; voxels of other kinds' lesions are left
out, so a kind is judged against normal tissue only. Phantom cases know their lesions' kinds
(regenerated from their seeds, :func:`screener_nb.data.phantom_truth.phantom_truth`); a real
case's label is one kind, its dataset's. AUROCs are exact (:func:`screener_nb.metrics.voxel_auroc`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError


def kind_aurocs(maps: Mapping[str, Mapping[str, np.ndarray]], cases: Sequence,
                kinds: Mapping[str, tuple[np.ndarray, list[str]] | None]) -> dict[str, dict[tuple[str, str], float]]:
    """``{method: {(dataset, kind): AUROC}}`` of ``maps`` (method -> case id -> (X, Y, Z) scores).

    ``kinds[case.id]``: (per-lesion label (X, Y, Z), kind name of each label value - 1) for a
    phantom; missing or None for a case whose binary label is one kind, its first
    ``lesion_kinds`` entry (else its dataset). Cases are grouped by ``case.dataset``: a kind's
    negatives are the normal body voxels of the cases of its own dataset.
    """
    from .metrics import voxel_auroc

    groups: dict[str, list] = {}
    for c in cases:
        if c.label is not None:
            groups.setdefault(str(c.dataset), []).append(c)
    out: dict[str, dict[tuple[str, str], float]] = {m: {} for m in maps}
    for dataset, group in groups.items():
        per_case = []  # (case, per-lesion label, {kind: label values})
        for c in group:
            truth = kinds.get(c.id)
            if truth is None:
                name = (list(getattr(c, "lesion_kinds", None) or []) or [dataset])[0]
                per_case.append((c, (np.asarray(c.label) > 0).astype(np.uint8), {name: [1]}))
                continue
            labels, names = truth
            values: dict[str, list[int]] = {}
            for v, name in enumerate(names, start=1):
                values.setdefault(name, []).append(v)
            per_case.append((c, np.asarray(labels), values))
        for kind in sorted({k for _, _, vals in per_case for k in vals}):
            targets, rois, idx = [], [], []
            for i, (c, lab, vals) in enumerate(per_case):
                mine = np.isin(lab, vals.get(kind, []))
                targets.append(mine)
                rois.append(np.asarray(c.body, bool) & ((lab == 0) | mine))
                idx.append(i)
            for method, by_case in maps.items():
                scores = [np.asarray(by_case[per_case[i][0].id]) for i in idx]
                out[method][(dataset, kind)] = float(voxel_auroc(scores, targets, roi=rois))
    return out


def lesion_kind_table(run_dir: str | Path, methods: Sequence[str] | None = None):
    """Per-kind voxel AUROC of an evaluated run's test cases (their maps in ``eval/maps_pre``):
    a pandas table, rows = kinds (``dataset: kind``), columns = methods (default: all with maps)."""
    import pandas as pd

    from .data.cohort import load_cohort
    from .data.phantom_truth import phantom_truth
    from .rundir import RunDir

    run_dir = Path(run_dir)
    pre = RunDir(run_dir).stage_dir("evaluate", create=False) / "maps_pre"
    cases = [c for c in load_cohort(run_dir, role="test") if c.label is not None and np.any(c.label)]
    if not cases:
        raise InputError(run_dir / "data", "test cases with lesion labels", "none")
    if methods is None:
        methods = sorted(p.name for p in pre.iterdir() if p.is_dir()) if pre.is_dir() else []
    missing = [f"{m}/{c.id}.npy" for m in methods for c in cases if not (pre / m / f"{c.id}.npy").is_file()]
    if not methods or missing:
        raise InputError(pre, "every test case's map of each method (notebook 06)",
                         f"missing {', '.join(missing[:4]) or 'every method'}")
    maps = {m: {c.id: np.load(pre / m / f"{c.id}.npy", mmap_mode="r") for c in cases} for m in methods}
    kinds = {}
    for c in cases:
        if str(c.id).startswith("phantom-"):
            truth = phantom_truth(run_dir, c)
            kinds[c.id] = (truth.labels, truth.kinds)
    table = kind_aurocs(maps, cases, kinds)
    frame = pd.DataFrame({m: {f"{d}: {k}": v for (d, k), v in by_kind.items()} for m, by_kind in table.items()})
    return frame[list(methods)]
