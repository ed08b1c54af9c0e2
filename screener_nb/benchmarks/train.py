"""``python -m screener_nb bench train``: speed and memory of one SSL training step on this machine.

For each stage (descriptor, condition) and UNet size: voxel pairs per second of
a full optimiser step (pair sampling excluded and included, measured
separately), the encoder's parameters, and the peak RSS of a fresh process
doing the steps (its own ``VmHWM``, so sizes do not inherit each other's
memory). The model, sampler and loss are built by the training stage's own
``make_model`` / ``make_sampler`` from the profile's configuration (``--profile
demo`` by default: what ``make demo`` trains), so the figures are those of the
real training step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _one(stage: str, size: str, profile: str, steps: int, layout: str) -> dict:
    import numpy as np
    import torch

    from .. import config
    from ..models.unet import count_parameters
    from ..runtime import own_peak_rss_mb
    from ..ssl.task import PairTask, make_model, make_sampler
    from ..train import default_collate, to_device

    cfg = config.resolve(stage, profile=profile, model_size=size, run_dir="unused")
    rng = np.random.default_rng(0)
    shape = tuple(int(p * 2.2) for p in cfg.patch)  # room for two overlapping crops at any drawn spacing
    case = {"id": "bench", "image": rng.random(shape, dtype=np.float32),
            "body": np.ones(shape, bool), "spacing": tuple(config.resolve("data", profile=profile).target_spacing)}
    task = PairTask(make_sampler(cfg, [case]))
    model = make_model(cfg)
    channels_last = layout == "channels_last"
    if channels_last:  # as train.fit does (TrainSettings.channels_last)
        model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, eps=1e-3)
    t_sample, t_step = 0.0, 0.0
    for i in range(steps + 1):  # the first step is a warm-up, not timed
        t0 = time.perf_counter()
        b = to_device(default_collate([task.sample(np.random.default_rng([0, i, j])) for j in range(cfg.batch)]),
                      torch.device("cpu"), channels_last)
        t1 = time.perf_counter()
        loss, _ = task.loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i:
            t_sample += t1 - t0
            t_step += t2 - t1
    pairs = steps * cfg.batch * cfg.n_pairs
    return {"stage": stage, "size": size, "layout": layout, "params_M": count_parameters(model.encoder) / 1e6,
            "patch": list(cfg.patch), "batch": cfg.batch, "n_pairs": cfg.n_pairs,
            "pairs_per_s_compute": pairs / t_step, "pairs_per_s_total": pairs / (t_step + t_sample),
            "s_per_step": (t_step + t_sample) / steps, "peak_rss_mb": own_peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener_nb bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo", help="configuration profile (default demo)")
    ap.add_argument("--stages", default="descriptor,condition")
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--layouts", default="contiguous,channels_last",
                    help="memory layouts of the 5-D tensors, measured side by side (train.fit uses channels_last)")
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "SIZE", "LAYOUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_one(*args.child[:2], args.profile, args.steps, args.child[2])))
        return 0
    import torch

    from .. import config

    cfg = config.resolve("descriptor", profile=args.profile, run_dir="unused")
    print(f"SSL training step on CPU ({torch.get_num_threads()} threads), profile {args.profile}: patch "
          f"{tuple(cfg.patch)}, batch {cfg.batch}, {cfg.n_pairs} voxel pairs per crop pair, loss {cfg.loss}, "
          f"expander width {cfg.expander_width}")
    print(f"{'stage':<11} {'size':<6} {'layout':<14} {'params':>8} {'s/step':>8} {'pairs/s (step)':>15} "
          f"{'pairs/s (+sampling)':>20} {'peak RSS':>10}")
    for stage in args.stages.split(","):
        for size in args.sizes.split(","):
            for layout in args.layouts.split(","):
                if layout not in ("contiguous", "channels_last"):
                    raise SystemExit(f"--layouts: expected contiguous and/or channels_last, found {layout!r}")
                out = subprocess.run([sys.executable, "-m", "screener_nb", "bench", "train", "--child", stage, size,
                                      layout, "--profile", args.profile, "--steps", str(args.steps)],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(f"{stage} {size} {layout}: failed\n{out.stderr[-2000:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{r['stage']:<11} {r['size']:<6} {r['layout']:<14} {r['params_M']:>7.2f}M {r['s_per_step']:>8.2f} "
                      f"{r['pairs_per_s_compute']:>15.0f} {r['pairs_per_s_total']:>20.0f} {r['peak_rss_mb']:>8.0f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
