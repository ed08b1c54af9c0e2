"""``python -m screener_nb bench phantoms``: seconds per generated phantom case, on one thread.

For each grid (the quick, demo and full profiles' phantom shapes at 2 x 2 x 2.5 mm)
and for healthy cases and cases with lesions (1-3 random kinds, as the data
stage's validation and test cases), the mean and max wall time per case over
``--repeats`` seeds, and the share of the time each part of the generator takes
(summed over all cases of the grid). The target is under 2 s for a
160 x 160 x 128 case on one core.

Wall time (mean, max) and CPU time of the process (mean) are both printed: on a
shared machine the wall time includes waiting for a core, the CPU time does not.

Threads: numpy and scipy calls are limited to one thread with ``threadpoolctl``
when it is installed (the generator itself is single-threaded; BLAS is not
used); otherwise the thread environment variables are reported as found.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

GRIDS = ((96, 96, 80), (128, 128, 100), (160, 160, 128))


def _limit_threads():
    """(context manager, description): one thread for numpy/scipy's pools when threadpoolctl is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext(), ("threadpoolctl not installed; OMP_NUM_THREADS="
                                          + os.environ.get("OMP_NUM_THREADS", "unset"))
    return threadpool_limits(1), "numpy/scipy thread pools limited to 1 (threadpoolctl)"


def run(grids=GRIDS, repeats: int = 3, spacing=(2.0, 2.0, 2.5), seed0: int = 1000) -> list[dict]:
    """Time the generator; one row per (grid, healthy|lesions)."""
    from ..data.phantoms import _Builder

    _Builder(seed0, True, (64, 64, 48), spacing, None).run()  # warm-up: imports, first allocations
    rows = []
    for shape in grids:
        for lesions in (False, True):
            times, cpu, parts = [], [], defaultdict(float)
            for r in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                b = _Builder(seed0 + r, lesions, tuple(shape), spacing, None)
                b.run()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                for k, v in b.timings.items():
                    parts[k] += v
            total = sum(parts.values()) or 1.0
            rows.append({"shape": tuple(shape), "lesions": lesions, "mean_s": sum(times) / len(times),
                         "max_s": max(times), "cpu_s": sum(cpu) / len(cpu), "mvox": shape[0] * shape[1] * shape[2] / 1e6,
                         "parts": {k: v / total for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener_nb bench phantoms", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="cases (seeds) per grid and mode")
    ap.add_argument("--shape", type=int, nargs=3, action="append", help="a grid (X Y Z) instead of the defaults")
    ap.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 2.5))
    a = ap.parse_args(argv)
    limiter, note = _limit_threads()
    print(f"phantom generator: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}; {note}")
    with limiter:
        rows = run(a.shape or GRIDS, a.repeats, tuple(a.spacing))
    print(f"{'grid':>16} {'case':>8} {'Mvox':>6} {'mean s':>8} {'max s':>8} {'cpu s':>7}  main parts (share of time)")
    for r in rows:
        grid = "x".join(map(str, r["shape"]))
        parts = ", ".join(f"{k} {v:.0%}" for k, v in list(r["parts"].items())[:4])
        print(f"{grid:>16} {'lesions' if r['lesions'] else 'healthy':>8} {r['mvox']:6.2f} {r['mean_s']:8.3f} "
              f"{r['max_s']:8.3f} {r['cpu_s']:7.3f}  {parts}")
    full = [r for r in rows if r["shape"] == (160, 160, 128)]
    if full:
        worst = max(r["max_s"] for r in full)
        print(f"160 x 160 x 128: slowest case {worst:.2f} s ({'within' if worst < 2.0 else 'OVER'} the 2 s target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
