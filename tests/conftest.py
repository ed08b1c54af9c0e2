"""Fixtures shared by several test folders.

``quick_run``: ONE real headless run of the whole notebook chain (00 -> 07) in
the quick profile, through the real runner (papermill), shared by the
notebook tests and the browser test of notebook 07 (session scope: it takes
minutes, so it is made once).
"""
from __future__ import annotations

import os

import pytest

# OpenMP threads wait without spinning (set before torch loads its runtime): on a machine whose other
# core is busy, spinning threads take the core from the one that has work
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the suite sets these itself where a test needs them: a caller's shell must not change what it checks
for _name in ("SCREENER_HEADLESS", "SCREENER_PROGRESS_FILE", "SCREENER_VIEWER_NETWORK", "SCREENER_RUN_DIR"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    from screener_nb.runner import run

    out = tmp_path_factory.mktemp("quick") / "run"
    os.environ.pop("SCREENER_NOTEBOOKS_DIR", None)
    # a bound per notebook cell, not on the whole chain: a loaded machine runs it several times slower
    run(out, "quick", stages="00-07", cell_timeout=1200)
    return out
