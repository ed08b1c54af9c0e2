"""The distillation stage (notebook 05): one student UNet trained to reproduce the teacher's maps.

The student network, its target transform and its loading are :mod:`screener_nb.student`;
the teacher's cached whole-volume maps are :mod:`screener_nb.teacher`. How the student
compares with its teacher is :mod:`screener_nb.student_eval`; low-shot supervised
fine-tuning of the student is :mod:`screener_nb.finetune`.

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

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import files
from .errors import InputError
from .methods import Method
from .progress import report
from .runtime import resolve_device
# the student and the teacher's maps live in their own modules; their names stay importable here
from .student import (STAGE, STUDENT_GRIDS, TARGETS, CellStudent, ScaledStudent, TargetTransform,  # noqa: F401
                      build_student, check_patch, load_student, load_student_unet, student_spec, student_transform)
from .teacher import (MAPS_DIR, TeacherFn, pooled_body_scores, run_teacher,  # noqa: F401
                      teacher_cache_key, teacher_maps)
from .train import TrainSettings, fit


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


@dataclass(frozen=True)
class DistillResult:
    """What :func:`distill_student` did: the student's folder, steps, teacher and target.

    Attributes:
        folder: ``runs/<run>/distill``.
        steps_done / resumed_from: the training loop's steps (resumed_from 0: a fresh start).
        teacher: the teacher method (``<condition>-<density>``, or an injected teacher's key).
        target: the target transform's state (:meth:`TargetTransform.state`).
        n_train_cases: training cases whose teacher maps the student learnt from.
        teacher_seconds: seconds spent on the teacher's maps (cached maps cost ~0).
    """

    folder: str
    steps_done: int
    resumed_from: int
    teacher: str
    target: dict
    n_train_cases: int
    teacher_seconds: float

    def table(self):
        """One-column pandas table of the run's figures (the target's quantile table left out)."""
        import pandas as pd

        return pd.Series({"teacher": self.teacher, "target": self.target["kind"], "training cases": self.n_train_cases,
                          "teacher maps (s)": round(self.teacher_seconds, 1), "steps": self.steps_done,
                          "resumed from": self.resumed_from, "folder": self.folder}, name="distillation")

    def to_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key: str):
        """``result["steps_done"]``: the dict-style reading of earlier versions."""
        return getattr(self, key)


def distill_student(cfg: Any, *, callback: Callable[[dict], None] | None = None, stop_after: int | None = None,
                    teacher_fn: TeacherFn | None = None, teacher_key: dict | str | None = None,
                    progress: Callable[[str], None] | None = report) -> DistillResult:
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
        a :class:`DistillResult`.
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
        Method.parse(cfg.teacher, "teacher")
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
    return DistillResult(str(folder), result.steps_done, result.resumed_from, spec["teacher"], transform.state(),
                         len(cases), teacher_seconds)


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
