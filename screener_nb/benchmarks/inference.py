"""``python -m screener_nb bench inference``: whole-volume anomaly maps, speed and memory.

Two ways to map a whole CT, measured side by side in one run, each in a fresh
process (so neither inherits the other's memory) on the same preprocessed volume:

* ``windowed`` (:class:`screener_nb.inference.Screener`): descriptor, condition,
  pooling, -log q and upsampling inside each sliding window; only a one-channel
  map is stitched.
* ``naive`` (:func:`naive_anomaly_map`): MONAI stitches the
  full descriptor and condition maps (D + C channels) of the whole volume, then
  the density is applied.
* ``encoders`` (the floor, :func:`encoders_only_map`): the same windows through the
  descriptor and condition encoders alone, nothing else. No way of stitching or
  of applying the density can score the volume faster than this, so
  ``naive / encoders`` bounds the throughput ratio any windowed design can reach
  with these encoders on this machine.

Cases: the real LIDC-IDRI-0001 sample (when ``make data-samples`` fetched it) and
a synthetic 512 x 512 x 300 chest CT (a phantom at 0.75 x 0.75 x 1.0 mm). For
each: voxels per second (of the ORIGINAL scan) of the scoring, the end-to-end
``anomaly_map`` time (preprocessing included) and the peak RSS of the process
(``VmHWM``, :func:`screener_nb.runtime.own_peak_rss_mb`) -- the Binder target is below 2 GB for the 512 x 512 x 300 case.

The model is the demo profile's architecture (tiny UNets, the demo flow); with
``--run`` a trained run is used instead (speed does not depend on the weights).
When that run has a distilled student, the student is timed against its teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_FLAG = "--child"


# ----------------------------------------------------------------------------- building the pipeline
def demo_pipeline(run: str | None, method: str = "learned-flow", device: str = "cpu"):
    """The run's trained pipeline (a :class:`Screener`), or the demo architecture at random init."""
    import torch

    from .. import config
    from ..inference import FeatureExtractor, Screener
    from ..data.preprocess import PreprocessParams
    from ..methods import Method

    chosen = Method.parse(method, "--method")
    condition, density = chosen.condition, chosen.density
    if run:
        return Screener.from_run(run, chosen, device=device)
    from ..density_fit import build_density_model
    from ..ssl.task import build_encoder, encoder_spec

    # seeded: each mode runs in its own process, and their maps are compared
    torch.manual_seed(0)
    enc = {}
    for stage in ("descriptor", "condition"):
        cfg = config.resolve(stage, profile="demo")
        spec = encoder_spec(cfg)
        enc[stage] = build_encoder(spec).eval().requires_grad_(False)
        enc[stage].spec = spec
    dcfg = config.resolve("density", profile="demo")
    dcfg_data = config.resolve("data", profile="demo")
    extractor = FeatureExtractor(enc["descriptor"], condition, enc["condition"], tuple(dcfg_data.target_spacing),
                                 tuple(dcfg.pool_stride), dcfg.sincos_dim)
    spec = {"density": density, "dim": extractor.dim, "cond_dim": extractor.cond_dim,
            "flow_depth": dcfg.flow_depth, "flow_hidden": dcfg.flow_hidden}
    model = build_density_model(spec).eval().requires_grad_(False)
    params = PreprocessParams(spacing=tuple(dcfg_data.target_spacing))
    screener = Screener.from_parts(extractor, model, tuple(dcfg.patch), params, method, device=device,
                                   overlap=0.5, sw_batch=2)
    return screener


def naive_anomaly_map(extractor, density, image, spacing, patch,
                      overlap: float = 0.5, sw_batch: int = 2) -> np.ndarray:
    """The straightforward way, for the benchmark: stitch the full-resolution
    descriptor and condition maps of the whole volume with MONAI, then pool
    and apply the density. Memory grows with D + C channels of the whole CT.

    Windows run on the extractor's device (bf16 on CUDA, as in :class:`Screener`);
    the stitched maps live in CPU memory, as the windowed pipeline's map does.
    """
    import numpy as np
    import torch

    from ..errors import ConfigError
    from ..features import stitch_encoder
    from ..models.density import pool_features, upsample_scores

    if extractor.context:
        raise ConfigError("naive_anomaly_map compares the paper's window modes; a run with the context "
                          "condition is scored scan by scan (Screener.score_preprocessed)")
    dev = next(extractor.parameters()).device
    x = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    with torch.inference_mode():
        feats = [stitch_encoder(extractor.descriptor, x, patch, overlap, sw_batch)]
        if extractor.condition_kind == "learned":
            feats.append(stitch_encoder(extractor.condition_encoder, x, patch, overlap, sw_batch))
        y = pool_features(feats[0], extractor.pool_stride).to(dev)
        c = pool_features(feats[1], extractor.pool_stride).to(dev) if len(feats) > 1 else None
        if extractor.condition_kind == "sincos":
            c = extractor.sincos(torch.zeros(1, 3), tuple(y.shape[2:])).to(dev)
        nll = -density.log_prob(y, c).float().cpu()
    return upsample_scores(nll, tuple(x.shape[2:]))[0].numpy()


def encoders_only_map(extractor, image, patch, overlap: float, sw_batch: int):
    """(X, Y, Z) float32: the encoders' work of a sliding-window map and nothing else.

    Each window goes through the descriptor (and the learned condition) encoder;
    one channel is stitched per encoder (as cheap as the windowed pipeline's
    stitching) and no density is evaluated. Returns the descriptor's first channel.
    """
    import numpy as np
    import torch

    from ..features import stitch_encoder

    x = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    out = stitch_encoder(extractor.descriptor, x, patch, overlap, sw_batch, channels=1)
    if extractor.condition_kind == "learned":
        stitch_encoder(extractor.condition_encoder, x, patch, overlap, sw_batch, channels=1)
    return out[0, 0].numpy()


# ----------------------------------------------------------------------------- one measurement (child)
def _child(args) -> None:
    """Runs in a fresh process; prints one JSON line."""
    import numpy as np
    import torch

    from ..runtime import own_peak_rss_mb

    torch.set_num_threads(args.threads)
    from ..data.io import read_volume
    from ..data.preprocess import preprocess

    screener = demo_pipeline(args.run, args.method, device=args.device)
    net = getattr(screener.extractor, "condition_encoder", None) if screener.extractor is not None else None
    if getattr(net, "map_cache", None) is not None:
        net.map_cache = None  # time the masked inference itself, not the run's memoised maps
    cuda = screener.device.type == "cuda"
    rss0 = own_peak_rss_mb()
    out: dict = {"mode": args.mode}
    volume = read_volume(args.volume)
    n_voxels = int(np.prod(volume.shape))
    t0 = time.perf_counter()
    pre = preprocess(volume, screener.params)
    out["preprocess_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        if args.mode == "windowed":
            score = screener.score_preprocessed(pre.image, pre.body, pre.spacing)
        elif args.mode == "encoders":
            score = encoders_only_map(screener.extractor, pre.image, screener.patch, screener.overlap,
                                      screener.sw_batch)
        else:
            # the same window function, minus the in-window density: stitch features, then density
            score = naive_anomaly_map(screener.extractor, screener.density, pre.image, pre.spacing, screener.patch,
                                      overlap=screener.overlap, sw_batch=screener.sw_batch)
        if cuda:
            torch.cuda.synchronize()
        out["score_s"] = time.perf_counter() - t0
    if cuda:
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.mode == "windowed":
        from ..data.preprocess import to_original_grid

        t0 = time.perf_counter()
        to_original_grid(score, pre.record, fill=float(score.min()), mode="linear")
        out["back_to_original_s"] = time.perf_counter() - t0
    np.save(args.save, score.astype(np.float32))
    out.update(n_voxels=n_voxels, n_voxels_pre=int(np.prod(pre.shape)), shape=list(volume.shape),
               pre_shape=list(pre.shape), rss_after_imports_mb=rss0,
               peak_rss_mb=own_peak_rss_mb())
    print("RESULT " + json.dumps(out), flush=True)


def _measure(mode: str, volume: Path, save: Path, args) -> dict:
    cmd = [sys.executable, "-m", "screener_nb.benchmarks.inference", CHILD_FLAG, "--mode", mode,
           "--volume", str(volume), "--save", str(save), "--threads", str(args.threads), "--method", args.method,
           "--device", args.device]
    if args.run:
        cmd += ["--run", args.run]
    env = {**os.environ, "SCREENER_HEADLESS": "1", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"mode": mode, "error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- cases
def _synthetic_ct(path: Path, shape=(512, 512, 300), spacing=(0.75, 0.75, 1.0)) -> Path:
    from ..data.io import write_nifti
    from ..data.phantoms import generate_case

    t0 = time.perf_counter()
    case = generate_case(7, lesions=True, shape=shape, spacing=spacing)
    write_nifti(case.image, path)
    print(f"  synthetic {shape} phantom at {spacing} mm generated in {time.perf_counter() - t0:.1f} s")
    return path


def _lidc_case() -> Path | None:
    from ..data.samples import sample_cases

    try:
        cases = sample_cases()
    except Exception:  # no sample folder: the case is optional
        return None
    found = [c for c in cases if "lidc" in c.id.lower()]
    return Path(found[0].image) if found else None


def _report(name: str, rows: list[dict]) -> dict:
    """Print one volume's figures; return them (``--json``): the rows, ratios and the maps' agreement."""
    import numpy as np

    print(f"\n== {name}")
    summary: dict = {"name": name, "rows": [{k: v for k, v in r.items() if k != "save"} for r in rows]}
    ok = {r["mode"]: r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"  {r['mode']:<9} FAILED: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        vps = r["n_voxels"] / r["score_s"]
        print(f"  {r['mode']:<9} scoring {r['score_s']:7.1f} s = {vps / 1e6:6.2f} M original voxels/s "
              f"({r['n_voxels_pre'] / r['score_s'] / 1e6:5.2f} M preprocessed/s); preprocessing "
              f"{r['preprocess_s']:.1f} s; peak RSS {r['peak_rss_mb']:7.0f} MB "
              f"(after imports {r['rss_after_imports_mb']:.0f} MB)"
              + (f"; GPU peak {r['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in r else ""))
    if "windowed" in ok:
        w = ok["windowed"]
        total = w["preprocess_s"] + w["score_s"] + w.get("back_to_original_s", 0.0)
        print(f"  end to end (read excluded): {total:.1f} s for {tuple(w['shape'])} -> preprocessed {tuple(w['pre_shape'])}")
    if "naive" in ok and "encoders" in ok:
        n, e = ok["naive"], ok["encoders"]
        summary["naive_over_encoders"] = n["score_s"] / e["score_s"]
        print(f"  encoders alone take {e['score_s']:.1f} s of the naive {n['score_s']:.1f} s: no windowed "
              f"design with these encoders can beat naive by more than {n['score_s'] / e['score_s']:.2f}x here")
    if "windowed" in ok and "naive" in ok:
        w, n = ok["windowed"], ok["naive"]
        summary["windowed_speedup"] = n["score_s"] / w["score_s"]
        summary["rss_naive_over_windowed"] = n["peak_rss_mb"] / w["peak_rss_mb"]
        print(f"  throughput windowed / naive: {n['score_s'] / w['score_s']:.2f}x; "
              f"peak RSS naive / windowed: {n['peak_rss_mb'] / w['peak_rss_mb']:.2f}x")
        from scipy.stats import spearmanr

        a, b = np.load(w["save"]).ravel(), np.load(n["save"]).ravel()
        # inside the body only: the windowed map sets every voxel outside it to the body's minimum,
        # the naive one scores air too (a tie-free comparison of the two needs the same region)
        inside = np.flatnonzero((a > a.min()) & np.isfinite(b))
        pick = np.random.default_rng(0).choice(inside, size=min(inside.size, 1_000_000), replace=False)
        # rank correlation: -log q is heavy-tailed, so Pearson's r is decided by a few voxels
        summary["spearman"] = float(spearmanr(a[pick], b[pick]).statistic)
        summary["pearson"] = float(np.corrcoef(a[pick], b[pick])[0, 1])
        print(f"  maps agree inside the body: Spearman {summary['spearman']:.4f}, Pearson "
              f"{summary['pearson']:.4f} on {pick.size} voxels (equal where one window "
              "covers the volume; with overlaps, blending scores vs blending features differs)")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener_nb bench inference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["windowed", "naive", "encoders"], help=argparse.SUPPRESS)
    ap.add_argument("--volume", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--run", help="a trained run directory (default: the demo architecture, untrained)")
    ap.add_argument("--method", default="learned-flow", help="<condition>-<density> (default learned-flow)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default: the 2-core CPU target) | auto | cuda; windows run there, maps stitch on the CPU")
    ap.add_argument("--shape", default="512,512,300", help="synthetic CT shape (X,Y,Z)")
    ap.add_argument("--skip-naive", action="store_true", help="time only the windowed pipeline")
    ap.add_argument("--skip-floor", action="store_true", help="do not time the encoders alone")
    ap.add_argument("--skip-synthetic", action="store_true", help="only the LIDC sample")
    ap.add_argument("--skip-lidc", action="store_true", help="only the synthetic CT")
    ap.add_argument("--skip-student", action="store_true", help="do not time the run's distilled student")
    ap.add_argument("--json", help="also write the figures to this JSON file (machine-readable)")
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    from ..methods import Method
    from ..rundir import RunDir
    from ..runtime import environment_report, resolve_device

    env = environment_report()
    # checked here, built only in the children: the parent holds no model (nor a CUDA context)
    Method.parse(args.method, "--method")
    device = resolve_device(args.device)
    what = f"trained run {args.run}" if args.run else "demo architecture, random init (speed does not depend on the weights)"
    print(f"bench inference: {args.method}, {what}; device {device}; {args.threads} torch threads on "
          f"{env['cpu_count']} cores, torch {env['packages'].get('torch')}")
    modes = ["windowed"] + ([] if args.skip_naive else ["naive"]) + ([] if args.skip_floor else ["encoders"])
    report = {"method": args.method, "device": str(device), "threads": args.threads, "volumes": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = []
        lidc = None if args.skip_lidc else _lidc_case()
        if lidc is not None:
            cases.append(("LIDC-IDRI-0001 (real)", lidc))
        elif not args.skip_lidc:
            print("  LIDC-IDRI-0001 sample not fetched (make data-samples): skipped")
        if not args.skip_synthetic:
            shape = tuple(int(v) for v in args.shape.split(","))
            cases.append((f"synthetic {shape}", _synthetic_ct(tmp / "synthetic.nii.gz", shape)))
        for name, path in cases:
            rows = []
            for mode in modes:
                save = tmp / f"{mode}.npy"
                r = _measure(mode, path, save, args)
                r["save"] = str(save)
                rows.append(r)
            report["volumes"].append(_report(name, rows))
    if args.run and not args.skip_student and RunDir(args.run).done("distill"):
        from ..student_eval import bench_student_vs_teacher

        print("\n== distilled student vs its teacher")
        report["student_vs_teacher"] = bench_student_vs_teacher(args.run)
    if args.json:
        from .. import files

        files.write_json(Path(args.json), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
