"""Student vs teacher (notebook 05, ``bench inference``): ranking quality, speed and memory.

**Comparison.** :func:`student_vs_teacher` measures, in one process, the
pooled voxel AUROC of both on labelled cases and their inference speed
(voxels per second of ``score_preprocessed`` on the same volume, best of
``repeats`` after a warm-up on a few windows) and peak memory; :func:`bench_student_vs_teacher`
does the same in fresh subprocesses (peak RSS from ``VmHWM``, :func:`screener_nb.runtime.own_peak_rss_mb`).
"""
from __future__ import annotations

import contextlib

import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .distill import labelled_cases, student_spec, teacher_cache_key, teacher_maps
from .errors import InputError
from .methods import Method
from .runtime import own_peak_rss_mb, resolve_device


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
    with uncached(screener):
        return _measure(screener, image, body, spacing, dev, repeats, warmup)


@contextlib.contextmanager
def uncached(screener):
    """``screener`` without the run's memoised context maps (:attr:`ContextNet.map_cache`) while
    the block runs: a timing must pay for the masked inference, not read its result from disk."""
    net = getattr(getattr(screener, "extractor", None), "condition_encoder", None)
    saved = getattr(net, "map_cache", None)
    if saved is not None:
        net.map_cache = None
    try:
        yield screener
    finally:
        if saved is not None:
            net.map_cache = saved


def _measure(screener, image, body, spacing, dev, repeats, warmup) -> dict:
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


@dataclass
class StudentComparison:
    """:func:`student_vs_teacher`'s figures: ranking quality and speed of student and teacher, side by side.

    Attributes:
        teacher: the teacher method; cases: the labelled cases in the AUROC; device; isolated
            (speed measured in fresh subprocesses).
        auroc: ``{"teacher", "student", "difference"}`` pooled voxel AUROC (difference = student - teacher).
        auroc_per_case: ``{case id: {"teacher", "student"}}``.
        speed: ``{"case", "shape", "teacher", "student", "speedup", "memory_ratio"}``; the two
            models' rows hold ``seconds``, ``voxels_per_s`` and the memory figures.
        maps: ``{case id: {"teacher", "student"}}`` (X, Y, Z) maps when asked for (not in :meth:`to_dict`).
    """

    teacher: str
    cases: list
    auroc: dict
    auroc_per_case: dict
    speed: dict
    device: str
    isolated: bool
    maps: dict | None = field(default=None, repr=False)

    def table(self):
        """Teacher and student: voxel AUROC, seconds per volume, Mvoxels / s, memory (a pandas table)."""
        return summary_table(self)

    def figure(self):
        """Per-case AUROC of teacher and student (plotly bars)."""
        import plotly.graph_objects as go

        ids = list(self.auroc_per_case)
        fig = go.Figure([go.Bar(name=name, x=ids, y=[self.auroc_per_case[c][name] for c in ids])
                         for name in ("teacher", "student")])
        fig.update_layout(barmode="group", yaxis=dict(title="voxel AUROC", range=[0, 1]), height=320,
                          title=f"student vs teacher ({self.teacher}) per evaluation case")
        return fig

    def to_dict(self) -> dict:
        """JSON-ready figures (``distill/comparison.json``), without the maps."""
        return {"teacher": self.teacher, "cases": self.cases, "auroc": self.auroc, "auroc_per_case": self.auroc_per_case,
                "speed": self.speed, "device": self.device, "isolated": self.isolated}

    def __getitem__(self, key: str):
        """``comparison["auroc"]``: the dict-style reading of earlier versions."""
        return getattr(self, key)


def student_vs_teacher(run_dir: str | Path, cases: Sequence, device: str = "auto", *, teacher: str | None = None,
                       overlap: float = 0.5, sw_batch: int = 2, repeats: int = 2, speed_case: str | None = None,
                       isolate: bool = False, return_maps: bool = False) -> StudentComparison:
    """Student and teacher side by side, in one run.

    Args:
        cases: evaluation cases (those with a non-empty label enter the AUROC).
        teacher: ``<condition>-<density>``; default the one the student was distilled from.
        speed_case: id of the volume timed (default the largest of ``cases``).
        isolate: measure speed and memory in a fresh subprocess per model
            (peak RSS = the child's ``VmHWM``; slower, independent of what this process
            allocated before); otherwise in this process (RSS sampled in a thread).
        return_maps: also keep the maps (:attr:`StudentComparison.maps`).

    Returns:
        a :class:`StudentComparison`.
    """
    from .inference import Screener
    from .metrics import voxel_auroc

    run_dir = Path(run_dir)
    spec = student_spec(run_dir)
    teacher = teacher or spec.get("teacher", "learned-flow")
    labelled = labelled_cases(cases)
    if not labelled:
        raise InputError("evaluation cases", "at least one case with a non-empty lesion label",
                         f"{len(cases)} cases, none labelled")
    student = Screener.from_run(run_dir, student=True, device=device, overlap=overlap, sw_batch=sw_batch)
    teacher_screener = Screener.from_run(run_dir, Method.parse(teacher, "teacher"), device=device, overlap=overlap,
                                         sw_batch=sw_batch)
    def teacher_fn(case) -> np.ndarray:
        return teacher_screener.score_preprocessed(case.image, case.body, case.spacing, source=f"case {case.id}")

    key_overlap = spec.get("teacher_key", {}).get("overlap", overlap)
    if key_overlap == overlap and spec.get("teacher") == teacher:  # the distillation cache holds these maps
        tmaps = teacher_maps(run_dir, labelled, teacher=teacher, overlap=overlap, teacher_fn=teacher_fn,
                             teacher_key=teacher_cache_key(run_dir, teacher, overlap))
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
    maps = ({c.id: {"teacher": np.asarray(tmaps[c.id]), "student": smaps[c.id]} for c in labelled}
            if return_maps else None)
    return StudentComparison(teacher, [c.id for c in labelled], auroc, per_case, speed, str(resolve_device(device)),
                             isolate, maps)


def _ratio(teacher: dict, student: dict) -> float | None:
    """Teacher / student memory: GPU peak on CUDA, else the RSS increase of inference."""
    key = "cuda_peak_mb" if "cuda_peak_mb" in teacher else "rss_increase_mb"
    return teacher[key] / student[key] if student.get(key, 0) > 0 else None


def _measure_subprocess(run_dir: Path, which: str, case_id: str, device: str, teacher: str, overlap: float,
                        sw_batch: int, repeats: int) -> dict:
    args = json.dumps({"run_dir": str(run_dir), "which": which, "case": case_id, "device": device,
                       "teacher": teacher, "overlap": overlap, "sw_batch": sw_batch, "repeats": repeats})
    code = "import sys; from screener_nb.student_eval import _measure_child; _measure_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                          env={**os.environ, "SCREENER_HEADLESS": "1"})
    if proc.returncode:
        raise RuntimeError(f"measuring the {which} in a subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_child(arg: str) -> None:
    """Subprocess entry: load one model, time it on one case, print JSON (with its own peak RSS)."""
    from .data.cohort import load_case
    from .inference import Screener

    a = json.loads(arg)
    case = load_case(a["case"], run_dir=a["run_dir"])
    if a["which"] in ("student", "student-onnx"):
        screener = Screener.from_run(a["run_dir"], student=True, device=a["device"], overlap=a["overlap"],
                                     sw_batch=a["sw_batch"], backend="onnx" if a["which"] == "student-onnx" else "torch")
    else:
        screener = Screener.from_run(a["run_dir"], Method.parse(a["teacher"], "teacher"), device=a["device"],
                                     overlap=a["overlap"],
                                     sw_batch=a["sw_batch"])
    before = own_peak_rss_mb()  # not ru_maxrss: it would include the parent's peak (see own_peak_rss_mb)
    out = measure_inference(screener, np.asarray(case.image), np.asarray(case.body), case.spacing, repeats=a["repeats"])
    maxrss = own_peak_rss_mb()
    out.update({"maxrss_mb": maxrss, "maxrss_before_mb": before, "rss_increase_mb": maxrss - before})
    print(json.dumps(out), flush=True)


def bench_student_vs_teacher(run_dir: str | Path, *, case: str | None = None, device: str = "auto",
                             teacher: str | None = None, overlap: float = 0.5, sw_batch: int = 2,
                             repeats: int = 2, print_fn: Callable[[str], None] = print) -> dict:
    """For ``python -m screener_nb bench inference``: student vs teacher speed and memory on one
    preprocessed case of a distilled run, each measured in a fresh subprocess; prints a table."""
    from .data.cohort import load_cohort

    run_dir = Path(run_dir)
    spec = student_spec(run_dir)
    teacher = teacher or spec.get("teacher", "learned-flow")
    cases = load_cohort(run_dir)
    if case is None:
        case = max(cases, key=lambda c: np.prod(c.shape)).id
    shape = next((c.shape for c in cases if c.id == case), None)
    if shape is None:
        raise InputError(run_dir / "data", f"a case id among {[c.id for c in cases]}", repr(case))
    names = ["student", "teacher"]
    try:  # the student exported to ONNX, run by onnxruntime on the CPU (optional [deploy] extra)
        import onnxruntime  # noqa: F401

        from .deploy import ONNX_FILE, export_student_onnx

        exported, weights = run_dir / "distill" / ONNX_FILE, run_dir / "distill" / "checkpoint.pt"
        if not exported.is_file() or exported.stat().st_mtime_ns < weights.stat().st_mtime_ns:
            export_student_onnx(run_dir)  # once per trained student, not at every benchmark
        names.insert(1, "student-onnx")
    except ImportError:
        print_fn("onnxruntime not installed: the ONNX student is not measured (pip install 'screener_nb[deploy]')")
    rows = {name: _measure_subprocess(run_dir, name, case, device, teacher, overlap, sw_batch, repeats)
            for name in names}
    speedup = rows["student"]["voxels_per_s"] / rows["teacher"]["voxels_per_s"]
    print_fn(f"student vs teacher ({teacher}) on {case} {shape}, device {resolve_device(device)}, "
             f"overlap {overlap}, best of {repeats} after a warm-up, each in a fresh process")
    print_fn(f"{'model':<13} {'s/volume':>9} {'Mvoxel/s':>9} {'peak RSS':>10} {'RSS +infer':>11}"
             + (f" {'GPU peak':>9}" if "cuda_peak_mb" in rows["student"] else ""))
    for name, r in rows.items():
        gpu = f" {r['cuda_peak_mb']:>7.0f}MB" if "cuda_peak_mb" in r else ""
        print_fn(f"{name:<13} {r['seconds']:>9.2f} {r['voxels_per_s'] / 1e6:>9.3f} {r['maxrss_mb']:>8.0f}MB "
                 f"{r['rss_increase_mb']:>9.0f}MB{gpu}")
    mem = _ratio(rows["teacher"], rows["student"])
    print_fn(f"speed-up student/teacher: {speedup:.1f}x" + (f"; memory teacher/student: {mem:.1f}x" if mem else ""))
    out = {"case": case, "shape": list(shape), "teacher": teacher, **rows, "speedup": speedup, "memory_ratio": mem}
    if "student-onnx" in rows:
        out["onnx_speedup"] = rows["student-onnx"]["voxels_per_s"] / rows["student"]["voxels_per_s"]
        print_fn(f"speed-up ONNX (onnxruntime) / eager torch student: {out['onnx_speedup']:.2f}x")
    return out


def summary_table(comparison: "StudentComparison | dict"):
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
