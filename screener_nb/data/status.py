"""``python -m screener_nb data check``: which datasets (the paper's, and the sample cohort) are here.

Above both :mod:`screener_nb.data.manifests` (the public datasets' layouts) and
:mod:`screener_nb.data.samples` (the real sample CTs), which do not import each other's
callers.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from ..errors import InputError
from . import samples
from .manifests import DATA_DIR_ENV, DatasetStatus, find_cases, list_manifests, load_manifest, resolve_data_dir


def check(data_dir: str | Path | None = None, *, include_samples: bool = True) -> list[DatasetStatus]:
    """Which datasets are present under ``data_dir`` (default ``$SCREENER_DATA_DIR``) and how many cases.

    With ``$SCREENER_DATA_DIR`` unset the public datasets are reported absent
    (no error), and the sample cohort is looked up in its default folder.
    """
    root: Path | None
    try:
        root = resolve_data_dir(data_dir)
    except InputError:
        root = None
    rows = []
    for name in list_manifests():
        m = load_manifest(name)
        folder = root / m.layout.folder if root else None
        if folder is None or not folder.is_dir():
            note = f"{DATA_DIR_ENV} unset" if root is None else "not downloaded"
            rows.append(DatasetStatus(name, m.role, folder, False, 0, 0, m.n_cases, note))
            continue
        try:
            cases = find_cases(m, root)
            note = ""
        except InputError as e:
            cases, note = [], str(e)
        rows.append(DatasetStatus(name, m.role, folder, bool(cases), len(cases),
                                  sum(c.label is not None for c in cases), m.n_cases, note))
    if include_samples:
        dest = samples.default_dest(data_dir)
        try:
            found = samples.sample_cases(dest)
            expected = len(samples.load_samples_manifest()["cases"])
            rows.append(DatasetStatus("samples", "train+test", dest, bool(found), len(found),
                                      sum(c.label is not None for c in found), expected,
                                      "" if found else "run: make data-samples"))
        except InputError as e:
            rows.append(DatasetStatus("samples", "train+test", dest, False, 0, 0, None, str(e)))
    return rows


def format_table(rows: Sequence[DatasetStatus]) -> str:
    """Plain-text table of :func:`check` rows."""
    header = ("dataset", "role", "present", "cases", "labelled", "paper", "folder / note")
    lines = [header]
    for r in rows:
        where = str(r.folder) if r.folder else "-"
        lines.append((r.name, r.role, "yes" if r.present else "no", str(r.n_found), str(r.n_labelled),
                      "-" if r.n_paper is None else f"{r.n_paper:,}", f"{where}{'  (' + r.note + ')' if r.note else ''}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1])
    return "\n".join(out)


def main_check(argv: list[str] | None = None) -> int:
    """``python -m screener_nb data check [--data-dir DIR]``: print which datasets are present."""
    import argparse

    parser = argparse.ArgumentParser(prog="screener_nb data check",
                                     description="List the paper's datasets and the sample cohort found locally.")
    parser.add_argument("--data-dir", default=None, help=f"datasets folder (default ${DATA_DIR_ENV})")
    args = parser.parse_args(argv)
    rows = check(args.data_dir)
    print(format_table(rows))
    if not os.environ.get(DATA_DIR_ENV) and args.data_dir is None:
        print(f"\nSet {DATA_DIR_ENV} to the folder holding the datasets; see data_manifests/*.yaml for layouts.",
              file=sys.stderr)
    return 0
