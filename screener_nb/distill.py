"""The distillation stage (notebook 05): one student UNet, then low-shot fine-tuning.

**Distillation.** The teacher is the frozen modular pipeline of the run
(descriptor + condition + density, ``cfg.teacher`` = ``<condition>-<density>``).
Its whole-volume anomaly map of every training case is computed ONCE with
:meth:`Screener.score_preprocessed` (sliding window, Gaussian blending) and
cached in ``distill/teacher_maps/<case>.npy``: whole-volume maps have no
window-border effects, which per-crop teacher calls would bake into the
targets, and they cost one teacher pass per case instead of one per step.
The target is normalised, ``(map - mean) / std`` with mean and std of the
teacher's scores over the body voxels of the training cases (stored in
``model.json``), so the regression is well scaled whatever the teacher's
units (nats of a flow can be in the hundreds). The student is
``build_unet(student_size, 1, 1)`` (one output channel, no activation)
trained through the shared loop (:func:`screener_nb.train.fit`:
checkpoints, exact resume, DDP) with MSE to the normalised teacher map on
random crops.

The MSE covers **body voxels only**: ``score_preprocessed`` overwrites every
voxel outside the body with the body's minimum score, for the teacher and the
student alike, and every metric uses the body as its region of interest, so
the student's values outside the body are never used. Regressing them anyway
would spend capacity on an artificial constant at the far tail of the score
distribution (the body's minimum), which would dominate the squared error.

:func:`load_student` returns the student wrapped so that its output is
de-normalised (on the teacher's scale): ``Screener.from_run(run, student=True)``
serves it with the same ``anomaly_map`` interface as the teacher.

**Comparison.** :func:`student_vs_teacher` measures, in one process, the
pooled voxel AUROC of both on labelled cases and their inference speed
(voxels per second of ``score_preprocessed`` on the same volume, best of
``repeats`` after a warm-up on a few windows) and peak memory; :func:`bench_student_vs_teacher`
does the same in fresh subprocesses (peak RSS from ``ru_maxrss``).

**Low-shot fine-tuning.** The paper replaces the student's head by one
sigmoid channel and trains with BCE + Dice on k labelled cases per fold,
against the same UNet from random initialisation. A MONAI UNet ends in a
one-channel convolution already, so the network is kept as it is and its
output is treated as a *logit*: the sigmoid is applied inside the loss
(MONAI ``DiceCELoss(sigmoid=True)``: ``BCEWithLogits`` + soft Dice) and at
inference (Dice at probability >= 0.5). Keeping the distilled last layer
also keeps its ranking: at step 0 the logit is the normalised anomaly
score. Lesions are tiny, so half of the fine-tuning crops are centred on a
random lesion voxel (``lesion_p=0.5``), the rest are random body crops.
Folds come from :func:`cv_splits`; per-case Dice pairs of the two inits are
compared with a Wilcoxon signed-rank test (:func:`paired_test`).

Artifacts (``runs/<run>/distill/``): ``model.json`` (architecture, patch,
teacher, normalisation), ``checkpoint.pt``, ``train_log.csv``,
``teacher_maps/`` (cache), ``comparison.json``, ``finetune/`` (one
checkpointed run per fold and init), ``finetune.json`` and ``finetune.nc``.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import files
from .errors import ConfigError, InputError
from .runtime import resolve_device
from .train import TrainSettings, fit, load_checkpoint

STAGE = "distill"
MAPS_DIR = "teacher_maps"
INITS = ("distilled", "random")

TeacherFn = Callable[[Any], np.ndarray]


# ============================================================================ teacher maps


def _teacher_key(run_dir: Path, teacher: str, overlap: float) -> dict:
    """What the cached teacher maps depend on: the method and its weights' files."""
    condition, density = _split_teacher(teacher)
    stamp = {}
    for rel in (f"density/{teacher}/checkpoint.pt", "descriptor/checkpoint.pt",
                *(["condition/checkpoint.pt"] if condition == "learned" else [])):
        p = run_dir / rel
        if p.exists():
            st = p.stat()
            stamp[rel] = [st.st_size, st.st_mtime_ns]
    return {"teacher": teacher, "overlap": overlap, "weights": stamp}


def _split_teacher(teacher: str) -> tuple[str, str]:
    from .inference import check_method

    parts = str(teacher).split("-")
    if len(parts) != 2:
        raise ConfigError(f"parameter 'teacher': expected <condition>-<density> (e.g. learned-flow), found {teacher!r}")
    check_method(*parts)
    return parts[0], parts[1]


def run_teacher(run_dir: str | Path, teacher: str = "learned-flow", device: str | torch.device = "auto",
                overlap: float = 0.5, sw_batch: int = 2) -> TeacherFn:
    """``case -> (X, Y, Z) float32`` whole-volume anomaly map of the run's frozen pipeline."""
    from .inference import Screener

    condition, density = _split_teacher(teacher)
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
        key = _teacher_key(run_dir, teacher, overlap)
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
        with files.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, m)
        if progress:
            progress(f"[distill] teacher map {case.id} {case.shape} in {time.perf_counter() - t0:.1f} s")
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


def target_stats(cases: Sequence, maps: dict[str, np.ndarray]) -> tuple[float, float]:
    """Mean and std of the teacher scores over the body voxels of ``cases`` (pooled, float64)."""
    n, s, s2 = 0, 0.0, 0.0
    for case in cases:
        v = np.asarray(maps[case.id], dtype=np.float64)[np.asarray(case.body, dtype=bool)]
        n, s, s2 = n + v.size, s + v.sum(), s2 + np.square(v).sum()
    if n == 0:
        raise InputError("training cases", "body voxels to normalise the teacher map", "none")
    mean = s / n
    std = float(np.sqrt(max(s2 / n - mean * mean, 0.0)))
    return float(mean), std if std > 1e-12 else 1.0


# ============================================================================ crops


def take_crop(array: np.ndarray, start, patch, fill: float = 0.0, dtype=np.float32) -> np.ndarray:
    """``array[start : start + patch]`` (X, Y, Z), ``fill``-padded where the array is smaller
    (the same window as :func:`screener_nb.density_fit.random_crop` returns for the image)."""
    out = np.full(tuple(int(p) for p in patch), fill, dtype)
    sl = tuple(slice(int(s), min(int(s) + int(p), n)) for s, p, n in zip(start, patch, array.shape))
    region = np.asarray(array[sl], dtype=dtype)
    out[tuple(slice(0, r) for r in region.shape)] = region
    return out


def centred_start(centre, shape, patch, rng: np.random.Generator) -> np.ndarray:
    """Start of a ``patch`` window around ``centre`` (jittered by up to a quarter patch), inside the volume."""
    patch, shape = np.asarray(patch), np.asarray(shape)
    jitter = rng.integers(-(patch // 4), patch // 4 + 1)
    return np.clip(np.asarray(centre) - patch // 2 + jitter, 0, np.maximum(shape - patch, 0))


class DistillTask:
    """:class:`screener_nb.train.TrainTask`: random crop -> normalised teacher map (body-masked MSE).

    Sample: ``x`` (1, X, Y, Z) image crop in [0, 1], ``y`` (1, X, Y, Z) normalised
    teacher map, ``w`` (1, X, Y, Z) body mask as float (zero in padding).
    """

    def __init__(self, cases: Sequence, maps: dict[str, np.ndarray], patch, mean: float, std: float):
        self.cases, self.maps, self.patch = list(cases), maps, tuple(int(p) for p in patch)
        self.mean, self.std = float(mean), float(std)

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from .density_fit import random_crop

        case = self.cases[int(rng.integers(len(self.cases)))]
        crop, start = random_crop(case.image, case.body, self.patch, rng)
        target = (take_crop(self.maps[case.id], start, self.patch) - self.mean) / self.std
        body = take_crop(case.body, start, self.patch)
        return {"x": crop[None], "y": target[None].astype(np.float32), "w": body[None]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return masked_mse(model(batch["x"].float()).float(), batch["y"].float(), batch["w"].float()), {}


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``(pred - target)^2`` over the voxels where ``weight`` is 1 (the body)."""
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


# ============================================================================ the student


class DenormalisedStudent(nn.Module):
    """``forward(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)`` scores on the teacher's scale (un-normalised)."""

    def __init__(self, unet: nn.Module, mean: float, std: float):
        super().__init__()
        self.unet, self.mean, self.std = unet, float(mean), float(std)
        self.config = {"student": getattr(unet, "config", None), "mean": self.mean, "std": self.std}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x).float() * self.std + self.mean


def build_student(size: str) -> nn.Module:
    """The student architecture: a full-resolution UNet, 1 input channel, 1 output channel, no activation."""
    from .models.unet import build_unet

    return build_unet(size, in_channels=1, out_channels=1)


def check_patch(net: nn.Module, patch, name: str = "patch") -> tuple[int, int, int]:
    """The crop / window size as ints, refused early when the UNet cannot take it."""
    patch = tuple(int(p) for p in patch)
    multiple = int(getattr(net, "multiple", 1))
    bad = [f"{'XYZ'[i]}={p}" for i, p in enumerate(patch) if p % multiple]
    if len(patch) != 3 or bad:
        raise ConfigError(f"parameter {name!r}: expected 3 sizes that are multiples of {multiple} (the "
                          f"{getattr(net, 'config', {}).get('size', '')} UNet halves the resolution "
                          f"{multiple.bit_length() - 1} times), found {patch}")
    return patch


def distill_student(cfg: Any, *, callback: Callable[[dict], None] | None = None, stop_after: int | None = None,
                    teacher_fn: TeacherFn | None = None, teacher_key: dict | str | None = None,
                    progress: Callable[[str], None] | None = print) -> dict:
    """Precompute (or reuse) the teacher maps of the training cases and train the student.

    Args:
        cfg: ``config.resolve("distill", ...)``: run_dir, teacher, student_size,
            patch, seed and the training-loop fields (steps, batch, lr...).
        callback: every log row of the shared loop (live curves).
        stop_after: stop after this many steps (checkpointed; resumes later).
        teacher_fn: ``case -> map`` replacing the run's pipeline (tests, other
            teachers); ``teacher_key`` identifies it in the cache.

    Returns:
        ``{"folder", "steps_done", "resumed_from", "teacher", "target_mean",
        "target_std", "n_train_cases", "teacher_seconds"}``.
    """
    from .data.cohort import load_cohort
    from .train import _device_for, init_distributed

    run_dir = Path(cfg.run_dir)
    files.require_stage(run_dir, "data")
    cases = load_cohort(run_dir, role="train")
    if not cases:
        raise InputError(run_dir / "data", "at least one training case", "none")
    small = [c.id for c in cases if any(s < p for s, p in zip(c.shape, cfg.patch))]
    if small:  # the student's sliding window (its training crop) must fit in every scan
        raise InputError(run_dir / "data", f"training cases at least as large as the patch {tuple(cfg.patch)}",
                         f"smaller cases {', '.join(small[:5])} (use a smaller -p patch=...)")
    if teacher_fn is None:
        _split_teacher(cfg.teacher)
        files.require_stage(run_dir, "density")
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student_size)  # built first: a bad patch is refused before any teacher pass
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
    mean, std = target_stats(cases, maps)

    spec = {"size": cfg.student_size, "in_channels": 1, "out_channels": 1, "patch": [int(p) for p in cfg.patch],
            "teacher": cfg.teacher if teacher_fn is None else key.get("teacher", "custom"), "teacher_key": key,
            "target_mean": mean, "target_std": std, "loss": "mse over body voxels of the normalised teacher map",
            "train_cases": [c.id for c in cases], "steps": int(cfg.steps), "overlap": overlap}
    model_json = folder / "model.json"
    if model_json.exists() and (folder / "checkpoint.pt").exists():
        old = files.read_json(model_json)
        changed = [k for k in ("teacher_key", "size", "patch", "train_cases") if old.get(k) != spec[k]]
        if changed:
            raise InputError(folder / "checkpoint.pt", "a student checkpoint of this teacher, architecture and cohort",
                             f"one trained with another {', '.join(changed)}; use a new run directory or "
                             f"--force distill (moves {folder} aside)")
    if dist_info.main:
        files.write_json(model_json, spec)
    result = fit(student, DistillTask(cases, maps, cfg.patch, mean, std), settings, folder, callback=callback,
                 desc="distill", stop_after=stop_after)
    return {"folder": str(folder), "steps_done": result.steps_done, "resumed_from": result.resumed_from,
            "teacher": spec["teacher"], "target_mean": mean, "target_std": std, "n_train_cases": len(cases),
            "teacher_seconds": teacher_seconds}


def _student_spec(run_dir: Path) -> dict:
    folder = run_dir / STAGE
    path = folder / "model.json"
    if not path.exists():
        raise InputError(run_dir, f"a distilled student ({path})",
                         "none: run notebook 05 (python -m screener_nb run --stages distill)")
    spec = files.read_json(path)
    need = ("size", "patch", "target_mean", "target_std")
    missing = [k for k in need if k not in spec]
    if missing:
        raise InputError(path, f"a student description with keys {list(need)}", f"keys {sorted(spec)} (missing {missing})")
    return spec


def load_student_unet(run_dir: str | Path, *, trained: bool = True, seed: int = 0,
                      device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The raw student UNet (normalised output) and its ``model.json``.

    ``trained=False``: the same architecture at the initialisation distillation
    started from (``torch.manual_seed(seed)``), the baseline of the held-out MSE.
    """
    run_dir = Path(run_dir)
    spec = _student_spec(run_dir)
    torch.manual_seed(seed)
    unet = build_student(spec["size"])
    if trained:
        ckpt_path = run_dir / STAGE / "checkpoint.pt"
        if not ckpt_path.exists():
            raise InputError(run_dir / STAGE, f"the student's weights ({ckpt_path})",
                             "no checkpoint: distillation has not run (or not reached its first checkpoint)")
        load_checkpoint(run_dir / STAGE, unet)  # InputError when the architecture does not match model.json
    return unet.to(resolve_device(device)).eval().requires_grad_(False), spec


def load_student(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[int, int, int]]:
    """``(model, patch)``: the frozen student, ``model(x (B,1,X,Y,Z)) -> (B,1,X,Y,Z)`` scores on
    the teacher's scale (de-normalised), and its sliding-window size (X, Y, Z)."""
    unet, spec = load_student_unet(run_dir, device=device)
    model = DenormalisedStudent(unet, spec["target_mean"], spec["target_std"])
    return model.to(resolve_device(device)).eval().requires_grad_(False), tuple(int(p) for p in spec["patch"])


@torch.inference_mode()
def heldout_mse(unet: nn.Module, cases: Sequence, maps: dict[str, np.ndarray], patch, mean: float, std: float, *,
                n_crops: int = 8, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Body-voxel MSE between ``unet``'s output and the normalised teacher map on ``n_crops``
    random crops of ``cases`` (pass cases the student never saw); the crops depend only on ``seed``."""
    task = DistillTask(cases, maps, patch, mean, std)
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


# ============================================================================ student vs teacher


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _release_memory() -> None:
    """Give freed heap back to the OS so the next measurement starts from a fair baseline."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled in a thread.

    ``tracemalloc`` sees only Python allocations, not torch's; sampling RSS
    every ``interval`` s sees both (a peak shorter than the interval may be missed).
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _warmup_crop(screener, image: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A crop of ``sw_batch`` windows around the body's centre: enough for a warm-up pass
    through every kernel shape the whole volume will use, at a fraction of its cost."""
    patch = np.asarray(getattr(screener, "patch", image.shape))
    size = np.minimum(patch * np.array([max(1, getattr(screener, "sw_batch", 1)), 1, 1]), image.shape)
    centre = np.argwhere(body).mean(0).astype(int) if body.any() else np.asarray(image.shape) // 2
    start = np.clip(centre - size // 2, 0, np.asarray(image.shape) - size)
    sl = tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))
    if not body[sl].any():
        return image, body
    return image[sl], body[sl]


def measure_inference(screener, image: np.ndarray, body: np.ndarray, spacing, *, repeats: int = 2,
                      warmup: bool = True) -> dict:
    """Speed and memory of ``screener.score_preprocessed`` on one volume.

    A warm-up call on a crop of ``sw_batch`` windows (the same kernel shapes as
    the whole volume: one-time initialisation is excluded from the timing),
    then ``repeats`` timed calls on the whole volume; the best time counts.

    Returns:
        ``{"voxels", "seconds", "voxels_per_s", "repeats", "peak_rss_mb", "rss_increase_mb"[, "cuda_peak_mb"]}``:
        peak RSS of the process during the calls and its increase over the RSS
        before them (what inference itself needed); on CUDA also the peak of
        allocated GPU memory.
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    body = np.ascontiguousarray(body, dtype=bool)
    dev = getattr(screener, "device", torch.device("cpu"))
    _release_memory()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    with PeakRSS() as mem:
        if warmup:
            screener.score_preprocessed(*_warmup_crop(screener, image, body), spacing)
        for _ in range(max(1, repeats)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            screener.score_preprocessed(image, body, spacing)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    best = min(times)
    out = {"voxels": int(image.size), "seconds": best, "voxels_per_s": image.size / best, "repeats": len(times),
           "peak_rss_mb": mem.peak / 2**20, "rss_increase_mb": (mem.peak - mem.base) / 2**20}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def _labelled(cases: Sequence) -> list:
    return [c for c in cases if c.label is not None and np.any(c.label)]


def student_vs_teacher(run_dir: str | Path, cases: Sequence, device: str = "auto", *, teacher: str | None = None,
                       overlap: float = 0.5, sw_batch: int = 2, repeats: int = 2, speed_case: str | None = None,
                       isolate: bool = False, return_maps: bool = False) -> dict:
    """Student and teacher side by side, in one run.

    Args:
        cases: evaluation cases (those with a non-empty label enter the AUROC).
        teacher: ``<condition>-<density>``; default the one the student was distilled from.
        speed_case: id of the volume timed (default the largest of ``cases``).
        isolate: measure speed and memory in a fresh subprocess per model
            (peak RSS = ``ru_maxrss``; slower, independent of what this process
            allocated before); otherwise in this process (RSS sampled in a thread).
        return_maps: also return ``"maps": {id: {"teacher", "student"}}`` (not JSON).

    Returns:
        ``{"teacher", "cases", "auroc": {"teacher", "student", "difference"},
        "auroc_per_case": {id: {...}}, "speed": {"case", "shape", "teacher", "student",
        "speedup", "memory_ratio"}, "device"}`` (difference = student - teacher).
    """
    from .inference import Screener
    from .metrics import voxel_auroc

    run_dir = Path(run_dir)
    spec = _student_spec(run_dir)
    teacher = teacher or spec.get("teacher", "learned-flow")
    condition, density = _split_teacher(teacher)
    labelled = _labelled(cases)
    if not labelled:
        raise InputError("evaluation cases", "at least one case with a non-empty lesion label",
                         f"{len(cases)} cases, none labelled")
    student = Screener.from_run(run_dir, student=True, device=device, overlap=overlap, sw_batch=sw_batch)
    teacher_screener = Screener.from_run(run_dir, density, condition, device=device, overlap=overlap,
                                         sw_batch=sw_batch)
    def teacher_fn(case) -> np.ndarray:
        return teacher_screener.score_preprocessed(case.image, case.body, case.spacing, source=f"case {case.id}")

    key_overlap = spec.get("teacher_key", {}).get("overlap", overlap)
    if key_overlap == overlap and spec.get("teacher") == teacher:  # the distillation cache holds these maps
        tmaps = teacher_maps(run_dir, labelled, teacher=teacher, overlap=overlap, teacher_fn=teacher_fn,
                             teacher_key=_teacher_key(run_dir, teacher, overlap))
    else:
        tmaps = {c.id: teacher_fn(c) for c in labelled}
    smaps = {c.id: student.score_preprocessed(c.image, c.body, c.spacing, source=f"case {c.id}") for c in labelled}
    labels = [np.asarray(c.label) > 0 for c in labelled]
    bodies = [np.asarray(c.body, dtype=bool) for c in labelled]
    auroc = {name: float(voxel_auroc([m[c.id] for c in labelled], labels, roi=bodies))
             for name, m in (("teacher", tmaps), ("student", smaps))}
    auroc["difference"] = auroc["student"] - auroc["teacher"]
    per_case = {c.id: {name: float(voxel_auroc(m[c.id], lab, roi=b)) for name, m in (("teacher", tmaps), ("student", smaps))}
                for c, lab, b in zip(labelled, labels, bodies)}

    pool = list(cases)
    timed = next((c for c in pool if c.id == speed_case), None) if speed_case else max(pool, key=lambda c: np.prod(c.shape))
    if timed is None:
        raise InputError("speed_case", f"a case id among {[c.id for c in pool]}", repr(speed_case))
    if isolate:
        speed = {name: _measure_subprocess(run_dir, name, timed.id, device, teacher, overlap, sw_batch, repeats)
                 for name in ("student", "teacher")}
    else:
        # The student first: memory it frees may be reused by the teacher, which can only lower
        # the teacher's measured increase, never inflate the ratio in the student's favour.
        speed = {"student": measure_inference(student, timed.image, timed.body, timed.spacing, repeats=repeats),
                 "teacher": measure_inference(teacher_screener, timed.image, timed.body, timed.spacing,
                                              repeats=repeats)}
    speed.update({"case": timed.id, "shape": list(timed.shape),
                  "speedup": speed["student"]["voxels_per_s"] / speed["teacher"]["voxels_per_s"],
                  "memory_ratio": _ratio(speed["teacher"], speed["student"])})
    out = {"teacher": teacher, "cases": [c.id for c in labelled], "auroc": auroc, "auroc_per_case": per_case,
           "speed": speed, "device": str(resolve_device(device)), "isolated": isolate}
    if return_maps:
        out["maps"] = {c.id: {"teacher": np.asarray(tmaps[c.id]), "student": smaps[c.id]} for c in labelled}
    return out


def _ratio(teacher: dict, student: dict) -> float | None:
    """Teacher / student memory: GPU peak on CUDA, else the RSS increase of inference."""
    key = "cuda_peak_mb" if "cuda_peak_mb" in teacher else "rss_increase_mb"
    return teacher[key] / student[key] if student.get(key, 0) > 0 else None


def _measure_subprocess(run_dir: Path, which: str, case_id: str, device: str, teacher: str, overlap: float,
                        sw_batch: int, repeats: int) -> dict:
    args = json.dumps({"run_dir": str(run_dir), "which": which, "case": case_id, "device": device,
                       "teacher": teacher, "overlap": overlap, "sw_batch": sw_batch, "repeats": repeats})
    code = "import sys; from screener_nb.distill import _measure_child; _measure_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                          env={**os.environ, "SCREENER_HEADLESS": "1"})
    if proc.returncode:
        raise RuntimeError(f"measuring the {which} in a subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_child(arg: str) -> None:
    """Subprocess entry: load one model, time it on one case, print JSON (with ``ru_maxrss``)."""
    import resource

    from .data.cohort import load_case
    from .inference import Screener

    a = json.loads(arg)
    case = load_case(a["case"], run_dir=a["run_dir"])
    if a["which"] == "student":
        screener = Screener.from_run(a["run_dir"], student=True, device=a["device"], overlap=a["overlap"],
                                     sw_batch=a["sw_batch"])
    else:
        condition, density = _split_teacher(a["teacher"])
        screener = Screener.from_run(a["run_dir"], density, condition, device=a["device"], overlap=a["overlap"],
                                     sw_batch=a["sw_batch"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = measure_inference(screener, np.asarray(case.image), np.asarray(case.body), case.spacing, repeats=a["repeats"])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update({"maxrss_mb": maxrss, "maxrss_before_mb": before, "rss_increase_mb": maxrss - before})
    print(json.dumps(out), flush=True)


def bench_student_vs_teacher(run_dir: str | Path, *, case: str | None = None, device: str = "auto",
                             teacher: str | None = None, overlap: float = 0.5, sw_batch: int = 2,
                             repeats: int = 2, print_fn: Callable[[str], None] = print) -> dict:
    """For ``python -m screener_nb bench inference``: student vs teacher speed and memory on one
    preprocessed case of a distilled run, each measured in a fresh subprocess; prints a table."""
    from .data.cohort import load_cohort

    run_dir = Path(run_dir)
    spec = _student_spec(run_dir)
    teacher = teacher or spec.get("teacher", "learned-flow")
    cases = load_cohort(run_dir)
    if case is None:
        case = max(cases, key=lambda c: np.prod(c.shape)).id
    shape = next((c.shape for c in cases if c.id == case), None)
    if shape is None:
        raise InputError(run_dir / "data", f"a case id among {[c.id for c in cases]}", repr(case))
    rows = {name: _measure_subprocess(run_dir, name, case, device, teacher, overlap, sw_batch, repeats)
            for name in ("student", "teacher")}
    speedup = rows["student"]["voxels_per_s"] / rows["teacher"]["voxels_per_s"]
    print_fn(f"student vs teacher ({teacher}) on {case} {shape}, device {resolve_device(device)}, "
             f"overlap {overlap}, best of {repeats} after a warm-up, each in a fresh process")
    print_fn(f"{'model':<10} {'s/volume':>9} {'Mvoxel/s':>9} {'peak RSS':>10} {'RSS +infer':>11}"
             + (f" {'GPU peak':>9}" if "cuda_peak_mb" in rows["student"] else ""))
    for name, r in rows.items():
        gpu = f" {r['cuda_peak_mb']:>7.0f}MB" if "cuda_peak_mb" in r else ""
        print_fn(f"{name:<10} {r['seconds']:>9.2f} {r['voxels_per_s'] / 1e6:>9.3f} {r['maxrss_mb']:>8.0f}MB "
                 f"{r['rss_increase_mb']:>9.0f}MB{gpu}")
    mem = _ratio(rows["teacher"], rows["student"])
    print_fn(f"speed-up student/teacher: {speedup:.1f}x" + (f"; memory teacher/student: {mem:.1f}x" if mem else ""))
    return {"case": case, "shape": list(shape), "teacher": teacher, **rows, "speedup": speedup, "memory_ratio": mem}


# ============================================================================ low-shot fine-tuning


def cv_splits(case_ids: Sequence[str], folds: int, k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """Cross-validation splits for low-shot fine-tuning.

    The cases are shuffled (seeded) and cut into ``folds`` disjoint test folds
    covering every case; fold ``f`` trains on ``k`` cases drawn (seeded) from
    the cases outside its test fold.

    Returns:
        ``[{"train": [k ids], "test": [ids]}, ...]`` (one dict per fold; ids in input order).

    Raises:
        ConfigError: duplicate ids, ``folds < 2`` or more folds than cases,
        ``k < 1`` or more than the cases left outside a test fold.
    """
    ids = [str(i) for i in case_ids]
    n = len(ids)
    if len(set(ids)) != n:
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"cv_splits: expected unique case ids, found duplicates {dup[:5]}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"parameter 'folds': expected an integer >= 2, found {folds!r}")
    if folds > n:
        raise ConfigError(f"parameter 'folds': expected at most one fold per labelled case ({n} cases), found {folds}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"parameter 'finetune_k': expected an integer >= 1, found {k!r}")
    rng = np.random.default_rng([seed, 4242])
    order = rng.permutation(n)
    tests = np.array_split(order, folds)
    left = n - max(len(t) for t in tests)
    if k > left:
        raise ConfigError(f"parameter 'finetune_k': expected at most {left} labelled training cases per fold "
                          f"({n} labelled cases in {folds} folds leave {left} outside the largest test fold), found {k}")
    out = []
    for test in tests:
        rest = np.array([i for i in order if i not in set(test.tolist())])
        train = rng.choice(rest, size=k, replace=False)
        out.append({"train": [ids[i] for i in sorted(train.tolist())], "test": [ids[i] for i in sorted(test.tolist())]})
    return out


class SegmentationTask:
    """:class:`screener_nb.train.TrainTask` for supervised fine-tuning with BCE + Dice.

    With probability ``lesion_p`` a crop is centred (jittered by a quarter patch)
    on a random lesion voxel: lesions are tiny, and random crops would hardly
    ever contain one. Otherwise a random body crop. The network's output is a
    logit; the loss is MONAI ``DiceCELoss(sigmoid=True, batch=True)`` (Dice over
    the whole batch, so crops without lesion do not make it undefined).
    """

    def __init__(self, cases: Sequence, patch, lesion_p: float = 0.5):
        from monai.losses import DiceCELoss

        if not 0.0 <= lesion_p <= 1.0:
            raise ConfigError(f"lesion_p: expected a probability in [0, 1], found {lesion_p}")
        self.cases, self.patch, self.lesion_p = list(cases), tuple(int(p) for p in patch), lesion_p
        self.lesions = []
        for c in self.cases:
            if c.label is None:
                raise InputError(f"case {c.id}", "a lesion label for supervised fine-tuning", "none")
            self.lesions.append(np.argwhere(np.asarray(c.label) > 0))
        self.criterion = DiceCELoss(sigmoid=True, batch=True)

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from .density_fit import random_crop

        i = int(rng.integers(len(self.cases)))
        case, lesion = self.cases[i], self.lesions[i]
        if len(lesion) and rng.random() < self.lesion_p:
            start = centred_start(lesion[int(rng.integers(len(lesion)))], case.shape, self.patch, rng)
            crop = take_crop(case.image, start, self.patch)
        else:
            crop, start = random_crop(case.image, case.body, self.patch, rng)
        label = take_crop(np.asarray(case.label) > 0, start, self.patch)
        return {"x": crop[None], "y": label[None]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(batch["x"].float()).float()
        return self.criterion(logits, batch["y"].float()), {}


class _Sigmoid(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x).float())


def predict_probabilities(net: nn.Module, case, patch, device: str | torch.device = "auto", *,
                          overlap: float = 0.5, sw_batch: int = 2) -> np.ndarray:
    """Lesion probability (X, Y, Z) = sigmoid of the fine-tuned network's logit, whole volume."""
    from .inference import Screener

    dev = resolve_device(device)
    model = _Sigmoid(net).to(dev).eval()
    screener = Screener(lambda x, origin: model(x), patch, None, "finetuned", dev, overlap, sw_batch)
    return screener.score_preprocessed(case.image, case.body, case.spacing, source=f"case {case.id}")


def segmentation_dice(net: nn.Module, cases: Sequence, patch, device: str | torch.device = "auto", *,
                      threshold: float = 0.5, overlap: float = 0.5, sw_batch: int = 2) -> dict[str, float]:
    """Dice per case of ``sigmoid(logit) >= threshold`` inside the body against the lesion label."""
    from .metrics import dice

    out = {}
    for c in cases:
        prob = predict_probabilities(net, c, patch, device, overlap=overlap, sw_batch=sw_batch)
        out[c.id] = float(dice(prob, np.asarray(c.label) > 0, threshold, roi=np.asarray(c.body, dtype=bool)))
    return out


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test of paired values (e.g. per-case Dice, distilled vs random).

    ``scipy.stats.wilcoxon(a, b)`` (two-sided; zero differences dropped, the
    'wilcox' convention; exact null distribution for small samples without ties).

    Returns:
        ``{"statistic", "p_value", "n" (pairs), "n_nonzero", "method", "min_p",
        "median_difference", "note"}``: ``min_p`` is the smallest two-sided p-value
        an exact test can reach with ``n_nonzero`` pairs (2 / 2**n); below 6 pairs
        it exceeds 0.05, so no difference can be called significant at 5%.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError("paired_test", "two 1-D sequences of the same length (pairs)", f"shapes {a.shape} and {b.shape}")
    if a.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("paired_test", "at least one pair of finite values", f"{a.size} pairs, some non-finite")
    d = a - b
    n_nonzero = int(np.count_nonzero(d))
    out = {"n": int(a.size), "n_nonzero": n_nonzero, "median_difference": float(np.median(d)),
           "min_p": float(min(1.0, 2.0 / 2 ** n_nonzero)) if n_nonzero else 1.0}
    if n_nonzero == 0:
        out.update(statistic=float("nan"), p_value=1.0, method="none",
                   note="every pair is equal: no evidence of a difference (the test is undefined)")
        return out
    res = stats.wilcoxon(a, b)
    ties = len(np.unique(np.abs(d[d != 0]))) < n_nonzero
    exact = n_nonzero <= 50 and not ties and n_nonzero == a.size
    out.update(statistic=float(res.statistic), p_value=float(res.pvalue), method="exact" if exact else "approx")
    if n_nonzero < 6:
        out["note"] = (f"only {n_nonzero} non-zero pairs: the smallest possible two-sided p-value is "
                       f"{out['min_p']:.3g} > 0.05, so the test cannot detect a difference at 5% (very low power)")
    elif n_nonzero < 20:
        out["note"] = f"{n_nonzero} pairs: little power; treat the p-value as indicative"
    else:
        out["note"] = f"{n_nonzero} pairs"
    return out


def _init_net(init: str, run_dir: Path, size: str | None, seed: int) -> tuple[nn.Module, str]:
    if init == "distilled":
        unet, spec = load_student_unet(run_dir, seed=seed)
        return unet.requires_grad_(True).train(), spec["size"]
    if init == "random":
        if size is None:
            size = _student_spec(run_dir)["size"]
        torch.manual_seed(seed)
        return build_student(size), size
    raise ConfigError(f"init: expected one of {', '.join(INITS)}, found {init!r}")


def finetune_cv(run_dir: str | Path, cases: Sequence, k: int, folds: int, steps: int,
                init: str | Sequence[str] = INITS, seed: int = 0, *, patch=None, size: str | None = None,
                batch: int = 2, lr: float = 1e-3, warmup: int | None = None, lesion_p: float = 0.5,
                threshold: float = 0.5, overlap: float = 0.5, sw_batch: int = 2, device: str = "auto",
                checkpoint_every: int | None = None, log_every: int = 5, amp: bool = True,
                write: bool = True, progress: Callable[[str], None] | None = print) -> dict:
    """Low-shot fine-tuning with k-fold cross-validation, for each initialisation.

    Args:
        cases: labelled cases (one lesion kind); those without lesion voxels are dropped.
        k, folds: see :func:`cv_splits`.
        steps: optimiser steps per fold and init (the same budget for every init).
        init: ``"distilled"`` (the run's student weights) and/or ``"random"``
            (the same architecture from ``torch.manual_seed(seed)``).
        patch, size: crop size and UNet size (default: the student's).
        warmup: linear warm-up steps (default ``steps // 10``); lr, batch, amp as in the shared loop.
        lesion_p: probability of a lesion-centred crop (:class:`SegmentationTask`).
        threshold: on the sigmoid probability for Dice.
        write: save ``distill/finetune.json`` and ``distill/finetune.nc``.

    Every (init, fold) trains through the shared loop in
    ``distill/finetune/k<k>-folds<folds>-steps<steps>-seed<seed>/<init>-fold<f>/``
    (checkpointed; an interrupted run resumes).

    Returns:
        ``{"k", "folds", "steps", "seed", "inits", "splits", "dice": {init: {case: Dice}},
        "fold_dice": {init: [mean Dice per fold]}, "mean_dice": {init: float},
        "test": paired_test(distilled, random) when both inits ran}``.
    """
    run_dir = Path(run_dir)
    inits = [init] if isinstance(init, str) else list(init)
    for name in inits:
        if name not in INITS:
            raise ConfigError(f"init: expected some of {', '.join(INITS)}, found {name!r}")
    labelled = _labelled(cases)
    if len(labelled) < 2:
        raise InputError("fine-tuning cases", "at least 2 cases with lesion labels",
                         f"{len(labelled)} (of {len(cases)} given)")
    if patch is None or size is None:
        spec = _student_spec(run_dir)
        patch = spec["patch"] if patch is None else patch
        size = spec["size"] if size is None else size
    patch = tuple(int(p) for p in patch)
    small = [c.id for c in labelled if any(s < p for s, p in zip(c.shape, patch))]
    if small:
        raise InputError("fine-tuning cases", f"volumes at least as large as the patch {patch}", f"smaller: {small[:5]}")
    splits = cv_splits([c.id for c in labelled], folds, k, seed)
    by_id = {c.id: c for c in labelled}
    root = files.stage_dir(run_dir, STAGE) / "finetune" / f"k{k}-folds{folds}-steps{steps}-seed{seed}"
    warmup = max(1, steps // 10) if warmup is None else warmup
    settings = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed, device=device, amp=amp,
                    checkpoint_every=checkpoint_every or steps, log_every=log_every)
    dice: dict[str, dict[str, float]] = {name: {} for name in inits}
    fold_of: dict[str, int] = {}
    for f, split in enumerate(splits):
        for cid in split["test"]:
            fold_of[cid] = f
        for name in inits:
            folder = root / f"{name}-fold{f}"
            run_spec = {"init": name, "train": split["train"], "test": split["test"], "patch": list(patch),
                        "size": size, "lesion_p": lesion_p, **{k_: v for k_, v in settings.items() if k_ != "device"}}
            if (folder / "spec.json").exists() and files.read_json(folder / "spec.json") != json.loads(json.dumps(run_spec)):
                raise InputError(folder / "spec.json", "the fine-tuning configuration being run",
                                 "another one (other cases or settings); delete that folder or use another seed")
            files.write_json(folder / "spec.json", run_spec)
            net, _ = _init_net(name, run_dir, size, seed)
            check_patch(net, patch)
            task = SegmentationTask([by_id[i] for i in split["train"]], patch, lesion_p)
            result = fit(net, task, TrainSettings(**settings), folder, desc=f"finetune {name} fold {f}")
            scores = segmentation_dice(result.model, [by_id[i] for i in split["test"]], patch, device,
                                       threshold=threshold, overlap=overlap, sw_batch=sw_batch)
            dice[name].update(scores)
            if progress:
                progress(f"[finetune] {name:<9} fold {f}: Dice " + ", ".join(f"{c} {v:.3f}" for c, v in scores.items()))
    order = [c.id for c in labelled]
    fold_dice = {name: [float(np.mean([dice[name][c] for c in s["test"]])) for s in splits] for name in inits}
    out = {"k": k, "folds": folds, "steps": steps, "seed": seed, "inits": inits, "patch": list(patch), "size": size,
           "threshold": threshold, "lesion_p": lesion_p, "lr": lr, "batch": batch, "splits": splits,
           "dice": {name: {c: dice[name][c] for c in order} for name in inits}, "fold_dice": fold_dice,
           "mean_dice": {name: float(np.mean(list(dice[name].values()))) for name in inits},
           "fold_of_case": {c: fold_of[c] for c in order}}
    if set(INITS) <= set(inits):
        out["test"] = paired_test([dice["distilled"][c] for c in order], [dice["random"][c] for c in order])
    if write:
        files.write_json(run_dir / STAGE / "finetune.json", out)
        _write_finetune_nc(run_dir / STAGE / "finetune.nc", out)
    return out


def _write_finetune_nc(path: Path, res: dict) -> Path:
    """Per-case Dice as an ``xarray.Dataset`` (dims init x case, coordinate fold), written atomically."""
    import xarray as xr

    cases = list(res["fold_of_case"])
    data = np.array([[res["dice"][i][c] for c in cases] for i in res["inits"]], dtype=np.float64)
    ds = xr.Dataset({"dice": (("init", "case"), data)},
                    coords={"init": res["inits"], "case": cases, "fold": ("case", [res["fold_of_case"][c] for c in cases])},
                    attrs={k: v for k, v in res.items() if isinstance(v, (int, float, str))})
    with files.atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def finetune_cases(run_dir: str | Path, lesion_kind: str | None = None) -> list:
    """Labelled cases of a run for fine-tuning (val + test roles; those with lesion voxels),
    optionally only those whose ``lesion_kinds`` include ``lesion_kind``."""
    from .data.cohort import load_cohort

    cases = [c for c in load_cohort(run_dir) if c.role in ("val", "test")]
    if lesion_kind:
        cases = [c for c in cases if lesion_kind in c.lesion_kinds]
    return _labelled(cases)


def summary_table(comparison: dict):
    """A small pandas table of :func:`student_vs_teacher`'s AUROC and speed."""
    import pandas as pd

    sp = comparison["speed"]
    rows = {}
    for name in ("teacher", "student"):
        r = sp[name]
        rows[name] = {"voxel AUROC": comparison["auroc"][name], "s / volume": r["seconds"],
                      "Mvoxels / s": r["voxels_per_s"] / 1e6,
                      "memory (MB)": r.get("cuda_peak_mb", r["rss_increase_mb"])}
    return pd.DataFrame(rows).T
