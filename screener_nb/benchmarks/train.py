"""``python -m screener_nb bench train``: speed and memory of one SSL training step on this machine.

For each UNet size: voxel pairs per second of a full step (sampling excluded and
included, measured separately), parameters, and the peak RSS of a fresh process
doing the steps (so sizes do not inherit each other's memory).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _one(size: str, patch, batch: int, n_pairs: int, steps: int, width: int) -> dict:
    import numpy as np
    import psutil
    import torch

    from ..models.unet import build_unet, count_parameters
    from ..ssl.losses import DenseSSLHead
    from ..ssl.pairs import PairSampler
    from ..ssl.task import PairTask, SSLModel
    from ..train import default_collate

    rng = np.random.default_rng(0)
    shape = tuple(int(p * 2.2) for p in patch)
    case = {"id": "bench", "image": rng.random(shape, dtype=np.float32),
            "body": np.ones(shape, bool), "spacing": (1.5, 1.5, 2.25)}
    task = PairTask(PairSampler([case], patch=patch, n_pairs=n_pairs))
    model = SSLModel(build_unet(size, in_channels=1, out_channels=32), DenseSSLHead("vicreg", 32, width, width))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-3)
    t_sample, t_step = 0.0, 0.0
    for i in range(steps + 1):  # first step is warm-up, not timed
        t0 = time.perf_counter()
        b = default_collate([task.sample(np.random.default_rng([0, i, j])) for j in range(batch)])
        t1 = time.perf_counter()
        loss, _ = task.loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i:
            t_sample += t1 - t0
            t_step += t2 - t1
    pairs = steps * batch * n_pairs
    return {"size": size, "params_M": count_parameters(model.encoder) / 1e6, "patch": list(patch), "batch": batch,
            "pairs_per_s_compute": pairs / t_step, "pairs_per_s_total": pairs / (t_step + t_sample),
            "s_per_step": (t_step + t_sample) / steps,
            "peak_rss_mb": psutil.Process().memory_info().rss / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener_nb bench train")
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--patch", default="48,48,32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024, help="VICReg expander width")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    patch = tuple(int(v) for v in args.patch.split(","))
    if args.child:
        print(json.dumps(_one(args.child, patch, args.batch, args.pairs, args.steps, args.width)))
        return 0
    import torch

    print(f"SSL training step on CPU ({torch.get_num_threads()} threads), patch {patch}, batch {args.batch}, "
          f"{args.pairs} voxel pairs per crop pair, expander width {args.width}")
    print(f"{'size':<6} {'params':>8} {'s/step':>8} {'pairs/s (step)':>15} {'pairs/s (+sampling)':>20} {'peak RSS':>10}")
    for size in args.sizes.split(","):
        out = subprocess.run([sys.executable, "-m", "screener_nb", "bench", "train", "--child", size,
                              "--patch", args.patch, "--batch", str(args.batch), "--pairs", str(args.pairs),
                              "--steps", str(args.steps), "--width", str(args.width)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{size}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['size']:<6} {r['params_M']:>7.2f}M {r['s_per_step']:>8.2f} {r['pairs_per_s_compute']:>15.0f} "
              f"{r['pairs_per_s_total']:>20.0f} {r['peak_rss_mb']:>8.0f}MB")
    return 0
