"""Fixtures shared by several test folders.

``quick_run``: ONE real headless run of the whole notebook chain (00 -> 07) in
the quick profile, through the real runner (papermill), shared by the
notebook tests and the browser test of notebook 07 (session scope: it takes
minutes, so it is made once).
"""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    from screener_nb.runner import run

    out = tmp_path_factory.mktemp("quick") / "run"
    os.environ.pop("SCREENER_NOTEBOOKS_DIR", None)
    run(out, "quick", stages="00-07")
    return out
