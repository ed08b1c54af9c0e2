"""``python -m screener_nb bench tiles --run RUN``: encode-once tiles against sliding windows.

The descriptor's pooled map of each VALIDATION case of a finished run, computed three ways in
one process, side by side: MONAI sliding windows of the training crop at overlap 0.25 (the
CPU profiles' scan mode) and 0.5 (the paper's), and :func:`screener_nb.features.tiled_pooled_map`
(large tiles with a halo, each voxel encoded about once). Printed per case and pooled: seconds,
voxels encoded per image voxel, and how far the tiled map departs from the overlap-0.25 one
inside the body (mean per-channel Pearson correlation of the cells, median cosine of the cell
vectors), and what that does to the anomaly maps: for each ``--methods`` density of the run, the
pooled voxel AUROC of the validation lesions inside the body with each map, and the rank
(Spearman) correlation of the tiled and windowed scores in the body. The UNet's instance
normalisation makes the tiles an approximation; the figures say by how much.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _triple(text: str) -> tuple[int, int, int]:
    vals = tuple(int(v) for v in text.split(","))
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, found {text!r}")
    return vals


def encoded_per_voxel(shape, window, step) -> float:
    """Voxels encoded per image voxel by windows of ``window`` placed every ``step`` voxels."""
    n = 1.0
    for s, w, st in zip(shape, window, step):
        count = max(1, -(-(s - w) // st) + 1) if s > w else 1
        n *= count * w / s
    return n


def tiles_per_voxel(shape, tile, halo) -> float:
    """Voxels encoded per image voxel by :func:`~screener_nb.features.tiled_pooled_map`'s tiles."""
    n = 1.0
    for s, t, h in zip(shape, tile, halo):
        n *= -(-s // (t - 2 * h)) * t / s
    return n


def departure(a: np.ndarray, b: np.ndarray, body_cells: np.ndarray) -> dict:
    """Mean per-channel Pearson correlation and median cosine of (C, x, y, z) maps inside the body."""
    fa, fb = a[:, body_cells], b[:, body_cells]  # (C, n)
    pearson = [float(np.corrcoef(u, v)[0, 1]) for u, v in zip(fa, fb)]
    cos = (fa * fb).sum(0) / (np.linalg.norm(fa, axis=0) * np.linalg.norm(fb, axis=0) + 1e-12)
    return {"pearson": float(np.mean(pearson)), "cosine_median": float(np.median(cos))}


MODES = ("window0.25", "window0.5", "tiles")


def _density(run, name: str):
    """(extractor, density) of the run's fitted descriptor density ``name`` (e.g. none-gaussian)."""
    from ..density_fit import load_density
    from ..errors import ConfigError
    from ..methods import Method

    method = Method.parse(name, "--methods")
    if method.density == "residual":
        raise ConfigError(f"--methods: {name!r} reads no descriptor map; choose gaussian or flow densities")
    return load_density(run, method.condition, method.density)[:2]


def cell_scores(extractor, density, x, y: np.ndarray, patch) -> np.ndarray:
    """(X, Y, Z) float32 NLL (nats) of a whole scan ``x`` (1, 1, X, Y, Z) whose descriptor map
    is ``y`` (D, x, y, z): the condition of the scan, the density per cell, cells upsampled."""
    import torch

    from ..models.density import upsample_cells

    yt = torch.from_numpy(y)[None]
    _, c = extractor.scan_features(x, patch, y=yt)
    nll = -density.log_prob(yt, c)
    return upsample_cells(nll.float().cpu(), tuple(x.shape[2:]), extractor.pool_stride)[0].numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener_nb bench tiles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run whose descriptor stage is done")
    ap.add_argument("--tile", type=_triple, default=(192, 192, 128), help="tile X,Y,Z voxels")
    ap.add_argument("--halo", type=_triple, default=(24, 24, 16), help="halo X,Y,Z voxels")
    ap.add_argument("--cases", type=int, default=2, help="validation cases to measure")
    ap.add_argument("--methods", default="none-gaussian,learned-gaussian",
                    help="comma-separated fitted descriptor densities of the run whose maps are compared ('' = none)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import torch
    from scipy.stats import spearmanr

    from ..data.cohort import load_cohort
    from ..metrics import voxel_auroc
    from ..features import body_cells, pooled_map, tiled_pooled_map
    from ..rundir import RunDir
    from ..ssl.task import load_encoder

    from .. import config

    RunDir(args.run).require("descriptor")
    encoder = load_encoder(args.run, "descriptor")
    cfg = config.resolve_for_run("density", args.run)  # the windows of its scan grids
    patch, stride = tuple(cfg.patch), (3, 3, 2)
    cases = load_cohort(args.run, role="val")[: args.cases]
    methods = [m for m in args.methods.split(",") if m]
    scorers = {m: _density(args.run, m) for m in methods}
    rows, scores, labels, bodies = [], {m: {k: [] for k in MODES} for m in methods}, [], []
    print(f"descriptor of {args.run}; windows {patch}, tiles {args.tile} with halo {args.halo}, "
          f"torch threads {torch.get_num_threads()}")
    for case in cases:
        x = torch.from_numpy(np.array(case.image, np.float32))[None, None]
        shape = tuple(x.shape[2:])
        row = {"case": case.id, "shape": list(shape)}
        maps = {}
        with torch.inference_mode():
            for name, fn in (("window0.25", lambda: pooled_map(encoder, x, patch, stride, 0.25)),
                             ("window0.5", lambda: pooled_map(encoder, x, patch, stride, 0.5)),
                             ("tiles", lambda: tiled_pooled_map(encoder, x, stride, args.tile, args.halo,
                                                                multiple=encoder.multiple))):
                t0 = time.perf_counter()
                maps[name] = fn()[0].numpy()
                row[f"{name}_s"] = time.perf_counter() - t0
        row["encoded_per_voxel"] = {
            "window0.25": encoded_per_voxel(shape, patch, [max(1, int(p * 0.75)) for p in patch]),
            "window0.5": encoded_per_voxel(shape, patch, [max(1, int(p * 0.5)) for p in patch]),
            "tiles": tiles_per_voxel(shape, args.tile, args.halo)}
        cells = body_cells(np.asarray(case.body, bool), stride)
        row["tiles_vs_window0.25"] = departure(maps["tiles"], maps["window0.25"], cells)
        row["window0.5_vs_window0.25"] = departure(maps["window0.5"], maps["window0.25"], cells)
        body = np.asarray(case.body, bool)
        labels.append(np.asarray(case.label) > 0)
        bodies.append(body)
        for m, (extractor, density) in scorers.items():
            for k in MODES:
                scores[m][k].append(cell_scores(extractor, density, x, maps[k], patch))
            row[f"{m}_spearman_tiles_vs_window0.25"] = float(
                spearmanr(scores[m]["tiles"][-1][body], scores[m]["window0.25"][-1][body])[0])
        rows.append(row)
        print(f"{case.id} {shape}: window0.25 {row['window0.25_s']:.1f} s, window0.5 {row['window0.5_s']:.1f} s, "
              f"tiles {row['tiles_s']:.1f} s (speed-up vs 0.25: {row['window0.25_s'] / row['tiles_s']:.2f}x, "
              f"vs 0.5: {row['window0.5_s'] / row['tiles_s']:.2f}x); encoded per voxel "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["encoded_per_voxel"].items())
              + f"; tiles vs window0.25 in the body: Pearson {row['tiles_vs_window0.25']['pearson']:.3f}, "
              f"cosine {row['tiles_vs_window0.25']['cosine_median']:.3f} (window0.5 vs 0.25: "
              f"{row['window0.5_vs_window0.25']['pearson']:.3f} / {row['window0.5_vs_window0.25']['cosine_median']:.3f})")
    pooled = {m: {k: voxel_auroc(scores[m][k], labels, bodies) for k in MODES} for m in methods}
    for m, row in pooled.items():
        print(f"{m}, pooled voxel AUROC of the {len(cases)} validation cases: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
              + "; Spearman tiles vs window0.25 per case: "
              + ", ".join(f"{r[f'{m}_spearman_tiles_vs_window0.25']:.3f}" for r in rows))
    if args.json:
        from ..files import write_json

        write_json(args.json, {"tile": list(args.tile), "halo": list(args.halo), "cases": rows, "auroc": pooled})
    return 0
