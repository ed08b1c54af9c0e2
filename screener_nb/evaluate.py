"""The evaluation stage (notebook 06): every method of a run scored on its cases, results saved.

:func:`run_evaluation` builds every method's maps from a run directory (``Screener.from_run``,
the baselines of :mod:`screener_nb.baselines`, the distilled student), streams them through an
:class:`~screener_nb.evaluation.Evaluation` (one case's maps in memory at a time; the pooled
accumulators keep their sorted normal scores on disk), writes each test map as NIfTI on the
ORIGINAL scan grid and as a compact float16 copy on the preprocessed grid (for the viewer), then
saves ``eval/metrics.nc`` (schema: :mod:`screener_nb.results`), the figures
(:mod:`screener_nb.viz.eval_figures`) and ``eval/report.html`` (:mod:`screener_nb.report`). All
density methods of a run are scored in one pass (:class:`~screener_nb.scoring.JointDensityScorer`).

The names of those modules are re-exported here, so ``from screener_nb.evaluate import
Evaluation, METRICS, ...`` keeps working.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import files
from .baselines import ZScoreBaseline, zscore_baseline
from .errors import ConfigError, InputError
from .rundir import RunDir
from .evaluation import (CALIBRATION_RATE, FROC_MIN_REGION_ML, FROC_THRESHOLDS, THRESHOLD_RULES, Evaluation,
                         evaluate_maps, lesion_coords)
from .scoring import JointDensityScorer, joint_key
from .progress import report
from .report import write_report
from .results import (BEST_DICE_NOTE, CASE_COORDS, CURVE_POINTS, METRICS, OPERATING_METRICS, OPERATING_POINTS,
                      READABLE_FORMATS, RESULTS_FORMAT, best_method, froc_frame, metric_labels, operating_frame,
                      per_case_frame, pooled_frame)
from .viz.eval_figures import (contrast_coordinate, curve_figures, evaluation_figures, froc_figures,
                               gallery_figure, lesion_slices, pooled_curve, scatter_figure)

#: reference methods that are not a (condition, density) pair: the raw-intensity z-score and the
#: random-init descriptor's Gaussian (:mod:`screener_nb.baselines`)
BASELINES = ("zscore", "init-gaussian")


# --------------------------------------------------------------------------- methods of a run
def available_methods(run_dir: str | Path) -> list[str]:
    """Every method a run can evaluate: fitted densities, ``zscore``, ``init-gaussian`` (when the
    descriptor stage is done), ``student`` (when distilled).

    Densities are the folders ``density/<condition>-<density>/model.json``
    (in the order of :meth:`~screener_nb.methods.Method.all`).
    """
    from .methods import Method

    run_dir = Path(run_dir)
    out = [str(m) for m in Method.all() if (run_dir / "density" / str(m) / "model.json").is_file()]
    run = RunDir(run_dir)
    out += [b for b in BASELINES if b == "zscore" or run.done("descriptor")]
    if run.done("distill"):
        out.append("student")
    return out


def resolve_methods(run_dir: str | Path, methods: str | Sequence[str] = "all") -> list[str]:
    """``"all"`` -> :func:`available_methods`; a comma list -> checked against them (ConfigError)."""
    known = available_methods(run_dir)
    if isinstance(methods, str):
        if methods.strip() == "all":
            return known
        names = [m.strip() for m in methods.split(",") if m.strip()]
    else:
        names = list(methods)
    if not names:
        raise ConfigError(f"parameter 'methods': expected 'all' or a comma list of {', '.join(known)}, found {methods!r}")
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ConfigError(f"parameter 'methods': unknown method(s) {', '.join(unknown)} for run {run_dir}; "
                          f"known: {', '.join(known)} (or 'all')")
    return list(dict.fromkeys(names))


def make_scorer(run_dir: str | Path, method: str, *, device: str = "auto", overlap: float = 0.5,
                sw_batch: int = 2) -> Any:
    """An object with ``.method`` and ``.score_preprocessed(image, body, spacing)`` for one method."""
    from .data.cohort import load_cohort

    if method == "zscore":
        return zscore_baseline(load_cohort(run_dir, role="train"))
    if method == "init-gaussian":
        from .baselines import init_descriptor_gaussian

        return init_descriptor_gaussian(run_dir, device=device, overlap=overlap, sw_batch=sw_batch)
    from .inference import Screener

    if method == "student":
        return Screener.from_run(run_dir, student=True, device=device, overlap=overlap, sw_batch=sw_batch)
    from .methods import Method

    if method.count("-") != 1:
        raise ConfigError(f"method {method!r}: expected <condition>-<density>, {', '.join(BASELINES)} or student")
    m = Method.parse(method)
    return Screener.from_run(run_dir, m, device=device, overlap=overlap, sw_batch=sw_batch)


# --------------------------------------------------------------------------- the stage
def _map_paths(eval_dir: Path, method: str, case_id: str) -> dict[str, Path]:
    return {"cache": eval_dir / "cache" / method / f"{case_id}.npy",
            "nifti": eval_dir / "maps" / method / f"{case_id}.nii.gz",
            "pre": eval_dir / "maps_pre" / method / f"{case_id}.npy"}


def _source_stamp(run_dir: Path, method: str, overlap: float) -> dict:
    """What a cached map depends on: the producing stage's completion time and the window overlap."""
    stage = {"zscore": "data", "init-gaussian": "descriptor", "student": "distill"}.get(method, "density")
    done = RunDir(run_dir).stage_dir(stage, create=False) / files.DONE
    return {"model": method, "overlap": float(overlap),
            "stage_done_mtime_ns": done.stat().st_mtime_ns if done.exists() else None}


class MapSource:
    """Maps of a run's cases for several methods: from the resume cache when valid, else computed.

    Density methods are computed together (:class:`JointDensityScorer`), the baselines and
    ``student`` on their own; models are built on first need, so a fully cached
    stage loads none. Every computed map is first saved (float32, atomically) to
    ``eval/cache/<method>/<case>.npy``; ``get`` returns memory-mapped cache arrays.
    """

    def __init__(self, run_dir: Path, methods: Sequence[str], *, device: str = "auto", overlap: float = 0.5,
                 sw_batch: int = 2, progress: Callable[[str], None] | None = None):
        self.run_dir, self.eval_dir = Path(run_dir), RunDir(run_dir).stage_dir("evaluate", create=False)
        self.methods, self.progress = list(methods), progress
        self.cases_done, self.cases_expected = 0, 0  # for "case i/n" in the progress lines
        self.device, self.overlap, self.sw_batch = device, overlap, sw_batch
        self._scorers: dict[str, Any] = {}  # method -> scorer (a JointDensityScorer is shared by its methods)
        self.computed = self.reused = 0
        self.seconds = 0.0
        for m in self.methods:
            cache_dir = self.eval_dir / "cache" / m
            stamp = _source_stamp(self.run_dir, m, overlap)
            stamp_file = cache_dir / "stamp.json"
            if stamp_file.exists() and files.read_json(stamp_file) != stamp:
                shutil.rmtree(cache_dir)  # produced by another model or overlap: recompute
            if not stamp_file.exists():
                files.write_json(stamp_file, stamp)

    def _build(self, missing: Sequence[str]) -> None:
        todo = [m for m in missing if m not in self._scorers]
        solo = (*BASELINES, "student")  # each with its own model: not in the joint pass
        dens = [m for m in todo if m not in solo]
        for m in [m for m in todo if m in solo]:
            self._scorers[m] = make_scorer(self.run_dir, m, device=self.device, overlap=self.overlap,
                                           sw_batch=self.sw_batch)
            if isinstance(self._scorers[m], ZScoreBaseline):
                files.write_json(self.eval_dir / "zscore.json", {"mean": self._scorers[m].mean,
                                                                 "std": self._scorers[m].std})
        if dens:
            screeners = {m: make_scorer(self.run_dir, m, device=self.device, overlap=self.overlap,
                                        sw_batch=self.sw_batch) for m in dens}
            groups: dict[tuple, dict] = {}
            for m, s in screeners.items():
                groups.setdefault(joint_key(s), {})[m] = s
            for group in groups.values():
                joint = JointDensityScorer(group)
                for m in group:
                    self._scorers[m] = joint
            del screeners, groups

    def get(self, case: Any, *, write_maps: bool) -> dict[str, np.ndarray]:
        """method -> map (X, Y, Z) float32 of ``case``; with ``write_maps`` also its NIfTI and float16 copies."""
        paths = {m: _map_paths(self.eval_dir, m, str(case.id)) for m in self.methods}
        for m, p in paths.items():
            if p["cache"].is_file() and not self._cache_ok(p["cache"], case):
                p["cache"].unlink()
        missing = [m for m in self.methods if not paths[m]["cache"].is_file()]
        if missing:
            self._build(missing)
            t0 = time.perf_counter()
            done: set[str] = set()
            for m in missing:
                if m in done:
                    continue
                scorer = self._scorers[m]
                if isinstance(scorer, JointDensityScorer):
                    group = [n for n in missing if self._scorers[n] is scorer]
                    fresh = scorer.score_all(case.image, case.body, case.spacing, group, source=f"case {case.id}")
                else:
                    fresh = {m: np.asarray(scorer.score_preprocessed(case.image, case.body, case.spacing),
                                           dtype=np.float32)}
                for n, arr in fresh.items():
                    files.save_npy(paths[n]["cache"], arr)
                    done.add(n)
            dt = time.perf_counter() - t0
            self.seconds += dt
            if self.progress:
                self.cases_done += 1
                count = f" ({self.cases_done}/{self.cases_expected})" if self.cases_expected else ""
                self.progress(f"[eval] {case.id}{count}: {len(missing)} map(s) computed in {dt:.1f} s"
                              + (f", {len(self.methods) - len(missing)} reused" if len(missing) < len(self.methods) else ""))
        self.computed += len(missing)
        self.reused += len(self.methods) - len(missing)
        maps = {m: np.load(paths[m]["cache"], mmap_mode="r") for m in self.methods}
        if write_maps:
            from .data.io import write_nifti
            from .data.preprocess import to_original_volume

            for m, p in paths.items():
                if m in missing or not p["nifti"].is_file():
                    write_nifti(to_original_volume(np.asarray(maps[m]), case.record, mode="linear"), p["nifti"])
                if m in missing or not p["pre"].is_file():
                    files.save_npy(p["pre"], np.asarray(maps[m]).astype(np.float16))
        return maps

    @staticmethod
    def _cache_ok(path: Path, case: Any) -> bool:
        try:
            m = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            return False
        return m.shape == tuple(np.shape(case.body)) and m.dtype == np.float32

    def close(self) -> None:
        self._scorers.clear()


def _read_lesions(run_dir: Path) -> dict:
    path = run_dir / "data" / "lesions.json"
    if not path.is_file():
        return {}
    data = files.read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, "a mapping case id -> list of lesions", type(data).__name__)
    return data


def run_evaluation(cfg: Any, *, progress: Callable[[str], None] | None = report, threshold_rule: str = "dice",
                   keep_cache: bool = False, report: bool = True):
    """The evaluate stage: every method's maps of the run's val and test cases, metrics, maps, report.

    Reads ``cfg.run_dir``, ``cfg.methods`` ("all" or a comma list), ``cfg.device``,
    ``cfg.overlap``, ``cfg.sw_batch``, ``cfg.max_fpr`` (``config.resolve("evaluate")``).

    Order: the validation cases first (their maps choose each method's Dice
    threshold), then one test case at a time: every method's map, the per-case
    metrics and pooled accumulators updated, the maps written, the maps dropped.

    Writes under ``<run>/eval/``: ``maps/<method>/<case>.nii.gz`` (test maps on the
    original scan grid), ``maps_pre/<method>/<case>.npy`` (float16, preprocessed grid,
    for the viewer), ``metrics.nc``, ``report.html``. Resumable: every map is first
    written (float32, atomically) to ``cache/<method>/<case>.npy``; a re-run after an
    interruption reuses them instead of recomputing (the cache is invalidated when the
    producing stage or the overlap changed, and removed at the end unless ``keep_cache``).
    Scratch space while it runs: about 8 bytes per body voxel, method and case (the
    cache plus the pooled accumulators' spilled normal scores).
    The stage's ``DONE`` marker is left to the caller (the notebook writes it last).
    """
    from .data.cohort import load_cohort

    run_dir = Path(cfg.run_dir)
    files.require_stage(run_dir, "data")
    files.require_stage(run_dir, "density")
    methods = resolve_methods(run_dir, cfg.methods)
    test, val = load_cohort(run_dir, role="test"), load_cohort(run_dir, role="val")
    calib = load_cohort(run_dir, role="calib")
    if not test:
        raise InputError(run_dir / "data" / "index.json", "at least one test case", "none")
    lesions = _read_lesions(run_dir)
    eval_dir = RunDir(run_dir).stage_dir("evaluate")
    for stale in eval_dir.glob("metrics-*"):  # spilled scores of a killed earlier attempt
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    t_start = time.perf_counter()
    ev = Evaluation(methods, test, lesions, max_fpr=cfg.max_fpr, threshold_rule=threshold_rule, spill_dir=eval_dir,
                    froc_min_region_ml=getattr(cfg, "froc_min_region_ml", FROC_MIN_REGION_ML),
                    calibration_rate=getattr(cfg, "calibration_rate", CALIBRATION_RATE))
    source = MapSource(run_dir, methods, device=cfg.device, overlap=cfg.overlap, sw_batch=cfg.sw_batch,
                       progress=progress)
    source.cases_expected = len(val) + len(calib) + len(test)
    val_maps = [source.get(c, write_maps=False) for c in val]  # memory-mapped cache files
    for m in methods:
        thr = ev.set_threshold(m, [vm[m] for vm in val_maps], val)
        if progress:
            progress(f"[eval] {m}: Dice threshold {thr:.4g} chosen on {len(val)} validation case(s)"
                     + (f" ({ev.threshold_notes[m]})" if not math.isfinite(thr) else ""))
    del val_maps
    calib_maps = [source.get(c, write_maps=False) for c in calib]
    for m in methods:
        thr = ev.set_calibration(m, [cm[m] for cm in calib_maps], calib)
        if progress and calib:
            progress(f"[eval] {m}: label-free threshold {thr:.4g} flags {ev.calibration_rate:g} of the body voxels of "
                     f"{len(calib)} held-out healthy scan(s)")
    del calib_maps
    for c in test:
        maps = source.get(c, write_maps=True)
        for m in methods:
            ev.add(m, c, maps[m])
        del maps
    source.close()
    if progress:
        progress(f"[eval] {source.computed} map(s) computed in {source.seconds:.1f} s, {source.reused} reused")
    ds = ev.finish({"run": str(run_dir), "profile": getattr(cfg, "profile", ""), "overlap": float(cfg.overlap),
                    "main_method": str(getattr(cfg, "main_method", "learned-flow")),
                    "seconds": round(time.perf_counter() - t_start, 2), "map_seconds": round(source.seconds, 2),
                    "maps_computed": int(source.computed), "maps_reused": int(source.reused)})
    from .results import save_results

    save_results(ds, eval_dir / "metrics.nc")
    if report:
        write_report(run_dir, ds, evaluation_figures(run_dir, ds))
    if not keep_cache:
        shutil.rmtree(eval_dir / "cache", ignore_errors=True)
    if progress:
        progress(f"[eval] results: {eval_dir / 'metrics.nc'}" + (f", report: {eval_dir / 'report.html'}" if report else ""))
    return ds


__all__ = [
    # the stage
    "BASELINES", "MapSource", "available_methods", "make_scorer", "resolve_methods", "run_evaluation",
    # re-exported from the modules the stage is built of
    "BEST_DICE_NOTE", "CALIBRATION_RATE", "CASE_COORDS", "CURVE_POINTS", "FROC_MIN_REGION_ML", "FROC_THRESHOLDS",
    "METRICS", "OPERATING_METRICS", "OPERATING_POINTS", "READABLE_FORMATS", "RESULTS_FORMAT", "THRESHOLD_RULES",
    "Evaluation", "JointDensityScorer", "ZScoreBaseline", "best_method", "contrast_coordinate", "curve_figures",
    "evaluate_maps", "evaluation_figures", "froc_figures", "froc_frame", "gallery_figure", "joint_key",
    "lesion_coords", "lesion_slices", "metric_labels", "operating_frame", "per_case_frame", "pooled_curve",
    "pooled_frame", "scatter_figure", "write_report", "zscore_baseline",
]
