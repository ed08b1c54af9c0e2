"""``python -m screener_nb bench distill --run RUN``: distillation variants against their teacher.

The research loop of the student: each variant (``--steps``, ``--patch``, any ``-p key=value``
of the distill stage) is distilled into its own run directory under ``--out`` (linked to the
finished run's data, encoders and densities, with a copy of its cached teacher maps, so no
teacher pass is repeated), then the student and the teacher score the run's VALIDATION
phantoms side by side: pooled voxel AUROC of both, their difference, and the mean Spearman
correlation of the two maps inside the body. One JSON row per variant is appended to
``--out/log.jsonl``; the figures are in docs/experiments.md (E29).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

STAGE = "distill"


def variant_run(source: Path, dest: Path) -> Path:
    """``dest``: a run directory sharing ``source``'s stages (links) except ``distill``, which gets a
    copy of the cached teacher maps only."""
    from ..teacher import MAPS_DIR

    if dest.exists():
        raise SystemExit(f"{dest} exists: choose another --tag (a variant's run is never overwritten)")
    dest.mkdir(parents=True)
    for p in source.iterdir():
        if p.name != STAGE:
            (dest / p.name).symlink_to(p.resolve())
    maps = source / STAGE / MAPS_DIR
    if maps.is_dir():
        shutil.copytree(maps, dest / STAGE / MAPS_DIR)
    return dest


def compare_on_cases(run: Path, cases: Sequence, teacher_fn: Callable, student_fn: Callable) -> dict:
    """Pooled voxel AUROC of teacher and student maps of ``cases`` (labelled ones), and the mean
    Spearman correlation of the two maps inside each body."""
    from scipy.stats import spearmanr

    from ..metrics import voxel_auroc

    labelled = [c for c in cases if c.label is not None and np.any(c.label)]
    if not labelled:
        raise SystemExit(f"{run}: no labelled validation case to compare on")
    tm = [teacher_fn(c) for c in labelled]
    sm = [student_fn(c) for c in labelled]
    labels = [np.asarray(c.label) > 0 for c in labelled]
    bodies = [np.asarray(c.body, bool) for c in labelled]
    teacher = float(voxel_auroc(tm, labels, roi=bodies))
    student = float(voxel_auroc(sm, labels, roi=bodies))
    rho = float(np.mean([spearmanr(t[b], s[b]).statistic for t, s, b in zip(tm, sm, bodies)]))
    return {"cases": [c.id for c in labelled], "auroc_teacher": teacher, "auroc_student": student,
            "difference": student - teacher, "spearman_in_body": rho}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener_nb bench distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run (its density stage done)")
    ap.add_argument("--out", default="runs/bench_distill", help="where the variants' runs and log.jsonl go")
    ap.add_argument("--tag", required=True, help="the variant's name (its run folder)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--patch", default=None, help="X,Y,Z crop of the student (voxels)")
    ap.add_argument("-p", action="append", default=[], metavar="KEY=VALUE", help="other distill parameters")
    ap.add_argument("--profile", default="demo")
    args = ap.parse_args(argv)

    from .. import config
    from ..data.cohort import load_cohort
    from ..distill import distill_student
    from ..inference import Screener
    from ..methods import Method

    source, out = Path(args.run), Path(args.out)
    params = dict(kv.split("=", 1) for kv in args.p)
    if args.steps is not None:
        params["steps"] = args.steps
    if args.patch:
        params["patch"] = tuple(int(v) for v in args.patch.split(","))
    run = variant_run(source, out / args.tag)
    cfg = config.resolve(STAGE, profile=args.profile, run_dir=str(run), **params)
    t0 = time.perf_counter()
    distill_student(cfg, progress=None)
    seconds = time.perf_counter() - t0
    teacher = Screener.from_run(run, Method.parse(cfg.teacher, "teacher"), device=cfg.device, overlap=cfg.overlap)
    student = Screener.from_run(run, student=True, device=cfg.device, overlap=cfg.overlap)
    row = {"tag": args.tag, "run": str(source), "teacher": cfg.teacher, "steps": cfg.steps, "patch": list(cfg.patch),
           "params": {k: str(v) for k, v in params.items()}, "distill_s": round(seconds, 1),
           **compare_on_cases(run, load_cohort(run, role="val"),
                              lambda c: teacher.score_preprocessed(c.image, c.body, c.spacing),
                              lambda c: student.score_preprocessed(c.image, c.body, c.spacing))}
    print(f"{args.tag}: {cfg.steps} steps, patch {tuple(cfg.patch)}, {seconds:.0f} s; validation AUROC teacher "
          f"{row['auroc_teacher']:.4f}, student {row['auroc_student']:.4f} ({row['difference']:+.4f}); "
          f"Spearman in the body {row['spearman_in_body']:.3f}")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
