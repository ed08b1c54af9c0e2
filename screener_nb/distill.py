"""The distillation stage (notebook 05): one student UNet trained to reproduce the teacher's maps.

How the student compares with its teacher is :mod:`screener_nb.student_eval`;
low-shot supervised fine-tuning of the student is :mod:`screener_nb.finetune`.

**Distillation.** The teacher is the frozen modular pipeline of the run
(descriptor + condition + density, ``cfg.teacher`` = ``<condition>-<density>``).
Its whole-volume anomaly map of every training case is computed ONCE with
:meth:`Screener.score_preprocessed` (sliding window, Gaussian blending) and
cached in ``distill/teacher_maps/<case>.npy``: whole-volume maps have no
window-border effects, which per-crop teacher calls would bake into the
targets, and they cost one teacher pass per case instead of one per step.
The target is a monotone transform of the teacher's map fitted on the body
voxels of the training cases (:class:`TargetTransform`, stored in
``model.json``): by default its Gaussianised rank (``quantile``), so the
regression is well scaled whatever the teacher's units and is not dominated by
the heavy upper tail of a flow's -log q; ``standard`` is the plain
``(map - mean) / std``. The student
(:func:`build_student`) is a UNet with one output channel and no activation, either at
full resolution (``student_grid="voxels"``, the paper's) or on the teacher's own cell grid
(``"cells"``, the CPU profiles': a strided stem, the UNet on the cells, trilinear
upsampling -- the teacher's map is itself upsampled from cell scores), trained through the
shared loop (:func:`screener_nb.train.fit`:
checkpoints, exact resume, DDP) with MSE to the transformed teacher map on
random crops.

The MSE covers **body voxels only**: ``score_preprocessed`` overwrites every
voxel outside the body with the body's minimum score, for the teacher and the
student alike, and every metric uses the body as its region of interest, so
the student's values outside the body are never used. Regressing them anyway
would spend capacity on an artificial constant at the far tail of the score
distribution (the body's minimum), which would dominate the squared error.

:func:`load_student` returns the student wrapped so that its output is
mapped back to the teacher's scale: ``Screener.from_run(run, student=True)``
serves it with the same ``anomaly_map`` interface as the teacher.

Artifacts (``runs/<run>/distill/``): ``model.json`` (architecture, patch,
teacher, target transform), ``checkpoint.pt``, ``train_log.csv``,
``teacher_maps/`` (cache), ``comparison.json``, ``finetune/`` (one
checkpointed run per fold and init), ``finetune.json`` and ``finetune.nc``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import files
from .errors import ConfigError, InputError
from .methods import Method
from .progress import report
from .runtime import resolve_device
from .train import TrainSettings, fit, load_checkpoint

STAGE = "distill"
MAPS_DIR = "teacher_maps"

TeacherFn = Callable[[Any], np.ndarray]


# ============================================================================ teacher maps


def teacher_cache_key(run_dir: Path, teacher: str, overlap: float) -> dict:
    """What the cached teacher maps depend on: the method and its weights' files."""
    condition, density = split_teacher(teacher)
    stamp = {}
    for rel in (f"density/{teacher}/checkpoint.pt", "descriptor/checkpoint.pt",
                *(["condition/checkpoint.pt"] if condition == "learned" else [])):
        p = run_dir / rel
        if p.exists():
            st = p.stat()
            stamp[rel] = [st.st_size, st.st_mtime_ns]
    return {"teacher": teacher, "overlap": overlap, "weights": stamp}


def split_teacher(teacher: str, name: str = "teacher") -> tuple[str, str]:
    """``"learned-flow" -> ("learned", "flow")``; a clear error naming parameter ``name`` otherwise."""
    m = Method.parse(teacher, name)
    return m.condition, m.density


def run_teacher(run_dir: str | Path, teacher: str = "learned-flow", device: str | torch.device = "auto",
                overlap: float = 0.5, sw_batch: int = 2) -> TeacherFn:
    """``case -> (X, Y, Z) float32`` whole-volume anomaly map of the run's frozen pipeline."""
    from .inference import Screener

    condition, density = split_teacher(teacher)
    screener = Screener.from_run(run_dir, density, condition, device=device, overlap=overlap, sw_batch=sw_batch)

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


#: the regression targets :class:`TargetTransform` knows
TARGETS = ("quantile", "standard")


class TargetTransform:
    """A monotone map from the teacher's scores to the student's regression target, and back.

    ``standard``: ``(s - mean) / std``. ``quantile``: the score's rank among the
    pooled training body voxels, Gaussianised, ``Phi^-1(F(s))`` with ``F`` the
    empirical CDF interpolated between ``n_quantiles`` quantiles (what sklearn's
    ``QuantileTransformer(output_distribution="normal")`` computes). Why quantile
    by default: a flow's -log q is heavy-tailed (a few voxels hundreds of nats
    above the rest), so with ``standard`` the squared error is dominated by those
    few voxels and the student learns the tail, not the ranking that every metric
    reads. The quantile target is bounded (+-5.2) and, being strictly monotone,
    keeps the teacher's ranking, hence its AUROC, exactly.

    :meth:`inverse` (torch, differentiable, any device) brings the student's
    output back to the teacher's scale; it is hand-written because neither torch
    nor sklearn has a torch-side inverse of a quantile table.
    """

    BOUND = 1e-7  # probabilities clipped as sklearn does: Phi^-1 stays within +-5.2

    def __init__(self, kind: str, **state):
        if kind not in TARGETS:
            raise ConfigError(f"parameter 'target': expected one of {list(TARGETS)}, found {kind!r}")
        self.kind = kind
        self.mean, self.std = float(state.get("mean", 0.0)), float(state.get("std", 1.0))
        self.quantiles = np.asarray(state.get("quantiles", []), dtype=np.float64)  # (K,) increasing scores
        self.probs = np.asarray(state.get("probs", []), dtype=np.float64)  # (K,) increasing CDF values

    @classmethod
    def fit(cls, kind: str, scores: np.ndarray, n_quantiles: int = 1000) -> "TargetTransform":
        """Fitted on the pooled body scores (N,) of the training cases."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        mean, std = float(scores.mean()), float(scores.std())
        std = std if std > 1e-12 else 1.0
        if kind != "quantile":
            return cls(kind, mean=mean, std=std)
        probs = np.linspace(0.0, 1.0, max(2, min(int(n_quantiles), scores.size)))
        quantiles = np.quantile(scores, probs)
        # ties (a constant region) would make the CDF a step: keep one probability per distinct score
        quantiles, first, counts = np.unique(quantiles, return_index=True, return_counts=True)
        probs = np.array([probs[i:i + n].mean() for i, n in zip(first, counts)])
        if quantiles.size < 2:  # a constant teacher: any monotone map is as good
            quantiles, probs = np.array([quantiles[0] - 1.0, quantiles[0] + 1.0]), np.array([0.0, 1.0])
        return cls(kind, mean=mean, std=std, quantiles=quantiles, probs=probs)

    def forward(self, scores: np.ndarray) -> np.ndarray:
        """Teacher scores (any shape) -> targets, float32."""
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "standard":
            return ((s - self.mean) / self.std).astype(np.float32)
        from scipy.special import ndtri

        p = np.clip(np.interp(s, self.quantiles, self.probs), self.BOUND, 1 - self.BOUND)
        return ndtri(p).astype(np.float32)

    def inverse(self, target: torch.Tensor) -> torch.Tensor:
        """Student outputs (any shape) -> the teacher's scale, piecewise linear in the CDF."""
        if self.kind == "standard":
            return target * self.std + self.mean
        p = torch.special.ndtr(target.double())
        probs = torch.as_tensor(self.probs, device=target.device)
        quantiles = torch.as_tensor(self.quantiles, device=target.device)
        hi = torch.searchsorted(probs, p.contiguous()).clamp(1, probs.numel() - 1)
        p0, p1, q0, q1 = probs[hi - 1], probs[hi], quantiles[hi - 1], quantiles[hi]
        frac = ((p - p0) / (p1 - p0)).clamp(0.0, 1.0)
        return (q0 + frac * (q1 - q0)).to(target.dtype)

    def state(self) -> dict:
        """JSON-ready description (``model.json``), read back by ``TargetTransform(**state)``."""
        out = {"kind": self.kind, "mean": self.mean, "std": self.std}
        if self.kind == "quantile":
            out.update(quantiles=self.quantiles.tolist(), probs=self.probs.tolist())
        return out


# ============================================================================ crops


class DistillTask:
    """:class:`screener_nb.train.TrainTask`: random crop -> transformed teacher map (body-masked MSE).

    Sample: ``x`` (1, X, Y, Z) image crop in [0, 1], ``y`` (1, X, Y, Z) teacher
    map through ``transform``, ``w`` (1, X, Y, Z) body mask as float (zero in padding).
    """

    def __init__(self, cases: Sequence, maps: dict[str, np.ndarray], patch, transform: TargetTransform):
        self.cases, self.maps, self.patch = list(cases), maps, tuple(int(p) for p in patch)
        self.transform = transform

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from .data.crops import random_crop, take_crop

        case = self.cases[int(rng.integers(len(self.cases)))]
        crop, start = random_crop(case.image, case.body, self.patch, rng)
        target = self.transform.forward(take_crop(self.maps[case.id], start, self.patch))
        body = take_crop(case.body, start, self.patch)
        return {"x": crop[None], "y": target[None].astype(np.float32), "w": body[None]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return masked_mse(model(batch["x"].float()).float(), batch["y"].float(), batch["w"].float()), {}


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``(pred - target)^2`` over the voxels where ``weight`` is 1 (the body)."""
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


# ============================================================================ the student


class ScaledStudent(nn.Module):
    """``forward(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)`` scores on the teacher's scale (target transform inverted)."""

    def __init__(self, unet: nn.Module, transform: TargetTransform):
        super().__init__()
        self.unet, self.transform = unet, transform
        self.config = {"student": getattr(unet, "config", None), "target": transform.kind}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform.inverse(self.unet(x).float())


#: where the student predicts: ``voxels`` (a full-resolution UNet, the paper's) or ``cells``
#: (:class:`CellStudent`, on the teacher's cell grid)
STUDENT_GRIDS = ("voxels", "cells")


class CellStudent(nn.Module):
    """A student on the teacher's cell grid: ``forward(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)``.

    A strided stem (kernel = stride = the density grid's pooling ``stride``) turns the CT into
    cells of ``stem_channels`` features, a UNet of ``size`` with one level fewer (the cells
    already are a coarser grid, and a 48 x 48 x 32 crop is 16^3 cells) predicts one value per cell, and
    trilinear upsampling (``align_corners=False``, as the teacher's cell scores are upsampled)
    brings it to the voxels. Every level of the UNet works on ``prod(stride)`` times fewer
    positions than a full-resolution student: the teacher's map carries no finer detail.
    Input sides must be multiples of ``self.multiple`` (the stride times the UNet's multiple).
    """

    def __init__(self, size: str, stride=(3, 3, 2), stem_channels: int = 16):
        super().__init__()
        from .models.unet import UNET_SIZES, build_unet

        self.stride = tuple(int(s) for s in stride)
        self.stem = nn.Conv3d(1, int(stem_channels), kernel_size=self.stride, stride=self.stride)
        features = tuple(UNET_SIZES[size]["features"])[:-1] if size in UNET_SIZES else None
        self.unet = build_unet(size, in_channels=int(stem_channels), out_channels=1, features=features)
        self.multiple = tuple(s * int(self.unet.multiple) for s in self.stride)
        self.config = {"grid": "cells", "size": size, "stride": list(self.stride), "stem_channels": int(stem_channels),
                       "unet": self.unet.config}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        cells = self.unet(F.leaky_relu(self.stem(x), 0.01))
        return F.interpolate(cells, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)


def build_student(size: str, grid: str = "voxels", stride=(3, 3, 2)) -> nn.Module:
    """The student architecture, 1 input channel, 1 output channel, no activation: a full-resolution
    UNet of ``size`` (``grid="voxels"``) or a :class:`CellStudent` on cells of ``stride`` voxels."""
    from .models.unet import build_unet

    if grid == "voxels":
        return build_unet(size, in_channels=1, out_channels=1)
    if grid == "cells":
        return CellStudent(size, stride)
    raise ConfigError(f"student grid: expected one of {', '.join(STUDENT_GRIDS)}, found {grid!r}")


def check_patch(net: nn.Module, patch, name: str = "patch") -> tuple[int, int, int]:
    """The crop / window size as ints, refused early when the network cannot take it."""
    patch = tuple(int(p) for p in patch)
    multiple = getattr(net, "multiple", 1)
    multiples = tuple(int(m) for m in multiple) if isinstance(multiple, (tuple, list)) else (int(multiple),) * 3
    bad = [f"{'XYZ'[i]}={p}" for i, p in enumerate(patch) if i < 3 and p % multiples[i]]
    if len(patch) != 3 or bad:
        what = ("" if multiples[0] == multiples[1] == multiples[2] else " (X, Y, Z)")
        shown = multiples[0] if not what else multiples
        raise ConfigError(f"parameter {name!r}: expected 3 sizes that are multiples of {shown}{what} (what the "
                          f"{getattr(net, 'config', {}).get('size', '')} student's downsampling needs), found {patch}")
    return patch


def balanced_subset(cases: Sequence, n: int, seed: int) -> list:
    """At most ``n`` of ``cases`` (all when ``n <= 0``), shared out over their datasets.

    Datasets take turns (round robin, each shuffled by ``seed``), so a small cap
    still holds cases of every dataset (the real sample CTs next to many phantoms).
    The result keeps the input order.
    """
    cases = list(cases)
    if n <= 0 or n >= len(cases):
        return cases
    rng = np.random.default_rng(seed)
    queues: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        queues.setdefault(str(getattr(c, "dataset", "")), []).append(i)
    queues = {k: [v[j] for j in rng.permutation(len(v))] for k, v in sorted(queues.items())}
    chosen: list[int] = []
    while len(chosen) < n:
        for q in queues.values():
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return [cases[i] for i in sorted(chosen)]


def distill_student(cfg: Any, *, callback: Callable[[dict], None] | None = None, stop_after: int | None = None,
                    teacher_fn: TeacherFn | None = None, teacher_key: dict | str | None = None,
                    progress: Callable[[str], None] | None = report) -> dict:
    """Precompute (or reuse) the teacher maps of the training cases and train the student.

    Args:
        cfg: ``config.resolve("distill", ...)``: run_dir, teacher, target, student_size,
            patch, teacher_cases (cap on the training cases, :func:`balanced_subset`),
            seed and the training-loop fields (steps, batch, lr...).
        callback: every log row of the shared loop (live curves).
        stop_after: stop after this many steps (checkpointed; resumes later).
        teacher_fn: ``case -> map`` replacing the run's pipeline (tests, other
            teachers); ``teacher_key`` identifies it in the cache.

    Returns:
        ``{"folder", "steps_done", "resumed_from", "teacher", "target",
        "n_train_cases", "teacher_seconds"}`` (``target``: the transform's state).
    """
    from .data.cohort import load_cohort
    from .train import _device_for, init_distributed

    run_dir = Path(cfg.run_dir)
    files.require_stage(run_dir, "data")
    cases = load_cohort(run_dir, role="train")
    if not cases:
        raise InputError(run_dir / "data", "at least one training case", "none")
    cases = balanced_subset(cases, int(cfg.teacher_cases), cfg.seed)
    small = [c.id for c in cases if any(s < p for s, p in zip(c.shape, cfg.patch))]
    if small:  # the student's sliding window (its training crop) must fit in every scan
        raise InputError(run_dir / "data", f"training cases at least as large as the patch {tuple(cfg.patch)}",
                         f"smaller cases {', '.join(small[:5])} (use a smaller -p patch=...)")
    if teacher_fn is None:
        split_teacher(cfg.teacher)
        files.require_stage(run_dir, "density")
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student_size, cfg.student_grid, cfg.pool_stride)  # a bad patch is refused before any teacher pass
    check_patch(student, cfg.patch)
    folder = files.stage_dir(run_dir, STAGE)
    settings = TrainSettings.from_config(cfg)
    dist_info = init_distributed(settings.device)
    device = _device_for(settings, dist_info)

    t0 = time.perf_counter()
    overlap = float(cfg.overlap)  # sliding-window overlap of the teacher maps
    kw = dict(teacher=cfg.teacher, device=device, teacher_fn=teacher_fn, teacher_key=teacher_key, overlap=overlap,
              progress=progress if dist_info.main else None)
    maps = teacher_maps(run_dir, cases, rank=dist_info.rank, world=dist_info.world, **kw)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
        maps = teacher_maps(run_dir, cases, **kw)  # every map is cached now
    teacher_seconds = time.perf_counter() - t0
    key = files.read_json(folder / MAPS_DIR / "teacher.json")
    transform = TargetTransform.fit(cfg.target, pooled_body_scores(cases, maps, seed=cfg.seed))

    spec = {"size": cfg.student_size, "grid": cfg.student_grid, "stride": [int(s) for s in cfg.pool_stride],
            "in_channels": 1, "out_channels": 1, "patch": [int(p) for p in cfg.patch],
            "teacher": cfg.teacher if teacher_fn is None else key.get("teacher", "custom"), "teacher_key": key,
            "target": transform.state(), "loss": f"mse over body voxels of the {cfg.target}-transformed teacher map",
            "train_cases": [c.id for c in cases], "steps": int(cfg.steps), "overlap": overlap}
    model_json = folder / "model.json"
    if model_json.exists() and (folder / "checkpoint.pt").exists():
        old = files.read_json(model_json)
        changed = [k for k in ("teacher_key", "size", "patch", "train_cases") if old.get(k) != spec[k]]
        if old.get("grid", "voxels") != spec["grid"]:
            changed.append("grid")
        if old.get("target", {}).get("kind") != cfg.target:
            changed.append("target")
        if changed:
            raise InputError(folder / "checkpoint.pt", "a student checkpoint of this teacher, architecture and cohort",
                             f"one trained with another {', '.join(changed)}; use a new run directory or "
                             f"--force distill (moves {folder} aside)")
    if dist_info.main:
        files.write_json(model_json, spec)
    result = fit(student, DistillTask(cases, maps, cfg.patch, transform), settings, folder, callback=callback,
                 desc="distill", stop_after=stop_after)
    return {"folder": str(folder), "steps_done": result.steps_done, "resumed_from": result.resumed_from,
            "teacher": spec["teacher"], "target": transform.state(), "n_train_cases": len(cases),
            "teacher_seconds": teacher_seconds}


def student_spec(run_dir: Path) -> dict:
    folder = run_dir / STAGE
    path = folder / "model.json"
    if not path.exists():
        raise InputError(run_dir, f"a distilled student ({path})",
                         "none: run notebook 05 (python -m screener_nb run --stages distill)")
    spec = files.read_json(path)
    need = ("size", "patch", "target")
    missing = [k for k in need if k not in spec]
    if missing:
        raise InputError(path, f"a student description with keys {list(need)}", f"keys {sorted(spec)} (missing {missing})")
    return spec


def student_transform(spec: dict) -> TargetTransform:
    """The target transform a student was trained with (from its ``model.json``)."""
    return TargetTransform(**spec["target"])


def load_student_unet(run_dir: str | Path, *, trained: bool = True, seed: int = 0,
                      device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The raw student UNet (output in target units, see :class:`TargetTransform`) and its ``model.json``.

    ``trained=False``: the same architecture at the initialisation distillation
    started from (``torch.manual_seed(seed)``), the baseline of the held-out MSE.
    """
    run_dir = Path(run_dir)
    spec = student_spec(run_dir)
    torch.manual_seed(seed)
    unet = build_student(spec["size"], spec.get("grid", "voxels"), spec.get("stride", (3, 3, 2)))
    if trained:
        ckpt_path = run_dir / STAGE / "checkpoint.pt"
        if not ckpt_path.exists():
            raise InputError(run_dir / STAGE, f"the student's weights ({ckpt_path})",
                             "no checkpoint: distillation has not run (or not reached its first checkpoint)")
        load_checkpoint(run_dir / STAGE, unet)  # InputError when the architecture does not match model.json
    return unet.to(resolve_device(device)).eval().requires_grad_(False), spec


def load_student(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[int, int, int]]:
    """``(model, patch)``: the frozen student, ``model(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)`` scores on
    the teacher's scale (target transform inverted), and its sliding-window size (X, Y, Z)."""
    unet, spec = load_student_unet(run_dir, device=device)
    model = ScaledStudent(unet, student_transform(spec))
    return model.to(resolve_device(device)).eval().requires_grad_(False), tuple(int(p) for p in spec["patch"])


@torch.inference_mode()
def heldout_mse(unet: nn.Module, cases: Sequence, maps: dict[str, np.ndarray], patch, transform: TargetTransform,
                *, n_crops: int = 8, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Body-voxel MSE between ``unet``'s output and the transformed teacher map on ``n_crops``
    random crops of ``cases`` (pass cases the student never saw); the crops depend only on ``seed``."""
    task = DistillTask(cases, maps, patch, transform)
    dev = resolve_device(device)
    unet = unet.to(dev).eval()
    num, den = 0.0, 0.0
    for i in range(n_crops):
        s = task.sample(np.random.default_rng([seed, 7919, i]))
        x, y, w = (torch.from_numpy(s[k])[None].to(dev) for k in ("x", "y", "w"))
        err = ((unet(x).float() - y) ** 2 * w).sum()
        num, den = num + float(err), den + float(w.sum())
    if den == 0:
        raise InputError("held-out crops", "body voxels", "none")
    return num / den


def labelled_cases(cases: Sequence) -> list:
    """The cases that have a label with at least one lesion voxel."""
    return [c for c in cases if c.label is not None and np.any(c.label)]
