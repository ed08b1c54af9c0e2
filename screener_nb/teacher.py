"""The teacher's whole-volume anomaly maps, computed once per case and cached.

The teacher is the frozen modular pipeline of a run (descriptor + condition + density,
``<condition>-<density>``). Its map of a case is computed with
:meth:`screener_nb.inference.Screener.score_preprocessed` (sliding window, Gaussian
blending) and cached in ``distill/teacher_maps/<case>.npy``, tied to the method and its
weights' files (:func:`teacher_cache_key`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import files
from .errors import InputError
from .inference import Screener
from .methods import Method
from .student import STAGE

MAPS_DIR = "teacher_maps"

TeacherFn = Callable[[Any], np.ndarray]


def teacher_cache_key(run_dir: Path, teacher: str, overlap: float) -> dict:
    """What the cached teacher maps depend on: the method and its weights' files."""
    condition = Method.parse(teacher, "teacher").condition
    stamp = {}
    for rel in (f"density/{teacher}/checkpoint.pt", "descriptor/checkpoint.pt",
                *(["condition/checkpoint.pt"] if condition == "learned" else [])):
        p = run_dir / rel
        if p.exists():
            st = p.stat()
            stamp[rel] = [st.st_size, st.st_mtime_ns]
    return {"teacher": teacher, "overlap": overlap, "weights": stamp}


def run_teacher(run_dir: str | Path, teacher: str = "learned-flow", device: str | torch.device = "auto",
                overlap: float = 0.5, sw_batch: int = 2) -> TeacherFn:
    """``case -> (X, Y, Z) float32`` whole-volume anomaly map of the run's frozen pipeline."""
    screener = Screener.from_run(run_dir, Method.parse(teacher, "teacher"), device=device, overlap=overlap,
                                 sw_batch=sw_batch)

    def teacher_fn(case) -> np.ndarray:
        return screener.score_preprocessed(case.image, case.body, case.spacing, source=f"case {case.id}")

    teacher_fn.screener = screener  # type: ignore[attr-defined]
    return teacher_fn


def teacher_maps(run_dir: str | Path, cases: Sequence, *, teacher: str = "learned-flow",
                 device: str | torch.device = "auto", teacher_fn: TeacherFn | None = None,
                 teacher_key: dict | str | None = None, overlap: float = 0.5, rank: int = 0, world: int = 1,
                 progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Whole-volume teacher maps of ``cases``, cached in ``distill/teacher_maps/<id>.npy``.

    A map is computed once and reused (also after an interrupted run); the cache
    is tied to the teacher (method, overlap, size and time stamp of its weight
    files, or ``teacher_key`` for an injected ``teacher_fn``) and rebuilt when it
    changes. With ``world > 1`` (DDP) rank ``r`` computes cases ``r, r + world, ...``
    and the caller synchronises before reading the others.

    Returns:
        ``{case id: (X, Y, Z) float32 map}`` (memory-mapped) of the cases this rank owns
        or finds cached.
    """
    run_dir = Path(run_dir)
    folder = files.stage_dir(run_dir, STAGE) / MAPS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if teacher_fn is None:
        key = teacher_cache_key(run_dir, teacher, overlap)
    else:
        key = teacher_key if teacher_key is not None else getattr(teacher_fn, "__name__", "custom")
        key = key if isinstance(key, dict) else {"teacher": str(key)}
    key_path = folder / "teacher.json"
    if rank == 0:
        if key_path.exists() and files.read_json(key_path) != json.loads(json.dumps(key)):
            stale = list(folder.glob("*.npy"))
            if progress:
                progress(f"[distill] teacher changed: recomputing {len(stale)} cached teacher maps")
            for p in stale:
                p.unlink()
        files.write_json(key_path, key)
    out: dict[str, np.ndarray] = {}
    for i, case in enumerate(cases):
        path = folder / f"{case.id}.npy"
        cached = _read_map(path, case.shape)
        if cached is not None:
            out[case.id] = cached
            continue
        if i % world != rank:
            continue
        if teacher_fn is None:
            teacher_fn = run_teacher(run_dir, teacher, device, overlap)
        t0 = time.perf_counter()
        m = np.asarray(teacher_fn(case), dtype=np.float32)
        if m.shape != case.shape or not np.isfinite(m).all():
            raise InputError(f"teacher map of case {case.id}", f"a finite float map of shape {case.shape}",
                             f"shape {m.shape}, {int((~np.isfinite(m)).sum())} non-finite values")
        files.save_npy(path, m)
        if progress:
            progress(f"[distill] teacher map {case.id} ({i + 1}/{len(cases)}) {case.shape} in {time.perf_counter() - t0:.1f} s")
        out[case.id] = np.load(path, mmap_mode="r")
    return out


def _read_map(path: Path, shape) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        m = np.load(path, mmap_mode="r")
    except Exception:  # a foreign/corrupt file: recompute it (writes are atomic, so this is rare)
        return None
    return m if tuple(m.shape) == tuple(shape) else None


def pooled_body_scores(cases: Sequence, maps: dict[str, np.ndarray], budget: int = 2_000_000,
                       seed: int = 0) -> np.ndarray:
    """Teacher scores of the body voxels of ``cases``, pooled (N,) float64, N <= ``budget``.

    Every body voxel while the cohort has fewer than ``budget``; else an even
    share per case drawn without replacement (seeded). A quantile table or a
    mean needs no more, and a paper-scale cohort holds billions of body voxels.
    """
    share = max(1, int(budget) // max(1, len(cases)))
    rng = np.random.default_rng(seed)
    parts = []
    for c in cases:
        v = np.asarray(maps[c.id])[np.asarray(c.body, dtype=bool)]
        if v.size > share:
            v = v[np.sort(rng.choice(v.size, size=share, replace=False))]
        parts.append(v.astype(np.float64))
    values = np.concatenate(parts) if parts else np.zeros(0)
    if values.size == 0:
        raise InputError("training cases", "body voxels to normalise the teacher map", "none")
    return values


